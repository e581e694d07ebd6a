"""LoRA training throughput: the project's fast path (tasks.fastpath.prepare + HF Trainer) against
plain HF Trainer + peft, on random-init Llama shapes, in one run on one GPU.

    python -m bench.lora_throughput --preset goals --steps 55 --warmup 5 --out-dir "$OUT"

Each config runs in its own subprocess (Liger patches transformers classes globally, and each
run's peak memory must be its own). Every run builds the same seeded random-init bf16 model on
the GPU, wraps it in peft LoRA (r=16, alpha=32, dropout 0, all-linear), and trains with the HF
Trainer (bf16, AdamW, lr 2e-4 constant, grad clip 1.0) on the same seeded data:
- dense: sequences of exactly `seq` tokens (Zipf-distributed ids, so the loss moves);
- sft: seeded log-normal lengths (mean ~600, max 4096); the baseline pads each micro-batch to
  its longest example, the fast path packs it.
Reported per run: non-padding tokens/s (median over the timed steps, after `--warmup` steps),
useful model TFLOP/s and MFU vs 790 TFLOP/s (4*N_matmul + 6*N_lora per token plus 6*L*d*s_eff
with s_eff = half of each document's own length), peak memory allocated/reserved, and the first
20 losses, which the driver compares with the baseline run of the same batches (`parity_with`).
Results: <out-dir>/lora_throughput.json (+ a table on stdout, + profile_*.txt for --profile runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 790.0  # measured bf16 dense matmul on the lent H200 (shared/notes/gpu.md)
PARITY_STEPS = 20


def _cfg(name, shape, regime, path, micro, steps, seq=2048, parity_with=None, profile=False, quantize=False, **fast):
    return dict(name=name, shape=shape, regime=regime, path=path, micro=micro, steps=steps, seq=seq,
                parity_with=parity_with, profile=profile, quantize=quantize, fast=fast)


def presets(steps: int) -> dict[str, list[dict]]:
    s = steps
    return {
        "smoke": [
            _cfg("1b-base-b4", "llama-1b", "dense", "baseline", 4, 12),
            _cfg("1b-fast-b4", "llama-1b", "dense", "fast", 4, 12, parity_with="1b-base-b4"),
            _cfg("1b-sft-base-b8", "llama-1b", "sft", "baseline", 8, 12),
            _cfg("1b-sft-fast-b8", "llama-1b", "sft", "fast", 8, 12, parity_with="1b-sft-base-b8"),
        ],
        # One device call (~8 min at --steps 55): every goal of issue E against its baseline.
        "goals": [
            _cfg("8b-base-b4", "llama-8b", "dense", "baseline", 4, s),
            _cfg("8b-fast-b4", "llama-8b", "dense", "fast", 4, s, parity_with="8b-base-b4"),
            _cfg("1b-base-b16", "llama-1b", "dense", "baseline", 16, s),
            _cfg("1b-fast-b14", "llama-1b", "dense", "fast", 14, s),
            _cfg("1b-sft-base-b8", "llama-1b", "sft", "baseline", 8, s),
            _cfg("1b-sft-fast-b8", "llama-1b", "sft", "fast", 8, s, parity_with="1b-sft-base-b8"),
            _cfg("1b-sft-fast-b32", "llama-1b", "sft", "fast", 32, s),
            _cfg("8b-sft-base-b4", "llama-8b", "sft", "baseline", 4, s),
            _cfg("8b-sft-fast-b16", "llama-8b", "sft", "fast", 16, s),
        ],
        "main": [
            _cfg("8b-base-b4", "llama-8b", "dense", "baseline", 4, s),
            _cfg("8b-fast-b4", "llama-8b", "dense", "fast", 4, s, parity_with="8b-base-b4"),
            _cfg("8b-fast-b8", "llama-8b", "dense", "fast", 8, s),
            _cfg("1b-base-b16", "llama-1b", "dense", "baseline", 16, s),
            _cfg("1b-fast-b16", "llama-1b", "dense", "fast", 16, s, parity_with="1b-base-b16"),
            _cfg("1b-fast-b8", "llama-1b", "dense", "fast", 8, s),
            _cfg("8b-fast-b4-profile", "llama-8b", "dense", "fast", 4, 10, profile=True),
            _cfg("1b-fast-b12", "llama-1b", "dense", "fast", 12, s),
            _cfg("1b-fast-b14", "llama-1b", "dense", "fast", 14, s),
        ],
        "sft": [
            _cfg("1b-sft-base-b8", "llama-1b", "sft", "baseline", 8, s),
            _cfg("1b-sft-fast-b8", "llama-1b", "sft", "fast", 8, s, parity_with="1b-sft-base-b8"),
            _cfg("1b-sft-base-b16", "llama-1b", "sft", "baseline", 16, s),
            _cfg("1b-sft-fast-b16", "llama-1b", "sft", "fast", 16, s, parity_with="1b-sft-base-b16"),
            _cfg("1b-sft-fast-b32", "llama-1b", "sft", "fast", 32, s),
            _cfg("8b-sft-base-b4", "llama-8b", "sft", "baseline", 4, s),
            _cfg("8b-sft-fast-b4", "llama-8b", "sft", "fast", 4, s, parity_with="8b-sft-base-b4"),
            _cfg("8b-sft-fast-b16", "llama-8b", "sft", "fast", 16, s),
        ],
        # Issue L: regional torch.compile (Liger keeps only the loss; runs 7-8 also measured Liger's layer
        # kernels inside compiled layers: no gain) and QLoRA (4-bit NF4 base) against bf16 LoRA.
        "scale": [
            _cfg("8b-base-b4", "llama-8b", "dense", "baseline", 4, s),
            _cfg("8b-fast-b4", "llama-8b", "dense", "fast", 4, s, parity_with="8b-base-b4"),
            _cfg("8b-fast-b4-compile", "llama-8b", "dense", "fast", 4, s, parity_with="8b-base-b4", compile=True),
            _cfg("8b-fast-b4-compile-unfused", "llama-8b", "dense", "fast", 4, s, parity_with="8b-base-b4",
                 compile=True, fused_lora=False),
            # packed rows of varying length: the compiled layers see a new total length every step
            _cfg("1b-sft-fast-b8", "llama-1b", "sft", "fast", 8, s),
            _cfg("1b-sft-fast-b8-compile", "llama-1b", "sft", "fast", 8, s, parity_with="1b-sft-fast-b8", compile=True),
            _cfg("8b-qlora-base-b4", "llama-8b", "dense", "baseline", 4, s, parity_with="8b-base-b4", quantize=True),
            _cfg("8b-qlora-fast-b4", "llama-8b", "dense", "fast", 4, s, parity_with="8b-base-b4", quantize=True),
        ],
        "ablate": [
            _cfg("1b-fast-b16-noliger", "llama-1b", "dense", "fast", 16, s, liger=False),
            _cfg("1b-fast-b16-nopack", "llama-1b", "dense", "fast", 16, s, packing=False),
            _cfg("1b-fast-b16-cast", "llama-1b", "dense", "fast", 16, s, adapter_input_cast=True),
            _cfg("1b-fast-b16-unfused", "llama-1b", "dense", "fast", 16, s, fused_lora=False),
            _cfg("1b-fast-b16-compile", "llama-1b", "dense", "fast", 16, s, compile=True),
            _cfg("1b-fast-b16-profile", "llama-1b", "dense", "fast", 16, 10, profile=True),
        ],
    }


# ----------------------------------------------------------------------------- data


def make_examples(regime: str, n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Seeded synthetic examples. Ids are Zipf-like over the first 4096 ids so LoRA can learn them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if regime == "dense":
        lengths = np.full(n, seq)
    else:  # log-normal, mean ~600 tokens, clipped to [16, 4096]
        sigma = 0.8
        lengths = np.clip(np.rint(rng.lognormal(np.log(600) - sigma**2 / 2, sigma, n)), 16, 4096).astype(int)
    ranks = np.arange(1, 4097)
    p = 1.0 / ranks
    p /= p.sum()
    out = []
    for length in lengths:
        ids = rng.choice(min(4096, vocab), size=int(length), p=p).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


class PaddingCollator:
    """Plain HF-style baseline collator: right-pad to the longest example, -100 labels on padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class CountingCollator:
    """Wraps a collator; records each batch's document lengths (non-padding tokens)."""

    def __init__(self, inner):
        self.inner = inner
        self.docs: list[list[int]] = []

    def __call__(self, features):
        self.docs.append([len(f["input_ids"]) for f in features])
        return self.inner(features)


