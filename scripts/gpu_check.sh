#!/usr/bin/env bash
# GPU figures in one run (issue 16, item 4): every benchmark script on one CUDA device, sized to finish in under
# 8 minutes on one H200-class GPU, then a summary block of every figure, one `key=value` per line.
#
#   bash scripts/gpu_check.sh [OUT_DIR]                          # default OUT_DIR /tmp/gpu_check
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 bash scripts/gpu_check.sh /tmp/gc   # the same steps, tiny, on a CPU
#
# Steps (each under `timeout`, each clamped to what is left of GPU_CHECK_BUDGET_S, default 460 s; a step that
# fails or runs out of time is reported and its figures print as `missing`, the others still run). The limits fit
# the GPU run; with GPU_CHECK_SMALL=1 they only catch a hang, so each is 5 times longer and the budget 2300 s: a
# 2-core machine busy with other work ran the tiny bags step past its 80 s limit.
#   train  scripts/bench_train.py: DWS-MIL width 1.0, 256 px, AMP, batch 16 (train.json's network and size):
#          stage 1, stage 2 with cached pseudo-labels, stage 2 with a teacher forward, each against a plain loop
#   bags   scripts/bench_bags.py: slide-bag MIL tiles/s and peak memory against tile training, 2 bags x 64 tiles
#          of 256 px, AMP, and the Camelyon16 epoch estimate
#   slide  the generated 40,384 px synthetic slide (cached in OUT_DIR/infer_cache, so a rerun skips it)
#   infer  scripts/bench_infer.py: whole-slide inference at level 1 (1 um/px, 20,192 px), this engine against
#          MONAI's PatchInferer with the cuCIM reader, float16 autocast, batch 32: tissue MP/s, tiles/s, peak memory
#   read   scripts/bench_read.py: 256 px tile reads per second, CPU readers and cuCIM's GPU decode (a line says
#          when the GPU decode is unavailable)
# Everything printed goes to OUT_DIR/gpu_check.log, each step's own output to OUT_DIR/<step>.log, its figures to
# OUT_DIR/<step>.json. Exit status: 1 without a CUDA device (unless GPU_CHECK_DEVICE=cpu), 2 when a step failed,
# ran out of time or was skipped for lack of budget, 0 otherwise. PYTHON (default `python`) is the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-/tmp/gpu_check}"
PYTHON="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SMALL="${GPU_CHECK_SMALL:-0}"
if [[ "$SMALL" == "1" ]]; then LIMIT_SCALE=5; else LIMIT_SCALE=1; fi
BUDGET="${GPU_CHECK_BUDGET_S:-$(( 460 * LIMIT_SCALE ))}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's `custom`, whatever is installed

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repository $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null \
  || echo 'not a git checkout')), output $OUT, device $DEVICE, small $SMALL, budget $BUDGET s"

if [[ "$DEVICE" != "cpu" ]]; then
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device: torch.cuda.is_available() is False (or torch does not import with $PYTHON)." \
      "Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or set GPU_CHECK_DEVICE=cpu" \
      "GPU_CHECK_SMALL=1 to check this script's steps on a CPU." >&2
    exit 1
  fi
fi

echo "== environment"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || echo "nvidia-smi failed"
else
  echo "nvidia-smi: not found"
fi
"$PYTHON" - "$DEVICE" <<'PY' 2> >(grep -v -i "nvjpeg\|nvtiff\|nvimgcodec\|Note: If using" >&2)
import importlib.metadata
import os
import sys

import torch

device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), {os.cpu_count()} CPUs")
if device != "cpu":
    props = torch.cuda.get_device_properties(torch.device(device))
    print(f"torch device {device}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
          f"compute capability {props.major}.{props.minor}")
try:
    import cucim

    print(f"cucim {cucim.__version__}")
except Exception as error:  # reported, not fatal: the steps that need it fail and say so
    print(f"cucim: not importable ({type(error).__name__}: {error})")
for name in ("monai", "openslide-python", "pytorch-ignite"):  # versions without the imports' seconds
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name}: not installed")
PY

