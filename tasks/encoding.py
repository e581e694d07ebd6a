"""Tokenisation of (prompt, response) pairs: the one definition training and scoring share.

Contract: `encode_pair(tokenizer, prompt, response, max_length, reserve=0) -> (input_ids, labels)`
with labels -100 on the prompt and equal to input_ids on the response and its end-of-turn token.
Preprocess writes training rows with it and evaluate scores label names with it, so both see the
same tokens (tests/unit/test_preprocess.py checks the processed rows equal it). No data-stack
imports: only a tokenizer is needed.
"""

from __future__ import annotations

IGNORE = -100  # label value the causal-LM loss skips
# When a prompt is too long, its middle is cut: the first 3/4 of the prompt budget come from its
# start (system message, instruction) and the last 1/4 from its end (question + assistant marker).
_TAIL_FRACTION = 4


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def batch_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def end_of_turn(tokenizer) -> list[int]:
    """Token that ends the response: eos (`<|im_end|>` for ChatML models), so the model learns to stop."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def label_reserve(tokenizer, label_names: list[str]) -> int:
    """Response budget of the longest label name (its tokens + end-of-turn); 0 without labels.

    Rows whose responses are label names cut their prompt to this budget whatever their own label,
    so all label names of a row follow one and the same prompt (scored through one prompt cache).
    """
    if not label_names:
        return 0
    return max(len(ids) for ids in batch_token_ids(tokenizer, list(label_names))) + len(end_of_turn(tokenizer))


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, reserve: int = 0) -> tuple[list[int], list[int]]:
    """Tokenise a rendered prompt and its response into (input_ids, labels).

    input_ids = [bos?] + prompt tokens + response tokens + end-of-turn; labels are -100 on the
    prompt and equal to input_ids on the response and end-of-turn, so the loss covers exactly the
    response. Prompt and response are tokenised separately so the boundary never merges.
    Over `max_length`: the response is kept whole (cut only if it alone exceeds half of
    max_length), and the prompt loses its middle (start and end kept) to fit beside a response of
    `max(len(response), reserve)` tokens (`label_reserve`). Returns lists of ints.
    """
    ids, labels, _ = join_pair(tokenizer, token_ids(tokenizer, prompt), token_ids(tokenizer, response), max_length,
                               reserve)
    return ids, labels


def join_pair(tokenizer, prompt_ids: list[int], response_ids: list[int], max_length: int,
              reserve: int = 0) -> tuple[list[int], list[int], bool]:
    """`encode_pair` from already tokenised parts; also says whether anything was cut."""
    prompt_ids = with_bos(tokenizer, prompt_ids)
    response_ids = response_ids + end_of_turn(tokenizer)
    n_prompt, n_response = len(prompt_ids), len(response_ids)
    if n_prompt + n_response > max_length:  # the response is cut only when it alone is too long
        response_ids = response_ids[: max(max_length - n_prompt, max_length // 2)]
    budget = max_length - max(len(response_ids), min(reserve, max_length // 2))
    if n_prompt > budget:
        tail = budget // _TAIL_FRACTION
        prompt_ids = prompt_ids[: budget - tail] + (prompt_ids[-tail:] if tail else [])
    truncated = len(prompt_ids) < n_prompt or len(response_ids) < n_response
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids, truncated
