#!/usr/bin/env bash
# Makes what the prepared GPU scripts need carried (both folders are git-ignored; pass them as `carry`):
#   .gpu/inception_fp16.pt  the FID Inception network stored in fp16 (87 MB in fp32 exceeds a call's carry limit;
#                           gpu_run.sh converts it back to fp32 before use)
#   .whl/                   diffusers and importlib_metadata wheels (the H200 image has no diffusers)
#   bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu .whl
python3 - <<'PY'
import torch
from ledit_convert.evaluation.fid import default_weights_path
m = torch.jit.load(default_weights_path(), map_location="cpu")
for _, t in list(m.named_parameters()) + list(m.named_buffers()):
    if t.is_floating_point():
        t.data = t.data.half()
torch.jit.save(m, ".gpu/inception_fp16.pt")
PY
python3 -m pip download -q --no-deps -d .whl diffusers==0.42.1 importlib_metadata
du -sh .gpu .whl
