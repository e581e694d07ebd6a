"""Moving `champion` deploys it: real MLflow server (SQLite, the webhook registered, signed with a
secret), the receiver (flows/webhook.py), a real `prefect server start` running the `deploy` and
`deploy-poll` deployments of prefect.yaml on a process worker, and real `mlflow models serve`
behind the stable front. All on 127.0.0.1; one set of servers for the module.

Versions are real adapters really evaluated (tests/support/deploying.py): v1, v2 good; v3 has a
corrupted artifact; v4's records do not reproduce; v5 good.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import requests

from conftest import REPO
from support.deploy_stack import GEN, PROMPTS, Stack, deploy_stack, wait_for
from support.deploying import sign
from tasks import deploy, promote, serving_target, vllm_target
from tasks.deploy_smoke import DeployError

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deploy_stack(tmp_path_factory.mktemp("deploy"), seeds=(1, 2, 3, 4, 5), tamper=(4,), corrupt=(3,)) as s:
        yield s


def wait_served(stack: Stack, version: str, timeout: float = 150) -> None:
    wait_for(lambda: stack.served() == version, timeout, f"the endpoint to answer with v{version}")


def test_alias_move_via_the_ui_request_deploys_the_version(stack):
    import mlflow

    started = time.monotonic()
    stack.set_alias_as_the_ui_does(stack.v[1])
    wait_served(stack, stack.v[1])
    moved_in = time.monotonic() - started
    _, runs = stack.deploy_runs()
    done = wait_for(lambda: [r for r in stack.deploy_runs()[1] if r.state.is_completed()], 60, "a COMPLETED run")
    assert done and all(r.parameters.get("alias") == "champion" for r in runs)
    # the endpoint's answer is the version's own, loaded directly from the registry
    direct = mlflow.pyfunc.load_model(f"models:/{stack.name}/{stack.v[1]}").predict(PROMPTS, params=GEN)
    served = requests.post(f"{stack.front}/invocations", json={"inputs": PROMPTS, "params": GEN}, timeout=60)
    assert served.json()["predictions"] == list(direct)
    mv = stack.client().get_model_version(stack.name, stack.v[1])
    assert mv.tags[deploy.TAG_DEPLOYED_TARGET] == "mlflow" and mv.tags[deploy.TAG_DEPLOYED_AT]
    status = subprocess.run([sys.executable, "-m", "flows.deploy", "--status", "--params",
                             str(stack.params.root / "params.yaml")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and f"v{stack.v[1]}  mlflow  deployed" in status.stdout, status.stderr
    print(f"FIGURE alias move -> v{stack.v[1]} answering: {moved_in:.1f} s (first deploy, front started)")


def test_blue_green_switch_keeps_answering(stack):
    wait_served(stack, stack.v[1])
    failures, answered = [], set()
    stack.set_alias_as_the_ui_does(stack.v[2])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            r = requests.post(f"{stack.front}/invocations", json={"inputs": ["hi"], "params": GEN}, timeout=30)
            answered.add(r.headers.get("X-Peftflow-Version")) if r.status_code == 200 else failures.append(r.text)
        except requests.RequestException as err:
            failures.append(str(err))
        if stack.v[2] in answered:
            break
        time.sleep(0.1)
    assert not failures and answered == {stack.v[1], stack.v[2]}, (failures[:3], answered)


def test_a_corrupted_or_non_reproducing_version_is_rolled_back(stack):
    wait_served(stack, stack.v[2])
    # corrupted artifact, through the webhook and the deploy deployment: the run fails, champion returns
    _, before = stack.deploy_runs()
    stack.set_alias_as_the_ui_does(stack.v[3])
    failed = wait_for(lambda: [r for r in stack.deploy_runs()[1] if r.id not in {b.id for b in before}
                               and r.state.is_failed()], 240, "the deploy of v3 to fail")
    assert failed
    wait_for(lambda: stack.champion() == stack.v[2], 30, "champion back at v2")
    tags = stack.client().get_model_version(stack.name, stack.v[3]).tags
    assert "corrupted" in tags[deploy.TAG_DEPLOY_FAILED]
    assert stack.served() == stack.v[2]
    # non-reproducing smoke metric, by the task directly (same code the flow runs)
    stack.set_alias_as_the_ui_does(stack.v[4])
    with pytest.raises(DeployError, match="smoke check failed.*champion moved back to v" + stack.v[2]):
        deploy.deploy(stack.params, target=deploy.Target(front_port=stack.front_port))
    assert stack.champion() == stack.v[2] and stack.served() == stack.v[2]
    assert "smoke check failed" in stack.client().get_model_version(stack.name, stack.v[4]).tags[deploy.TAG_DEPLOY_FAILED]
    assert not list((stack.folder / "models").glob(".*tmp"))  # nothing half-written
    entries = deploy.read_log(stack.folder)
    assert [e["status"] for e in entries if e["version"] in (stack.v[3], stack.v[4])] == ["failed", "failed"]


def settle(stack: Stack) -> int:
    """Wait until every deploy run is final and none was added for 5 s (a rollback's own alias move
    triggers one more, idempotent, run); the number of runs."""
    seen, since, deadline = -1, time.monotonic(), time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = stack.deploy_runs()[1]
        if len(runs) != seen or not all(r.state.is_final() for r in runs):
            seen, since = len(runs), time.monotonic()
        elif time.monotonic() - since > 5:
            return seen
        time.sleep(1)
    raise AssertionError("deploy runs did not settle within 240 s")


def _delivery(name: str, alias: str, version: str, timestamp: int | None = None):
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "now",
                       "data": {"name": name, "alias": alias, "version": version}})
    delivery, ts = str(uuid.uuid4()), str(timestamp or int(time.time()))
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts}
    return body, headers, delivery, ts


def test_unsigned_wrongly_signed_or_replayed_deliveries_are_refused(stack):
    url = f"{stack.receiver_url}/mlflow-webhook"
    before, logged = settle(stack), len(deploy.read_log(stack.folder))
    body, headers, delivery, ts = _delivery(stack.name, "champion", stack.v[1])
    assert requests.post(url, data=body, headers=headers, timeout=10).status_code == 401  # unsigned
    wrong = {**headers, "X-MLflow-Signature": sign("not-the-secret", delivery, ts, body)}
    assert requests.post(url, data=body, headers=wrong, timeout=10).status_code == 401
    old_body, old, old_id, old_ts = _delivery(stack.name, "champion", stack.v[1], timestamp=int(time.time()) - 3600)
    old["X-MLflow-Signature"] = sign(stack.secret, old_id, old_ts, old_body)
    assert requests.post(url, data=old_body, headers=old, timeout=10).status_code == 401  # stale
    # a genuine delivery (alias challenger: the trigger ignores it) is accepted once, then a replay refused
    body, headers, delivery, ts = _delivery(stack.name, "challenger", stack.v[1])
    headers["X-MLflow-Signature"] = sign(stack.secret, delivery, ts, body)
    assert requests.post(url, data=body, headers=headers, timeout=10).status_code == 200
    assert requests.post(url, data=body, headers=headers, timeout=10).status_code == 401
    time.sleep(5)
    assert len(stack.deploy_runs()[1]) == before and stack.served() == stack.v[2]
    assert len(deploy.read_log(stack.folder)) == logged


def test_two_quick_moves_end_serving_the_last(stack):
    stack.set_alias_as_the_ui_does(stack.v[1])
    stack.set_alias_as_the_ui_does(stack.v[5])
    wait_served(stack, stack.v[5])
    time.sleep(3)
    wait_for(lambda: all(r.state.is_final() for r in stack.deploy_runs()[1]), 240, "every deploy run to finish")
    assert stack.served() == stack.v[5] and stack.champion() == stack.v[5]


def test_polling_deploys_without_a_webhook(stack):
    [hook] = [h for h in stack.client().list_webhooks() if h.name == "peftflow-deploy"]
    stack.client().update_webhook(hook.webhook_id, status="DISABLED")
    promote.promote(stack.name, stack.v[2], stack.params)  # moved; no webhook now
    time.sleep(3)
    assert stack.served() == stack.v[5]
    dep, _ = stack.deploy_runs("deploy/deploy-poll")
    assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [60.0]
    with stack.api() as c:
        c.create_flow_run_from_deployment(dep.id)  # what the minute schedule creates
    wait_served(stack, stack.v[2])
    # idempotent: a second poll finds it deployed and leaves the server alone
    port = serving_target.current(stack.folder, stack.name, "champion")["port"]
    again = deploy.deploy(stack.params, target=deploy.Target(front_port=stack.front_port))
    assert again.status == "unchanged" and serving_target.current(stack.folder, stack.name, "champion")["port"] == port


def _browser():
    """Headless Debian Chromium through Selenium (scripts/ci-setup.sh installs both); the flags
    keep it off the closed network (no background connections, no first-run, no sync)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing; bash scripts/ci-setup.sh")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian chromium + chromium-driver are missing; bash scripts/ci-setup.sh (CI does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def test_moving_champion_in_the_mlflow_ui_deploys_it(stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    [hook] = [h for h in stack.client().list_webhooks() if h.name == "peftflow-deploy"]
    stack.client().update_webhook(hook.webhook_id, status="ACTIVE")
    target = stack.v[1]
    assert stack.served() != target
    browser = _browser()
    try:
        browser.get(f"{stack.mlflow.url}/#/models/{stack.name}/versions/{target}")
        wait = WebDriverWait(browser, 60)
        # the version page's "Aliases: Add" opens the edit-aliases dialog; type the alias, Enter, Save
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Add']"))).click()
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[role=dialog] input[role=combobox]")))
        box.send_keys("champion")
        box.send_keys(Keys.ENTER)
        save = "[data-component-id='mlflow.edit-aliases-modal.save-button']"
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, save))).click()
        wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "[role=dialog]")))
    except Exception:
        browser.save_screenshot(str(tmp_path / "mlflow-ui.png"))
        raise
    finally:
        browser.quit()
    assert stack.champion() == target
    wait_served(stack, target)