GEN_WORKERS=$(( $(nproc) > 3 ? $(nproc) - 1 : 2 ))
if [[ "$SMALL" == "1" ]]; then
  TRAIN_ARGS=(--n_images 8 --size 64 --warmup 0 --epochs 1)
  BAGS_ARGS=(--tile_size 32 --bags 2 --tiles_per_bag 4 --steps 2 --warmup 1)
  INFER_ARGS=(--size 1408 --level 1)
  READ_THREADS="1"
  READ_ARGS=(--size 1024 --seconds 0.2 --threads "$READ_THREADS")
else
  TRAIN_ARGS=(--n_images 512 --size 256 --warmup 1 --epochs 3 --width 1.0 --image_size 256 --num_workers 2)
  BAGS_ARGS=(--width 1.0 --tile_size 256 --bags 2 --tiles_per_bag 64 --steps 10 --warmup 3 --threads 4)
  INFER_ARGS=(--size 40384 --level 1 --width 1.0 --batch_size 32 --num_workers 4 --threads 4)
  READ_THREADS="1,4"
  READ_ARGS=(--size 8192 --seconds 1.5 --threads "$READ_THREADS")
fi
AMP=True
INFER_CACHE="$OUT/infer_cache"
rm -f "$OUT"/{train,bags,slide,infer,read}.{json,log}  # nothing of an earlier run is summarised

START=$SECONDS
PROBLEMS=()
STEP_SECONDS=()
step() {  # step NAME TIMEOUT_S COMMAND...: run COMMAND under timeout, its output to the console and OUT/NAME.log
  local name=$1 limit=$(( $2 * LIMIT_SCALE ))
  shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 15 )); then
    echo "== $name: SKIPPED, ${left} s left of the ${BUDGET} s budget"
    PROBLEMS+=("$name (skipped: budget spent)")
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit} s): $*"
  local began=$SECONDS rc
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  STEP_SECONDS+=("step_${name}_s=$(( SECONDS - began ))")
  if (( rc == 124 || rc == 137 )); then
    echo "== $name: TIMED OUT after ${limit} s; its figures are missing (output in $OUT/$name.log)"
    PROBLEMS+=("$name (timed out after ${limit} s)")
  elif (( rc != 0 )); then
    echo "== $name: FAILED (exit status $rc); its figures are missing (output in $OUT/$name.log)"
    PROBLEMS+=("$name (exit status $rc)")
  else
    echo "== $name: done in $(( SECONDS - began )) s"
  fi
}

step train 100 "$PYTHON" scripts/bench_train.py --device "$DEVICE" --amp "$AMP" "${TRAIN_ARGS[@]}" \
  --json_out "$OUT/train.json"
step bags 80 "$PYTHON" scripts/bench_bags.py --device "$DEVICE" --amp "$AMP" "${BAGS_ARGS[@]}" \
  --json_out "$OUT/bags.json"
step slide 120 "$PYTHON" scripts/bench_infer.py "${INFER_ARGS[@]}" --cache_dir "$INFER_CACHE" \
  --gen_workers "$GEN_WORKERS" --generate_only True
if [[ -f "$OUT/slide.log" ]] && grep -q "ready in" "$OUT/slide.log"; then
  step infer 150 "$PYTHON" scripts/bench_infer.py --device "$DEVICE" --amp "$AMP" "${INFER_ARGS[@]}" \
    --methods ours,cucim --cache_dir "$INFER_CACHE" --json_out "$OUT/infer.json"
else
  echo "== infer: SKIPPED, the slide step did not finish"
  PROBLEMS+=("infer (skipped: no slide)")
fi
step read 70 "$PYTHON" scripts/bench_read.py "${READ_ARGS[@]}" --gpu_decode True --json_out "$OUT/read.json"

TOTAL=$(( SECONDS - START ))
"$PYTHON" - "$OUT" "$DEVICE" "$READ_THREADS" "$TOTAL" "${STEP_SECONDS[@]}" <<'PY'
"""The summary block: every figure of the steps' JSON files, one key=value per line; `missing` where a step gave
none, `skipped` where the step ran but the figure's path was unavailable (cuCIM GPU decode)."""
import json
import sys
from pathlib import Path

out, device, read_threads, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
figures: dict[str, object] = {}


