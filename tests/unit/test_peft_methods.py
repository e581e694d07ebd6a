"""Every PEFT method of `train.peft` trains 2 steps, saves, reloads and gives the same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from tasks import models, peft_methods, train
from tasks.config import PeftConfig, load_params
from tasks.errors import ConfigError
from support.training import tiny_project

METHODS = [
    {"method": "lora"},
    {"method": "lora", "use_dora": True},
    {"method": "lora", "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    {"method": "lora", "init": "gaussian"},
    {"method": "lora", "init": "pissa_niter_4"},
    {"method": "lora", "init": "olora"},
    {"method": "adalora"},
    {"method": "ia3"},
    {"method": "loha"},
    {"method": "lokr"},
    {"method": "vera"},
    {"method": "oft"},
    {"method": "prompt_tuning", "num_virtual_tokens": 4},
    {"method": "prefix_tuning", "num_virtual_tokens": 4},
    {"method": "p_tuning", "num_virtual_tokens": 4},
]


def _id(m: dict) -> str:
    return "-".join(str(v) if not isinstance(v, list) else "+".join(v) for v in m.values())


@pytest.mark.parametrize("peft", METHODS, ids=_id)
def test_method_trains_saves_and_reloads_identically(tmp_path, peft):
    params = load_params(tiny_project(tmp_path / "p", {"max_steps": 2, "save_steps": 100, "learning_rate": 1.0e-2,
                                                       "peft": {"r": 4, **peft}}))
    result, trained = train.fit(params)
    assert result.steps == 2 and result.final_loss is not None

    resolved = models.resolve(params.model)
    tok = models.load_tokenizer(resolved)
    batch = tok(["Review: a warm film\nSentiment: ", "Review: dull\nSentiment: "], return_tensors="pt", padding=True)
    n = batch["input_ids"].shape[1]
    trained.eval()
    reloaded = PeftModel.from_pretrained(models.load_model(resolved), result.adapter_dir).eval()
    base = models.load_model(resolved).eval()
    with torch.no_grad():
        got, want = reloaded(**batch).logits[:, -n:], trained(**batch).logits[:, -n:]
        plain = base(**batch).logits
    # PiSSA/OLoRA are saved converted to plain LoRA against the untouched base: float error only
    atol = 1e-4 if peft_methods.needs_weight_conversion(PeftConfig(**peft)) else 1e-6
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-6), "the adapter changed nothing: it did not train"


@pytest.mark.parametrize("init,msg", [("eva", "data-driven"), ("loftq", "quantize_4bit"), ("bogus", "not a LoRA init")])
def test_unsupported_lora_init_is_a_config_error(init, msg):
    with pytest.raises(ConfigError, match=f"train.peft.init = '{init}'.*{msg}"):
        peft_methods.build(PeftConfig(init=init), task_type="CAUSAL_LM", max_steps=10)


def test_lora_only_options_are_refused_for_other_methods():
    with pytest.raises(ConfigError, match="apply to method 'lora' only"):
        peft_methods.build(PeftConfig(method="ia3", use_dora=True), task_type="CAUSAL_LM", max_steps=10)


def test_last_layers_adapts_only_the_top_layers():
    from tasks.config import PeftConfig
    from tasks.errors import ConfigError

    config = peft_methods.build(PeftConfig(last_layers=3), task_type="CAUSAL_LM", max_steps=4, num_layers=30)
    assert config.layers_to_transform == [27, 28, 29]
    with pytest.raises(ConfigError, match="last_layers"):
        peft_methods.build(PeftConfig(last_layers=31), task_type="CAUSAL_LM", max_steps=4, num_layers=30)
    with pytest.raises(ConfigError, match="last_layers"):
        peft_methods.build(PeftConfig(method="prompt_tuning", last_layers=2), task_type="CAUSAL_LM",
                           max_steps=4, num_layers=30)