# ----------------------------------------------------------------------------- one run


def count_params(model) -> tuple[int, int]:
    """(N_matmul: frozen base matmul weights incl. the LM head, N_lora: trainable adapter params)."""
    import torch

    n_matmul = sum(m.weight.numel() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_matmul, n_lora


def step_flops(docs: list[int], n_matmul: int, n_lora: int, layers: int, d_model: int) -> float:
    return sum(n * (4 * n_matmul + 6 * n_lora) + 6 * layers * d_model * n * (n / 2) for n in docs)


def qlora_model(shape: str, config):
    """The same seeded bf16 weights as the bf16 runs, loaded 4-bit NF4 the way tasks/train.py does
    for `train.peft.quantize_4bit` (bitsandbytes quantises at load time, so the bf16 model is saved
    once to local disk first), then `prepare_model_for_kbit_training`."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    folder = Path(tempfile.gettempdir()) / f"peftflow-bench-{shape}-bf16"
    if not (folder / "config.json").is_file():
        with torch.device("cuda"):
            full = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        full.save_pretrained(str(folder) + ".tmp", safe_serialization=True)
        os.rename(str(folder) + ".tmp", folder)
        del full
        torch.cuda.empty_cache()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                             attn_implementation="sdpa", device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def run_one(cfg: dict, warmup: int, out_dir: Path) -> dict:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    sys.path.insert(0, str(REPO))
    from tasks import fastpath, models
    from tasks.config import FastPathConfig

    config = models.random_config(cfg["shape"])
    torch.manual_seed(0)
    t_build = time.perf_counter()
    if cfg.get("quantize"):
        model = qlora_model(cfg["shape"], config)
    else:
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(1)  # the same LoRA init whatever building the base consumed
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    n_matmul, n_lora = count_params(model)
    build_s = time.perf_counter() - t_build

    steps, micro = cfg["steps"], cfg["micro"]
    data = make_examples(cfg["regime"], steps * micro, cfg["seq"], config.vocab_size)
    collator = PaddingCollator(config.pad_token_id)
    extra: dict = {}
    applied: tuple = ()
    if cfg["path"] == "fast":
        model, collator, extra = fastpath.prepare(model, collator, FastPathConfig(**cfg["fast"]))
        applied = model.peftflow_fast_path
    counting = CountingCollator(collator)

    times: list[float] = []
    losses: list = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            losses.append(loss.detach().float())
            return out

    args = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=micro,
                gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="constant",
                bf16=True, logging_steps=10, save_strategy="no", report_to="none", dataloader_num_workers=0,
                remove_unused_columns=False, seed=42, max_grad_norm=1.0, optim="adamw_torch", disable_tqdm=True)
    args.update(extra)
    trainer = Recording(model=model, args=TrainingArguments(**args), train_dataset=data,
                        data_collator=counting, callbacks=[Timer()])
    torch.cuda.reset_peak_memory_stats()
    prof = None
    if cfg["profile"]:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA],
                                      schedule=torch.profiler.schedule(wait=max(warmup - 1, 0), warmup=1, active=3, repeat=1))

        class Stepper(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                prof.step()

        trainer.add_callback(Stepper())
        prof.__enter__()
    trainer.train()
    if prof is not None:
        prof.__exit__(None, None, None)
        try:
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
        except (AttributeError, KeyError, ValueError):
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
        (out_dir / f"profile_{cfg['name']}.txt").write_text(table)
        print(table)

    durations = [b - a for a, b in zip(times, times[1:])]
    docs = counting.docs[:len(durations)]
    timed = range(warmup, len(durations))
    toks = [sum(docs[i]) / durations[i] for i in timed]
    flops = [step_flops(docs[i], n_matmul, n_lora, config.num_hidden_layers, config.hidden_size) / durations[i]
             for i in timed]
    padded = [len(d) * max(d) for d in docs] if cfg["path"] == "baseline" else [sum(d) for d in docs]
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        liger_v = version("liger-kernel")
    except ImportError:
        liger_v = None
    tflops = statistics.median(flops) / 1e12
    return {
        **{k: cfg[k] for k in ("name", "shape", "regime", "path", "micro", "seq", "steps", "parity_with")},
        "options": cfg["fast"], "applied": list(applied), "trainer_kwargs": {k: str(v) for k, v in extra.items()},
        "timed_steps": len(toks), "warmup_steps": warmup,
        "tokens_per_step_mean": statistics.mean(sum(d) for d in docs),
        "padding_fraction": 1 - sum(sum(d) for d in docs) / sum(padded),
        "quantize_4bit": bool(cfg.get("quantize")), "warmup_s": sum(durations[:warmup]),
        "tokens_per_s": statistics.median(toks), "tokens_per_s_p10": sorted(toks)[len(toks) // 10],
        "tokens_per_s_p90": sorted(toks)[(9 * len(toks)) // 10],
        "model_tflops": tflops, "mfu": tflops / PEAK_TFLOPS,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": [x.item() for x in losses[:PARITY_STEPS]],
        "n_matmul": n_matmul, "n_lora": n_lora, "build_s": build_s,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "liger_kernel": liger_v, "cuda": torch.version.cuda},
        "gpu": torch.cuda.get_device_name(),
    }


# ----------------------------------------------------------------------------- driver


def parity(results: list[dict]) -> None:
    """Add `loss_parity_max_rel` (max relative |loss - baseline loss| over the first 20 steps)."""
    by_name = {r["name"]: r for r in results if "losses" in r}
    for r in results:
        ref = by_name.get(r.get("parity_with") or "")
        if ref and r.get("losses"):
            pairs = list(zip(r["losses"], ref["losses"]))
            r["loss_parity_max_rel"] = max(abs(a - b) / abs(b) for a, b in pairs)
            r["loss_parity_ok"] = r["loss_parity_max_rel"] <= 0.01


def table(results: list[dict]) -> str:
    rows = ["| run | path | micro | tokens/step | tokens/s | TFLOP/s | MFU | alloc GiB | reserved GiB | parity |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | {r['path']} | {r['micro']} | error: {r['error'][:80]} |||||||")
            continue
        par = f"{r['loss_parity_max_rel']:.2e}" if "loss_parity_max_rel" in r else "ref" if r["path"] == "baseline" else ""
        rows.append(f"| {r['name']} | {r['path']} | {r['micro']} | {r['tokens_per_step_mean']:.0f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.0f} | {r['mfu']:.0%} | {r['peak_alloc_gib']:.1f} | "
                    f"{r['peak_reserved_gib']:.1f} | {par} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", help="goals | smoke | main | sft | scale | ablate (repeatable)")
    ap.add_argument("--only", help="comma-separated run names within the presets")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.one:
        cfg = json.loads(a.one)
        res = run_one(cfg, min(a.warmup, max(cfg["steps"] - 3, 1)), out_dir)
        print("RESULT " + json.dumps(res), flush=True)
        return
    all_presets = presets(a.steps)
    cfgs = [c for p in (a.preset or ["main"]) for c in all_presets[p]]
    if a.only:
        keep = set(a.only.split(","))
        cfgs = [c for c in cfgs if c["name"] in keep]
    results = []
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for cfg in cfgs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bench.lora_throughput", "--one", json.dumps(cfg),
                               "--warmup", str(a.warmup), "--out-dir", str(out_dir)],
                              cwd=REPO, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            res = {**cfg, "error": err[0]}
            (out_dir / f"error_{cfg['name']}.txt").write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
        else:
            res = json.loads(lines[-1][len("RESULT "):])
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"{cfg['name']}: " + (f"{res['tokens_per_s']:,.0f} tok/s, {res['peak_alloc_gib']:.1f} GiB, "
                                    f"{res['wall_s']:.0f}s" if "error" not in res else f"ERROR {res['error']}"),
              flush=True)
        parity(results)
        doc = {"command": " ".join(sys.argv), "started": started, "steps": a.steps, "warmup": a.warmup,
               "peak_tflops": PEAK_TFLOPS, "results": results}
        (out_dir / "lora_throughput.json").write_text(json.dumps(doc, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
