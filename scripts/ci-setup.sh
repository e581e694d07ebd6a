#!/usr/bin/env bash
# Install what CI needs beyond `make setup`, from the project's own files only:
#   - Debian: docker-compose (validates docker/compose.yaml; no Docker engine needed for `config`),
#             chromium + chromium-driver (the MLflow UI test, driven by selenium)
#             and the PostgreSQL server (integration tests start their own cluster on 127.0.0.1)
#   - .venv:  requirements-services.lock (hadolint, psycopg2-binary, boto3, dvc-s3, moto server),
#             constrained by requirements.lock so no existing pin moves
# Idempotent: skips what is already there. Needs root for apt (CI and the dev machines run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "ci-setup: $VENV is missing; run 'make setup' first" >&2
    exit 1
fi

need_apt=()
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need_apt+=(postgresql)
# headless browser for the MLflow UI test (alias moved by a person, tests/integration/test_deploy.py)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if (( ${#need_apt[@]} )); then
    if [[ $(id -u) -ne 0 ]]; then
        # Not fatal: the tests that need these skip and say which package is missing.
        echo "ci-setup: WARNING: not root, cannot apt-get install ${need_apt[*]}" >&2
    else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # --no-install-recommends: docker-compose would otherwise pull a Docker engine we cannot run here
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
    fi
fi

"$VENV/bin/pip" install -q --disable-pip-version-check -c requirements.lock -r requirements-services.lock

echo "ci-setup: $("$VENV/bin/hadolint" --version); $(docker-compose version --short 2>/dev/null || echo no docker-compose);" \
     "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1 || echo no postgresql)"
