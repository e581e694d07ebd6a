"""The MLflow model of a registered adapter (MLflow "models from code"; MLflow loads this file).

Not imported by the pipeline: tasks/register.py hands this file to `mlflow.pyfunc.save_model`,
MLflow copies it into the model version and executes it on load. Loading therefore never
unpickles anything, and the file is self-contained (torch, transformers, peft, mlflow only) so a
serving process needs no peftflow code.

The model version holds the adapter only (artifact `adapter`: safetensors + adapter_config.json
+ tokenizer). The base model is referenced by `model_config`:
  base_path, base_spec, base_weights_sha256 - loaded from base_path, refused if its weights hash differs;
  task - "causal-lm" (predict returns generated text) or "classification" (predict returns label names);
  label_names, max_new_tokens, chat_template (bool), system_prompt.
Input: a list of prompt strings (or a one-column DataFrame, e.g. column `prompt`). Params: `max_new_tokens`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
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

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        if hasattr(model_input, "columns"):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        else:
            prompts = [str(p) for p in model_input]
        if not prompts:
            return []
        params = params or {}
        texts = [self.render(p) for p in prompts]
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
            )
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


set_model(PeftAdapterModel())
