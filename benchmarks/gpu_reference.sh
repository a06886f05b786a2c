#!/usr/bin/env bash
# The GPU reference record, sized to finish in about 10 minutes on one H100/H200-class GPU:
#   1. every method's gpu-profile training images/s and peak memory (bench all: ResNet-18 or the
#      profile's ViT, batch 512, bf16, channels_last, data and augmentation on the GPU, eager as the
#      profile runs), and SimCLR's once more compiled;
#   2. the batched augmentation's images/s on the GPU (bench augment);
#   3. a short SimCLR ResNet-18 run over the whole of CIFAR-10 at batch 512, compiled, with its
#      seconds per epoch (the first epoch, which pays for compilation, reported apart). Its length is
#      $SIMCLR_EPOCHS (default 6), or, with $SIMCLR_UNTIL set (a Unix time), as many epochs as the
#      compiled step's images/s says end by then (a quarter in reserve for evaluation, 60 s to compile).
# Records go to $OUT_DIR (default results/), each naming the GPU.
#
# Usage, from the repository root, with the package installed and CIFAR-10 under $CONTRASTIVE_DATA
# (or downloadable):
#     bash benchmarks/gpu_reference.sh
# GPU_REFERENCE_PROFILE=smoke runs the same steps on the CPU with the smoke profile and a few
# methods, in seconds: a check of the script itself, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python}
profile=${GPU_REFERENCE_PROFILE:-gpu}
out=${OUT_DIR:-results}
epochs=${SIMCLR_EPOCHS:-6}
mkdir -p "$out"

if [ "$profile" = gpu ]; then
    if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA device is visible to $python; this script measures a GPU" >&2
        exit 2
    fi
    methods=()  # all of them
    timing=()   # bench's defaults: 3 warm-up steps, the median of 5 windows of 3 steps
    suffix=gpu
    augment_sizes=(512 1024)
else
    methods=(--methods simclr byol)
    timing=(--warmup 1 --windows 2 --steps-per-window 1)
    suffix=$profile
    augment_sizes=(64)
    epochs=2
fi

"$python" - <<'EOF'
import torch
from contrastive.runinfo import device_description
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"device: {device_description(device)}, torch {torch.__version__}")
EOF

step_start=$(date +%s)
"$python" -m contrastive bench all --profile "$profile" "${methods[@]}" "${timing[@]}" \
    --json "$out/bench_step_$suffix.json"
"$python" -m contrastive bench step --method simclr --profile "$profile" --compile "${timing[@]}" \
    --json "$out/bench_step_${suffix}_simclr_compiled.json"
echo "bench all and the compiled step: $(( $(date +%s) - step_start )) s"

"$python" -m contrastive bench augment --batch-sizes "${augment_sizes[@]}" --seconds 2 \
    --json "$out/bench_augment_$suffix.json"

if [ -n "${SIMCLR_UNTIL:-}" ] && [ "$profile" = gpu ]; then
    seconds=$(( SIMCLR_UNTIL - $(date +%s) ))
    epochs=$("$python" - "$out/bench_step_${suffix}_simclr_compiled.json" "$seconds" <<'EOF'
import json, sys
(row,) = json.load(open(sys.argv[1]))
seconds_per_epoch = 1.25 * 50_000 / row["images_per_second"]
print(max(2, int((float(sys.argv[2]) - 60) / seconds_per_epoch)))
EOF
)
    echo "SimCLR: $epochs epochs fit in the $seconds s left"
fi

run="$out/simclr_${suffix}_short"
rm -rf "$run"
train_start=$(date +%s)
CONTRASTIVE_PROGRESS=0 "$python" -m contrastive train --method simclr --profile "$profile" \
    --epochs "$epochs" --compile --no-linear --out "$run"
rm -f "$run"/checkpoint_*.pt  # weights are not part of the record
echo "simclr: $(( $(date +%s) - train_start )) s"

"$python" - "$run" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
later = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
print(f"SimCLR epoch 1 (with compilation): {rows[0]['seconds']:.1f} s; later epochs: median "
      f"{statistics.median(later):.2f} s, {statistics.median(r['images_per_second'] for r in rows[1:] or rows):,.0f} img/s")
EOF
