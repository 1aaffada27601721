#!/usr/bin/env bash
# GPU benchmark of the SPPnet test path and a short `sppdet bench scale` run, beside the paper's
# figures (ZF-5 on a 2014 GPU: conv5 0.053 s/image at 1 scale, 0.293 s at 5 scales, fc7 0.089 s).
#
#   scripts/bench_gpu.sh [--data ROOT] [--split S] [--out DIR] [--images N] [--device cuda:K]
#   scripts/bench_gpu.sh --cpu --tiny          # no GPU needed: checks that the measuring code runs
#
# ZF-5 with random (He) weights: nothing is downloaded.  Without --data, random 500x375 images for
# the per-image figures and a synthetic VOC set (sppdet make-synthetic) for the bench scale run.
# Where no CUDA device is found (and --cpu is not given) it prints "no CUDA device: nothing
# measured" and exits 0.  Results: OUT/gpu.json, OUT/gpu.txt, OUT/scale.json (default OUT:
# runs/bench-gpu).  Environment: PYTHON (default: python3), SPPDET_BENCH_CPU=1 (as --cpu),
# SPPDET_BENCH_TINY=1 (as --tiny: tiny images, 50 windows, small scales and layers).
set -euo pipefail

PY=${PYTHON:-python3}
DATA=""
SPLIT=test
OUT=runs/bench-gpu
IMAGES=5
DEVICE=cuda
CPU=${SPPDET_BENCH_CPU:-0}
TINY=${SPPDET_BENCH_TINY:-0}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --split) SPLIT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SPPDET_PROGRESS=${SPPDET_PROGRESS:-0}

if [[ "$CPU" == 1 ]]; then
  DEVICE=cpu
  echo "forced CPU run (--cpu): figures are not GPU figures"
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA device: nothing measured"
    exit 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu --format=csv,noheader || true
  fi
fi

mkdir -p "$OUT"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"

# 1. per image: conv5 (1 and 5 scales), SPP pooling, fc7 + SVMs, the whole test path after proposals
GPU_ARGS=(--device "$DEVICE" --images "$IMAGES" --repeat 3)
if [[ "$TINY" == 1 ]]; then
  GPU_ARGS=(--device "$DEVICE" --images 1 --repeat 1 --image-size 96x64 --windows 50 --scale 64
            --scales 48,64,80,96,128 --max-side 256 --pyramid 2,1 --fc-dims 32,32 --classes 3)
fi
if [[ -n "$DATA" ]]; then GPU_ARGS+=(--data "$DATA" --split "$SPLIT"); fi
"$PY" -m sppdet -q bench gpu "${GPU_ARGS[@]}" --json > "$OUT/gpu.json"
"$PY" - "$OUT/gpu.json" > "$OUT/gpu.txt" <<'EOF'
import json, sys
from sppdet.bench.gpu import format_table
print(format_table(json.load(open(sys.argv[1]))))
EOF
cat "$OUT/gpu.txt"

# 2. a short bench scale run (training + test stages on 4 and 8 images) on the same device
SCALE_DATA=$DATA
SCALE_SPLITS=()
if [[ -z "$SCALE_DATA" ]]; then
  SCALE_DATA="$OUT/synthetic"
  "$PY" -m sppdet -q make-synthetic --out "$SCALE_DATA" --images 24 --seed 0 >/dev/null
else
  SCALE_SPLITS=(--test-split "$SPLIT")
fi
rm -rf "$OUT/scale"
SETS=(--set features.weights=random --set "device=$DEVICE" --set proposals.max_boxes=2000 --set svm.solver=torch)
SIZES=4,8
if [[ "$TINY" == 1 ]]; then
  SETS=(--set features.weights=random --set "device=$DEVICE" --set "features.scales=[96]" --set features.max_side=192
        --set features.flip=false --set proposals.max_boxes=50 --set proposals.workers=1
        --set finetune.iterations=5 --set "finetune.fc_dims=[32,32]" --set finetune.batch_size=32
        --set bbox_reg.enabled=false)
  SIZES=1,2
fi
"$PY" -m sppdet -q bench scale --config voc07_zf5 --data "$SCALE_DATA" "${SCALE_SPLITS[@]}" --images "$SIZES" \
    --out "$OUT/scale" "${SETS[@]}" > "$OUT/scale.json"
"$PY" - "$OUT/scale.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\nbench scale ({r['config']}, {r['device']} {r['device_name']}), seconds per stage:")
for run in r["runs"]:
    s = run["seconds"]
    print(f"  N={run['images']:<4} train {s['train_total']:8.1f} s  eval {s['eval_total']:8.1f} s  "
          f"peak RSS {run['peak_rss_mb']:7.0f} MiB  cache {run['cache_mb']:8.1f} MiB")
p = r["projection"]
print(f"  projection to {p['images']} images: {p['hours']:.2f} h, cache {p['cache_gb']:.1f} GiB "
      f"(a line through {len(r['runs'])} tiny runs: a rough figure)")
EOF
echo "results: $OUT/gpu.json $OUT/gpu.txt $OUT/scale.json"