def load(name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def put(key: str, value: object) -> None:
    figures[key] = "missing" if value is None else value


train = load("train")
train_rows = {row["stage"]: row for row in (train or {}).get("rows", [])}
for stage, key in (("stage 1", "stage1"), ("stage 2 cached", "stage2_cached"), ("stage 2 teacher", "stage2_teacher")):
    row = train_rows.get(stage, {})
    put(f"train_{key}_img_s", row.get("bundle_img_s"))
    put(f"train_{key}_plain_img_s", row.get("plain_img_s"))
    put(f"train_{key}_peak_mb", row.get("bundle_peak_mb"))
put("train_vs_plain", (train or {}).get("train_vs_plain"))

bags = load("bags")
bag_rows = {row["row"]: row for row in (bags or {}).get("rows", [])}
for label, key in (("tile training", "tile_training"), ("bag, one pass", "one_pass"),
                   ("bag, two passes", "two_passes")):
    row = bag_rows.get(label, {})
    put(f"bags_{key}_tiles_s", row.get("tiles_s"))
    put(f"bags_{key}_peak_mb", row.get("peak_mb"))
put("bags_vs_tiles", (bags or {}).get("bag_vs_tiles"))
epochs = (bags or {}).get("camelyon16_epoch_min", {})
put("bags_camelyon16_epoch_min_one_pass", epochs.get("one_pass"))
put("bags_camelyon16_epoch_min_two_passes", epochs.get("two_passes"))

infer = load("infer") or {}
put("infer_n_tiles", infer.get("n_tiles"))
put("infer_tissue_mp", infer.get("tissue_mp"))
for name in ("ours", "monai_cucim"):
    row = infer.get("rows", {}).get(name, {})
    put(f"infer_{name}_tissue_mp_s", row.get("tissue_mp_s"))
    put(f"infer_{name}_tiles_s", row.get("tiles_s"))
    put(f"infer_{name}_wall_s", row.get("timings", {}).get("wall"))
    put(f"infer_{name}_peak_mb", row.get("peak_gpu_mb" if device != "cpu" else "peak_rss_mb"))
    put(f"infer_{name}_peak_rss_mb", row.get("peak_rss_mb"))
put("infer_max_abs_diff", infer.get("rows", {}).get("monai_cucim", {}).get("max_abs_diff"))
put("infer_speedup_vs_monai", infer.get("speedup_vs_monai"))

read = load("read")
readers = {"cucim": "cucim", "openslide": "openslide", "tifffile": "tifffile",
           "cucim (MONAI get_data)": "cucim_monai", "openslide (MONAI get_data)": "openslide_monai",
           "cucim GPU decode": "cucim_gpu", "cucim batches of 32 (CPU decode)": "cucim_batch32_cpu",
           "cucim batches of 32 (GPU decode)": "cucim_batch32_gpu"}
gpu_readers = {"cucim_gpu", "cucim_batch32_gpu", "cucim_batch32_cpu"}  # rows only where the GPU decode runs
rates = {(r["reader"], r["access"], r["threads"]): r["tiles_per_s"] for r in (read or {}).get("rows", [])}
for label, key in readers.items():
    for access in ("aligned", "unaligned"):
        for threads in (int(t) for t in read_threads.split(",")):
            value = rates.get((label, access, threads))
            if value is None and read is not None and key in gpu_readers and read.get("gpu_decode_skipped"):
                value = "skipped"
            put(f"read_{key}_{access}_{threads}t_tiles_s", value)

for item in sys.argv[5:]:
    key, value = item.split("=")
    figures[key] = int(value)
figures["gpu_check_total_s"] = int(total)

print("==== summary (key=value) ====")
print("# *_img_s, *_tiles_s: images or tiles per second; *_peak_mb: max_memory_allocated on a GPU, resident set on")
print("# a CPU (train_ and bags_: above the start of the timed run); infer_*: level-1 tissue; read_*: 256 px tiles")
if (read or {}).get("gpu_decode_skipped"):
    print(f"# cuCIM GPU decode skipped: {read['gpu_decode_skipped']}")
for key, value in figures.items():
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    print(f"{key}={value}")
print("==== end of summary ====")
PY

if (( ${#PROBLEMS[@]} )); then
  echo "gpu_check: ${#PROBLEMS[@]} step(s) without figures: ${PROBLEMS[*]}; see $LOG"
  exit 2
fi
echo "gpu_check: every step finished in ${TOTAL} s; log $LOG"
