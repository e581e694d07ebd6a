"""Alias move -> new version answering, and availability during switches (docs/benchmarks.md).

    .venv/bin/python bench/deploy_switch.py [--moves 5] [--out bench/results/deploy_switch.json]

The whole path of tests/support/deploy_stack.py (real MLflow server + webhook, receiver, Prefect
server + trigger + process worker, `mlflow models serve` blue/green behind the front) on two
really evaluated random:tiny versions. The champion starts deployed; then `--moves` times: move
`champion` to the other version by the MLflow UI's REST call and time until the front answers
with it. During the first 3 moves a thread sends one request every 100 ms and counts failures
(anything but a 200 answer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tasks.cli import apply_env_defaults  # noqa: E402

apply_env_defaults()

import requests  # noqa: E402

from support.deploy_stack import deploy_stack, wait_for  # noqa: E402


class Prober(threading.Thread):
    """One request every 100 ms to the front; records (time, status or error, version)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.results, self.stop = url, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                r = requests.post(self.url, json={"inputs": ["hi"], "params": {"max_new_tokens": 2}}, timeout=30)
                self.results.append((t, r.status_code, r.headers.get("X-Peftflow-Version")))
            except requests.RequestException as err:
                self.results.append((t, type(err).__name__, None))
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "deploy_switch.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, deploy_stack(Path(tmp), seeds=(1, 2)) as stack:
        a, b = stack.v[1], stack.v[2]
        stack.set_alias_as_the_ui_does(a)
        wait_for(lambda: stack.served() == a, 300, f"v{a} served")
        prober = Prober(f"{stack.front}/invocations")
        prober.start()
        times, current = [], a
        for k in range(args.moves):
            target = b if current == a else a
            started = time.monotonic()
            stack.set_alias_as_the_ui_does(target)
            wait_for(lambda: stack.served() == target, 300, f"v{target} served", interval=0.1)
            times.append(time.monotonic() - started)
            print(f"move {k + 1}: v{current} -> v{target} answering after {times[-1]:.1f} s", flush=True)
            current = target
            if k == 2:
                prober.stop.set()
                prober.join()
                probes = prober.results
            time.sleep(2)
        if args.moves < 3:
            prober.stop.set()
            prober.join()
            probes = prober.results
    failed = [p for p in probes if p[1] != 200]
    result = {"moves": len(times), "seconds": [round(t, 2) for t in times],
              "median_s": round(statistics.median(times), 2), "probe_requests": len(probes),
              "probe_failed": len(failed), "probe_versions": sorted({p[2] for p in probes if p[2]}),
              "failures": failed[:5]}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
