"""`mlflow models serve -m models:/<name>@champion --env-manager local` answers /invocations with text,
for plain prompt strings and for OpenAI-style chat requests (one server, a chat-format version)."""

from __future__ import annotations

import os
import subprocess

import mlflow
import pytest
import requests
import torch

from support.adapters import make_trained_project
from support.services import MLFLOW, free_port, stop_group, wait_http
from tasks import register, registry, tracking
from tasks.chat import stop_token_ids

pytestmark = pytest.mark.integration

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
NEW_TOKENS = 6


def direct_reply(model, tokenizer, messages: list[dict]) -> str:
    """The adapter itself, greedy from the same rendered prompt, stopping at the end-of-turn ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(tokenizer))
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_serve_champion_generates_text_and_chat_replies(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.ENV_RUN_ID, raising=False)
    # A random tiny model mostly repeats one token; with lora_A seeded too (global RNG) and this
    # lora_B seed, the two conversations get different replies here, so equality is discriminating.
    torch.manual_seed(0)
    params, model, tok = make_trained_project(tmp_path / "proj", seed=17, overrides={"preprocess": {"format": "chat"}})
    result = register.run(params)
    assert result.champion == result.version
    local = registry.download_model(f"models:/{params.register.model_name}/{result.version}", params, tmp_path / "dl")
    config = registry.model_config_of(local)
    assert config["task"] == "chat" and config["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    short = CONVERSATION[1:2]
    expected, expected_short = direct_reply(model, tok, CONVERSATION), direct_reply(model, tok, short)
    # the registered model renders exactly the prompt the adapter's own tokenizer does
    served_model = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
    assert served_model.render_chat(CONVERSATION) == tok.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(params)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(MLFLOW), "models", "serve", "-m", f"models:/{params.register.model_name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        wait_http(f"http://127.0.0.1:{port}/ping", 90, proc)

        def post(payload: dict):
            r = requests.post(url, timeout=60, json=payload)
            assert r.status_code == 200, r.text
            return r.json()

        # plain prompt strings, as before
        predictions = post({"inputs": ["Review: a fine film", "hello"], "params": {"max_new_tokens": 4}})["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
        assert len(post({"dataframe_records": [{"prompt": "hi"}]})["predictions"]) == 1

        # chat: MLflow's wrapped form (`inputs` + `params`) and its unified LLM form (top-level
        # `messages`; params named in the schema at top level; the answer is the bare list)
        gen = {"max_new_tokens": NEW_TOKENS}
        assert post({"inputs": {"messages": CONVERSATION}, "params": gen})["predictions"] == [expected]
        assert post({"messages": CONVERSATION, **gen}) == [expected]
        tools = [{"type": "function", "function": {"name": "colour", "description": "a colour",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        assert post({"messages": CONVERSATION, "tools": tools, **gen}) == [expected]  # ChatML ignores tools
        # several conversations, of different lengths: a list of requests, or a `messages` column
        many = post({"inputs": [{"messages": CONVERSATION}, {"messages": short}], "params": gen})["predictions"]
        records = post({"dataframe_records": [{"messages": CONVERSATION}, {"messages": short}],
                        "params": gen})["predictions"]
        assert many == records == [expected, expected_short]

        bad = requests.post(url, timeout=30, json={"inputs": {"messages": [{"content": "no role"}]}})
        assert bad.status_code == 400 and "conversation" in bad.text
    finally:
        stop_group(proc)
        log.close()
        if proc.returncode not in (0, -15, None):
            print((tmp_path / "serve.log").read_text()[-3000:])
