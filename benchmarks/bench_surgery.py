"""Surgery time and peak memory against a plain torch.load + safetensors save of the same tensors.

    python benchmarks/bench_surgery.py                 # DiT-XL/2 sized (675M parameters, 2.7 GB)
    python benchmarks/bench_surgery.py --variant S --repeats 3

Each measurement runs in a fresh process (peak RSS from getrusage; the parent never holds the
tensors, since Linux carries ru_maxrss across exec); the two are interleaved and the median of the
repeats is reported. Prints a table and one JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"XL": (28, 1152), "L": (24, 1024), "B": (12, 768), "S": (12, 384)}

BASELINE = """
import sys, time, resource, torch
from safetensors.torch import save_file
t0 = time.perf_counter()
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])
dt = time.perf_counter() - t0
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

SURGERY = """
import sys, time, resource
from ledit_convert.conversion.surgery import SurgeryOptions, surgery_to_folder
t0 = time.perf_counter()
surgery_to_folder(sys.argv[1], sys.argv[2], SurgeryOptions(), overwrite=True)
dt = time.perf_counter() - t0
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

IDLE = """
import resource, torch, safetensors.torch, ledit_convert.conversion.surgery
print(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_checkpoint(path: Path, depth: int, hidden: int, patch: int = 2, grid: int = 16) -> int:
    """A random DiT state dict in facebookresearch's format; returns its tensor bytes."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ledit_convert.models.dit import sincos_position_table
    g = torch.Generator().manual_seed(0)
    sd = {"x_embedder.proj.weight": (hidden, 4, patch, patch), "x_embedder.proj.bias": (hidden,),
          "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
          "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
          "y_embedder.embedding_table.weight": (1001, hidden),
          "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
          "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
          "final_layer.linear.weight": (patch * patch * 8, hidden), "final_layer.linear.bias": (patch * patch * 8,)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                   b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                   b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
                   b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
                   b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,)})
    tensors = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in sd.items()}
    tensors["pos_embed"] = sincos_position_table(hidden, grid, grid, grid, grid).float()[None]
    torch.save(tensors, path)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(code: str, *args) -> tuple:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), int(peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="XL", choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="Folder for the temporary files (needs ~4x the checkpoint).")
    args = parser.parse_args()
    depth, hidden = VARIANTS[args.variant]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "dit.pt"
        # built in a child process: Linux carries ru_maxrss across exec, so the parent must stay small
        size = int(subprocess.run([sys.executable, __file__, "--make", str(ckpt), str(depth), str(hidden)],
                                  capture_output=True, text=True, check=True).stdout.split()[-1])
        _, idle = run(IDLE)
        base, surg = [], []
        for _ in range(args.repeats):  # interleaved so page-cache state favours neither side
            base.append(run(BASELINE, ckpt, tmp / "plain.safetensors"))
            surg.append(run(SURGERY, ckpt, tmp / "ledit"))
            os.remove(tmp / "plain.safetensors")
    b_time = statistics.median(t for t, _ in base)
    s_time = statistics.median(t for t, _ in surg)
    b_peak = max(p for _, p in base)
    s_peak = max(p for _, p in surg)
    gib = 1024 ** 3
    result = {
        "variant": f"DiT-{args.variant}/2", "checkpoint_gib": size / gib, "baseline_s": b_time, "surgery_s": s_time,
        "time_ratio": s_time / b_time, "idle_process_gib": idle / gib, "baseline_peak_gib": b_peak / gib,
        "surgery_peak_gib": s_peak / gib, "surgery_peak_over_checkpoint": s_peak / size,
        "surgery_peak_above_idle_over_checkpoint": (s_peak - idle) / size, "repeats": args.repeats,
        "cpus": os.cpu_count(),
    }
    print(f"{'':28}{'time (s)':>10}{'peak RSS (GiB)':>16}")
    print(f"{'torch.load + save_file':28}{b_time:10.2f}{b_peak / gib:16.2f}")
    print(f"{'ledit-convert surgery':28}{s_time:10.2f}{s_peak / gib:16.2f}")
    print(f"checkpoint {size / gib:.2f} GiB; time ratio {result['time_ratio']:.2f}x (target <= 1.5x); "
          f"peak / checkpoint {result['surgery_peak_over_checkpoint']:.2f}x (target <= 2.5x; "
          f"{result['surgery_peak_above_idle_over_checkpoint']:.2f}x above an idle process)")
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--make":
        print(make_checkpoint(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        sys.exit(0)
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f}s", file=sys.stderr)
