"""The MLflow model of a registered adapter (MLflow "models from code"; MLflow loads this file).

Not imported by the pipeline: tasks/register.py hands this file to `mlflow.pyfunc.save_model`,
MLflow copies it into the model version and executes it on load. Loading therefore never
unpickles anything, and the file is self-contained (torch, transformers, peft, mlflow only) so a
serving process needs no peftflow code.

The model version holds the adapter only (artifact `adapter`: safetensors + adapter_config.json
+ tokenizer). The base model is referenced by `model_config`:
  base_path, base_spec, base_weights_sha256 - loaded from base_path, refused if its weights hash differs;
  task - "causal-lm" (instruction/text), "chat" (preprocess.format chat; predict returns the
  assistant reply) or "classification" (predict returns label names);
  label_names, max_new_tokens, chat_template (bool), system_prompt,
  stop_token_ids - ids greedy generation stops at (eos + the template's end-of-turn token, e.g.
  `<|im_end|>`), computed at registration; absent in older versions (the model's own eos then).
Input, one output string per item (params: `max_new_tokens`):
- prompt strings: a list (or one string), or a DataFrame whose `prompt` (else first) column holds them;
  rendered as one user turn (with `system_prompt`) when `chat_template` is on;
- OpenAI-style chat (causal-lm and chat versions): `{"messages": [{"role": ..., "content": ...}, ...],
  "tools": [...]?}` (one conversation; a list of message lists under `messages` is several), a list of
  such dicts, or a DataFrame with a `messages` column (and optional `tools`); rendered with the
  tokenizer's chat template (`add_generation_prompt=True`, `tools=` when given). A conversation
  without a system message gets `system_prompt` for causal-lm versions (as in their training);
  chat versions keep conversations as sent, as their training did.
Bad input raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with 400.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import set_model


def weights_sha256(folder: Path) -> str:
    """Same definition as tasks.models.weights_sha256: sha256 over (name, sha256) of each *.safetensors."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no *.safetensors weights in {folder}")
    for f in files:
        fh = hashlib.sha256()
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                fh.update(chunk)
        h.update(f"{f.name}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def _plain(value):
    """Lists/dicts/str from what MLflow's parsers hand over (numpy object arrays, pandas cells)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays and scalars, pandas Series
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _bad_input(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _conversation(messages, where: str) -> list[dict]:
    messages = _plain(messages)
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise _bad_input(f"{where}: a conversation is a non-empty list of messages "
                         f"{{'role': ..., 'content': ...}}, got {str(messages)[:200]}")
    return messages


def _tools(tools) -> list | None:
    tools = _plain(tools)
    return tools if isinstance(tools, list) and tools else None  # None, NaN (a missing cell) or [] -> no tools


def _requests(model_input) -> list:
    """Each item: a prompt string, or a (messages, tools) conversation."""
    if hasattr(model_input, "columns"):
        if "messages" in model_input.columns:
            tools = model_input["tools"] if "tools" in model_input.columns else [None] * len(model_input)
            return [(_conversation(m, f"row {i}"), _tools(t))
                    for i, (m, t) in enumerate(zip(model_input["messages"], tools))]
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column]]
    data = _plain(model_input)
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        if "messages" not in data:
            raise _bad_input(f"a dict input is a chat request {{'messages': [...]}}; got keys {sorted(data)}")
        messages = data["messages"]
        many = isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages)
        return [(_conversation(m, "messages"), _tools(data.get("tools"))) for m in (messages if many else [messages])]
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            if "messages" not in item:
                raise _bad_input(f"item {i}: a dict item is a chat request {{'messages': [...]}}; got keys {sorted(item)}")
            out.append((_conversation(item["messages"], f"item {i}"), _tools(item.get("tools"))))
        else:
            out.append(str(item))
    return out


class PeftAdapterModel(mlflow.pyfunc.PythonModel):
    """Base model (by reference, hash-checked) + the registered PEFT adapter, in fp32."""

    def load_context(self, context) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        cfg = dict(context.model_config or {})
        self.config = cfg
        base = Path(cfg["base_path"])
        if not base.is_dir():
            raise RuntimeError(
                f"base model folder {base} (model.base {cfg.get('base_spec')!r}) does not exist on this machine; "
                f"materialise it first (any peftflow stage with that model.base does)"
            )
        digest = weights_sha256(base)
        if digest != cfg["base_weights_sha256"]:
            raise RuntimeError(
                f"base model {base} has weights sha256 {digest}, but this adapter was trained on "
                f"{cfg['base_weights_sha256']}; refusing to combine them"
            )
        adapter = Path(context.artifacts["adapter"])
        common = dict(dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
        if cfg.get("task") == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=len(cfg["label_names"]), **common)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **common)
        self.model = PeftModel.from_pretrained(model, adapter).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def render(self, prompt: str) -> str:
        """The text the model sees: the prompt in the chat template when training used one."""
        if not (self.config.get("chat_template") and self.tokenizer.chat_template):
            return prompt
        system = self.config.get("system_prompt")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_chat(self, messages: list[dict], tools: list | None = None) -> str:
        """A conversation in the chat template, ending in the assistant generation prompt."""
        if self.config.get("task") == "classification":
            raise _bad_input("this version is a classifier: send texts, not chat messages")
        if not self.tokenizer.chat_template:
            raise _bad_input("this version's tokenizer has no chat template: send prompt strings")
        system = self.config.get("system_prompt")
        if system and self.config.get("task") != "chat" and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}] + messages
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        requests = _requests(model_input)
        if not requests:
            return []
        params = params or {}
        texts = [self.render(r) if isinstance(r, str) else self.render_chat(*r) for r in requests]
        with torch.no_grad():
            if self.config.get("task") == "classification":
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
                ids = self.model(**enc).logits.argmax(-1).tolist()
                return [self.config["label_names"][i] for i in ids]
            self.tokenizer.padding_side = "left"  # generation continues from the last real token
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = self.model.generate(
                **enc, do_sample=False,
                max_new_tokens=int(params.get("max_new_tokens") or self.config.get("max_new_tokens", 8)),
                pad_token_id=self.tokenizer.pad_token_id,
                # greedy decoding ends at eos or the template's end-of-turn token (`<|im_end|>`)
                eos_token_id=list(self.config.get("stop_token_ids") or []) or None,
            )
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


set_model(PeftAdapterModel())