def test_vllm_target_loads_through_the_documented_api(stack, tmp_path):
    from support.deploying import VllmRecorder

    if stack.champion() is None:  # run alone (-k vllm): nothing moved yet
        promote.promote(stack.name, stack.v[1], stack.params)
    first = stack.champion()
    other = stack.v[2] if first != stack.v[2] else stack.v[1]
    loras = tmp_path / "loras"
    with VllmRecorder() as vllm:
        target = deploy.Target("vllm", vllm_url=vllm.url, lora_dir=str(loras), max_lora_rank=16)
        assert deploy.deploy(stack.params, target=target).status == "deployed"
        promote.promote(stack.name, other, stack.params)
        assert deploy.deploy(stack.params, target=target).status == "deployed"
        assert deploy.deploy(stack.params, target=target).status == "unchanged"
        name = vllm_target.lora_name
        assert vllm.requests == [
            ("/v1/load_lora_adapter", {"lora_name": name(stack.name, first), "lora_path": str(loras / name(stack.name, first))}),
            ("/v1/load_lora_adapter", {"lora_name": name(stack.name, other), "lora_path": str(loras / name(stack.name, other))}),
            ("/v1/unload_lora_adapter", {"lora_name": name(stack.name, first)})]
        assert vllm.loaded == {name(stack.name, other): str(loras / name(stack.name, other))}
        assert (loras / name(stack.name, other) / "adapter_config.json").is_file()
        # a rank above the server's limit is refused before any request; champion returns to `other`
        promote.promote(stack.name, stack.v[5], stack.params)
        with pytest.raises(DeployError, match="max-lora-rank 2"):
            deploy.deploy(stack.params, target=deploy.Target("vllm", vllm_url=vllm.url, lora_dir=str(loras),
                                                             max_lora_rank=2))
        assert len(vllm.requests) == 3 and stack.champion() == other
