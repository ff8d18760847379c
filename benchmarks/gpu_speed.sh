#!/usr/bin/env bash
# The speed figures on a GPU in one call: correctness first (gpu_check.py, inside bench_all.py), then every
# figure at DiT-XL/2 in bf16, eager and compiled, then the compiled LEDiT at a larger batch for MFU.
# Everything lands in $OUT. About 8 minutes on one H100/H200, most of it compiling. A GPU machine without
# diffusers needs its wheels carried in .whl/ (pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata).
#   OUT=/tmp/gpu-out bash benchmarks/gpu_speed.sh                      # on the GPU machine
#   OUT=/tmp/gpu-dry DEVICE=cpu TINY=1 bash benchmarks/gpu_speed.sh    # a dry run of the script itself
set -u
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}  # seconds for the whole script
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
. "$(dirname "$0")/gpu_env.sh"  # carried diffusers wheels where the image lacks them; this tree on the path
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || lscpu | head -20
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} > "$OUT/machine.txt" 2>&1
SIZE=""
[ "${TINY:-0}" = 1 ] && SIZE="--tiny"
timeout $(( $(left) - 100 )) python3 benchmarks/bench_all.py --device "$DEVICE" --compile $SIZE --timeout 240 \
    --budget $(( $(left) - 130 )) --out "$OUT/bench_all.json" --markdown "$OUT/bench_all.md" > "$OUT/bench_all.log" 2>&1
echo "bench_all rc=$? after $(( $(date +%s) - start ))s" >> "$OUT/bench_all.log"
if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 100 ]; then
  for batch in 64 128; do  # MFU grows with the batch until the GPU is busy; the paper's run is 32 per GPU
    [ "$(left)" -gt 60 ] || break
    timeout $(( $(left) - 10 )) python3 benchmarks/bench_train.py --variant XL --batch $batch --dtype bf16 \
        --compile --arms ledit --steps 6 --warmup 3 --device cuda > "$OUT/mfu_batch$batch.log" 2>&1
    echo "rc=$?" >> "$OUT/mfu_batch$batch.log"
  done
fi
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/bench_all.log"
