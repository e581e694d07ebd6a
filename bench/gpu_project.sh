# Sourced by bench/gpu_flow.sh and bench/gpu_ddp.sh: the environment and a fresh project on the
# GPU machine. Puts the dependencies bench/gpu_site.sh packed (.gpu-site/site.tar.xz) on
# PYTHONPATH; TARBALL= (empty) uses the python3 on PATH as it is (a CPU check of the scripts here).
# `new_project DIR`: a copy of the repository with its own git history, then cd into it.
: "${OUT:?set OUT to a folder for the results}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$REPO/dvc.yaml" ] && [ -d "$REPO/flows" ] || { echo "$REPO is not the peftflow repository" >&2; exit 2; }
TARBALL=${TARBALL-$REPO/.gpu-site/site.tar.xz}
if [ -n "$TARBALL" ]; then
  SITE=/tmp/peftflow-site
  rm -rf "$SITE" && mkdir -p "$SITE" && tar -C "$SITE" -xJf "$TARBALL"
  export PYTHONPATH=$SITE
  command -v git >/dev/null || export PATH=$REPO/.gpu-site/bin:$PATH  # the image may lack git
fi
export GIT_AUTHOR_NAME=peftflow GIT_AUTHOR_EMAIL=peftflow@localhost GIT_COMMITTER_NAME=peftflow GIT_COMMITTER_EMAIL=peftflow@localhost
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

new_project() {
  rm -rf "$1" /tmp/.dvc-storage  # the committed DVC remote is ../.dvc-storage
  cp -r "$REPO" "$1" && rm -rf "$1/.gpu-site" "$1/.git" "$1/.venv"
  cd "$1"
  git init -q && git add -A && git commit -qm "device run"
}
