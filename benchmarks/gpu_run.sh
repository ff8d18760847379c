#!/usr/bin/env bash
# The prepared GPU run of the replication: correctness on the GPU first, then the arms in priority order. The user's
# question comes first: the base, then LEDiT and the DiT-RoPE fine-tune at seed 0 trained together and scored at 1x,
# 1.5x and 2x with every method (RoPE: extrapolated, VisionNTK, VisionYaRN, RIFLEx, DyPE; the base's sin/cos table:
# extrapolated, interpolated, NTK, DyPE interpolation), the paper's Table 2 in miniature; then the ablations and the
# budget sweep.
# Everything worth keeping lands in $OUT as it is made (at most 8 files, none over 16 MiB):
#   machine.txt  check.log  replicate.log  rows.jsonl  results.md  report.tgz  best-ledit.tgz  shapes-dit-base.pt
#   OUT=/tmp/gpu-out bash benchmarks/gpu_run.sh                               # on the GPU machine (9 minutes)
#   OUT=/tmp/gpu-dry SCALE=smoke DEVICE=cpu EVAL_RESERVE=0 bash benchmarks/gpu_run.sh   # a dry run of the script
# Carried: .gpu/inception_fp16.pt (the FID network stored in fp16 to fit a call's carry limit; run in fp32) and
# .whl/ (diffusers, which the H200 image lacks; see gpu_env.sh).
set -u
OUT=${OUT:-gpu-out}
SCALE=${SCALE:-evidence}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}          # seconds for the whole script
EVAL_RESERVE=${EVAL_RESERVE:-150}  # seconds kept for scoring after the last training step
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # carried diffusers wheels where the image lacks them; this tree on the path
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
{
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} > "$OUT/machine.txt" 2>&1
if [ "$DEVICE" = cuda ]; then  # every attention path (all scans) and the compiled blocks against the explicit softmax
  timeout 150 python3 benchmarks/gpu_check.py > "$OUT/check.log" 2>&1
  echo "gpu_check rc=$? after $(( $(date +%s) - start ))s" >> "$OUT/check.log"
  # images/s: finetune's loop (the peer), one fastloop arm eager and graphed, 8 arms at once
  timeout 90 python3 benchmarks/bench_fastloop.py --device cuda --batch 256 --steps 50 --arms 8 >> "$OUT/check.log" 2>&1
  echo "bench_fastloop rc=$? after $(( $(date +%s) - start ))s" >> "$OUT/check.log"
else
  echo "gpu_check skipped on $DEVICE" > "$OUT/check.log"
fi
EXTRA=""
if [ -f .gpu/inception_fp16.pt ]; then
  python3 - <<'PY'
import torch
m = torch.jit.load(".gpu/inception_fp16.pt")
for _, t in list(m.named_parameters()) + list(m.named_buffers()):
    if t.is_floating_point():
        t.data = t.data.float()
torch.jit.save(m, "/tmp/inception_fp32.pt")
PY
  EXTRA="--inception-weights /tmp/inception_fp32.pt"
fi
[ "$SCALE" = smoke ] && EXTRA="$EXTRA --features pixels"
REP=${REP:-/tmp/replication-$SCALE}
LEFT=$(left)
# the harness checks graphed steps against eager ones first (falling back to eager at a large batch), then
# trains until the deadline and scores what it trained; the timeout leaves a few seconds to note the end
timeout $(( LEFT - 5 )) python3 benchmarks/replicate.py --scale "$SCALE" --device "$DEVICE" --out "$REP" \
    --deadline $(( LEFT - EVAL_RESERVE )) --publish "$OUT" $EXTRA > "$OUT/replicate.log" 2>&1
echo "replicate rc=$? after $(( $(date +%s) - start ))s" >> "$OUT/replicate.log"
echo "total $(( $(date +%s) - start ))s"
