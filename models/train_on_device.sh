#!/usr/bin/env bash
# Train the default model on a lent GPU machine in one call, and hand back the result in pieces
# small enough for the device tool's file limits (16 MiB per file).
#
# Here, before the call (the photos must travel inside the checkout; ../shared does not):
#   mkdir -p .devdata && cp -r ../shared/data/photos .devdata/photos
# The call (device `run`, carry [".devdata"], timeout_s 600):
#   GMCNN_TRAIN_MINUTES=8 bash models/train_on_device.sh
# One call may run 10 minutes at most. The run lives in GMCNN_TRAIN_RUN (/tmp/gmcnn_train/run), so a
# second call on the same, still warm machine continues it (--resume; e.g. GMCNN_TRAIN_LR=1e-4 for a
# lower-rate phase) and hands back the best checkpoint of both calls. The shipped model is such a pair:
#   GMCNN_TRAIN_MINUTES=8 bash models/train_on_device.sh            (lr 3e-4)
#   GMCNN_TRAIN_MINUTES=3.7 GMCNN_TRAIN_LR=1e-4 bash models/train_on_device.sh
# Back here, rebuild the checkpoint and check it:
#   cat FILES_AT/best_fp16.safetensors.part-* > best_fp16.safetensors && sha256sum -c FILES_AT/best_fp16.sha256
#
# Knobs (environment): GMCNN_TRAIN_MINUTES (wall budget of training, validation included),
# GMCNN_TRAIN_BATCH, GMCNN_TRAIN_CROP, GMCNN_TRAIN_LR, GMCNN_TRAIN_CNUM, GMCNN_TRAIN_DEVICE (cuda;
# cpu for a dry run here), GMCNN_TRAIN_PYTHON (python3: the device's interpreter holds torch),
# GMCNN_TRAIN_PHOTOS (.devdata/photos), GMCNN_TRAIN_RUN (run folder; resumed when it holds last.pt),
# OUT (set by the device tool; a folder for a dry run).
set -euo pipefail

minutes=${GMCNN_TRAIN_MINUTES:-7.5}
batch=${GMCNN_TRAIN_BATCH:-16}
crop=${GMCNN_TRAIN_CROP:-256}
lr=${GMCNN_TRAIN_LR:-3e-4}
cnum=${GMCNN_TRAIN_CNUM:-32}
device=${GMCNN_TRAIN_DEVICE:-cuda}
python=${GMCNN_TRAIN_PYTHON:-python3}
photos=${GMCNN_TRAIN_PHOTOS:-.devdata/photos}
amp=bf16
[ "$device" = cpu ] && amp=off
: "${OUT:?OUT must name the folder that comes back}"
[ -d "$photos" ] || { echo "train_on_device: $photos missing (copy ../shared/data/photos there and carry .devdata)" >&2; exit 2; }

run=${GMCNN_TRAIN_RUN:-/tmp/gmcnn_train/run}
resume=()
if [ -f "$run/last.pt" ]; then
    resume=(--resume)
    echo "train_on_device: continuing the run in $run"
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -c 'import torch, cv2, numpy, safetensors; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "numpy", numpy.__version__, "cv2", cv2.__version__)'

start=$(date +%s)
# The progress bar's carriage returns would flood the returned output tail; the log holds every step.
"$python" -m runtime_py.cli train --photos "$photos" --out "$run" --device "$device" --amp "$amp" \
    --variant tf --cnum "$cnum" --crop "$crop" --batch-size "$batch" --lr "$lr" --init he "${resume[@]}" \
    --max-minutes "$minutes" --val-every-minutes 1 --checkpoint-every-minutes 2 --log-every 20 \
    2> >(tr '\r' '\n' | grep -v -E '^(train|decode):' >&2) | tee "$OUT/summary.json"
echo "train_on_device: trained for $(( $(date +%s) - start )) s"

"$python" -m runtime_py.cli convert-checkpoint "$run/best.safetensors" "$run/best_fp16.safetensors" --dtype float16
(cd "$run" && sha256sum best_fp16.safetensors) > "$OUT/best_fp16.sha256"
split -b 15m -d "$run/best_fp16.safetensors" "$OUT/best_fp16.safetensors.part-"
cp "$run/log.jsonl" "$run/config.json" "$OUT/"
grep '"kind": "val"' "$run/log.jsonl" | tail -n 5
ls -l "$OUT"
