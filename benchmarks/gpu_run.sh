#!/usr/bin/env bash
# One prepared GPU session: correctness on the GPU first, then
# the replication's evidence-scale run. Everything worth keeping lands in $OUT.
#   OUT=/tmp/gpu-out bash benchmarks/gpu_run.sh                       # on the GPU machine
#   OUT=/tmp/gpu-dry SCALE=smoke DEVICE=cpu bash benchmarks/gpu_run.sh  # a dry run of the script itself
set -u
OUT=${OUT:-gpu-out}
SCALE=${SCALE:-evidence}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-470}          # seconds for the whole script
TRAIN_DEADLINE=${TRAIN_DEADLINE:-210}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt" 2>&1
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" >> "$OUT/machine.txt" 2>&1
  timeout 240 python3 benchmarks/gpu_check.py > "$OUT/check.log" 2>&1
  echo "gpu_check rc=$?" >> "$OUT/check.log"
fi
INCEPTION=""
if [ -f .gpu/inception_fp16.pt ]; then  # the FID network stored in fp16 to travel; run in fp32
  python3 - <<'PY'
import torch
m = torch.jit.load(".gpu/inception_fp16.pt")
for _, t in list(m.named_parameters()) + list(m.named_buffers()):
    if t.is_floating_point():
        t.data = t.data.float()
torch.jit.save(m, "/tmp/inception_fp32.pt")
PY
  INCEPTION="--inception-weights /tmp/inception_fp32.pt"
fi
REP=/tmp/replication-$SCALE
timeout $(( $(left) - 15 )) python3 benchmarks/replicate.py --scale "$SCALE" --device "$DEVICE" --out "$REP" \
    --train-base --deadline "$TRAIN_DEADLINE" $INCEPTION > "$OUT/replicate.log" 2>&1
echo "replicate rc=$? after $(( $(date +%s) - start ))s" >> "$OUT/replicate.log"
cp "$REP"/base/shapes-dit-base.pt "$OUT/" 2>/dev/null
tar czf "$OUT/replication.tgz" -C "$REP" --exclude='data' --exclude='arms' --exclude='base' . 2>/dev/null
if [ -d "$REP/arms/ledit-s0/model" ]; then
  tar czf "$OUT/ledit-s0.tgz" -C "$REP/arms/ledit-s0" model
fi
tar czf "$OUT/training.tgz" -C "$REP" $(cd "$REP" && ls -d arms/*/training.json base/training.json 2>/dev/null)
echo "total $(( $(date +%s) - start ))s"
