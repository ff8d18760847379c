"""Training-step cost of an LEDiT against diffusers' DiTTransformer2DModel of the same size.

    python benchmarks/bench_train.py                                  # DiT-S/2 at 256 px on the CPU
    python benchmarks/bench_train.py --variant XL --device cuda --dtype bf16 --batch 64 --compile

Arms, measured in one run with the same random latents, batch and optimizer (AdamW, fused on CUDA):
  (a) diffusers DiTTransformer2DModel, (b) our model in DiT mode, (c) our LEDiT (alternating causal
  blocks, scan d, locality conv, dilation in training), (d) "rope", our DiT-RoPE (the paper's baseline: no
  table, axial 2D RoPE on q and k in every block). Each step is forward + MSE + backward + optimizer step.
  Prints a table (step time, images/s, peak memory, model FLOPs utilisation) and one JSON line; ratios are
  against (a), and `ratio_vs_ledit` against (c) (the RoPE fine-tune should cost no more than LEDiT's). --compile compiles every arm's transformer blocks the same
  way (regional torch.compile, ledit_convert.models.compiling). Peak memory: allocator peak on CUDA; on the
  CPU, the peak RSS of a child process that builds and trains only that arm.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.models.compiling import compile_blocks  # noqa: E402
from ledit_convert.models.dit import LEDiTTransformer2DModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def forward_macs(depth: int, hidden: int, tokens: int, patch: int = 2, channels: int = 4) -> float:
    """Multiply-accumulates of one DiT forward per image (linear layers + attention), as the paper counts."""
    per_layer = tokens * (12 * hidden * hidden + 2 * tokens * hidden) + 6 * hidden * hidden
    embed = tokens * hidden * channels * patch * patch + 256 * hidden + hidden * hidden
    final = tokens * hidden * patch * patch * 2 * channels + 2 * hidden * hidden
    return depth * per_layer + embed + final


def build(arm: str, depth: int, hidden: int, heads: int, latent: int):
    """One of the three models, same size, random init."""
    if arm == "diffusers":
        from diffusers import DiTTransformer2DModel
        return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                     out_channels=8, num_layers=depth, sample_size=latent, patch_size=2,
                                     num_embeds_ada_norm=1000)
    common = dict(sample_size=latent, patch_size=2, in_channels=4, out_channels=8, hidden_size=hidden,
                  num_layers=depth, num_attention_heads=heads, num_classes=1000)
    if arm == "dit":
        return LEDiTTransformer2DModel(**common, position_encoding="sincos", locality="none",
                                       attention_scaling="none")
    if arm == "rope":
        return LEDiTTransformer2DModel(**common, position_encoding="rope2d", locality="none",
                                       attention_scaling="none")
    layout = ["self" if i % 2 == 0 else "causal" for i in range(depth)]
    return LEDiTTransformer2DModel(**common, position_encoding="none", attention_layout=layout, locality="full")


def make_step(arm, args, depth, hidden, heads, device, dtype):
    """A closure running one training step of an arm (model, optimizer and batch built once)."""
    torch.manual_seed(0)
    with device:  # initialise on the device: XL on a CPU takes seconds per arm
        model = build(arm, depth, hidden, heads, args.latent).to(device).train()
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    if args.compile:
        compile_blocks(model, args.compile_mode)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device, generator=g)
    target = torch.randn(args.batch, 8, args.latent, args.latent, device=device, generator=g)
    t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
    y = torch.randint(0, 1000, (args.batch,), device=device, generator=g)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, timestep=t, class_labels=y).sample
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_arms(arms, args, depth, hidden, heads, device, dtype):
    """Median step time (s) and peak memory (bytes) per arm; steps are interleaved across arms."""
    steps, peaks = {}, {}
    for arm in arms:  # warm up one arm at a time so its peak memory is its own
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps[arm] = make_step(arm, args, depth, hidden, heads, device, dtype)
        for _ in range(args.warmup):
            steps[arm]()
        sync(device)
        peaks[arm] = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0
    times = {arm: [] for arm in arms}
    for _ in range(args.steps):  # round robin: drift in clocks or load hits every arm alike
        for arm in arms:
            t0 = time.perf_counter()
            steps[arm]()
            sync(device)
            times[arm].append(time.perf_counter() - t0)
    return {arm: (statistics.median(times[arm]) if times[arm] else None, peaks[arm]) for arm in arms}


def cpu_peak_rss(arm: str, args) -> float:
    """Peak RSS (bytes) of a child process that builds `arm` and runs its warm-up steps, and nothing else."""
    cmd = [sys.executable, __file__, "--variant", args.variant, "--latent", str(args.latent), "--batch",
           str(args.batch), "--warmup", str(max(args.warmup, 1)), "--dtype", args.dtype, "--arms", arm,
           "--steps", "0", "--rss-only", "--compile-mode", args.compile_mode]
    cmd += ["--compile"] * args.compile + ["--grad-ckpt"] * args.grad_ckpt
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="S", choices=sorted(VARIANTS))
    parser.add_argument("--latent", type=int, default=32, help="Latent side (32 = 256 px with an SD VAE).")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile every arm.")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile.")
    parser.add_argument("--grad-ckpt", action="store_true", help="Gradient checkpointing in every arm.")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="Accelerator peak for MFU (default: 989 for bf16/fp16 on H100/H200, else none).")
    parser.add_argument("--arms", default="diffusers,dit,ledit,rope")
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)  # the child of cpu_peak_rss
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    depth, hidden, heads = VARIANTS[args.variant]
    tokens = (args.latent // 2) ** 2
    flops = forward_macs(depth, hidden, tokens) * 2 * 3 * args.batch  # fwd + bwd = 3 forwards, 2 FLOPs per MAC
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda" and dtype != torch.float32:
        peak_tflops = 989.0  # H100/H200 SXM dense bf16 datasheet figure
    if args.rss_only:
        time_arms(args.arms.split(","), args, depth, hidden, heads, device, dtype)
        # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork + exec
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(int(hwm.split()[1]) * 1024)
        return
    rows = {}
    measured = time_arms(args.arms.split(","), args, depth, hidden, heads, device, dtype)
    if device.type == "cpu":
        measured = {arm: (sec, cpu_peak_rss(arm, args)) for arm, (sec, _) in measured.items()}
    for arm, (seconds, mem) in measured.items():
        rows[arm] = {"step_s": seconds, "images_per_s": args.batch / seconds, "peak_mem_gib": mem / 1024 ** 3,
                     "tflops": flops / seconds / 1e12,
                     "mfu": (flops / seconds / 1e12 / peak_tflops) if peak_tflops else None}
    base, ledit = rows.get("diffusers"), rows.get("ledit")
    for row in rows.values():
        row["ratio_vs_diffusers"] = row["step_s"] / base["step_s"] if base else None
        row["ratio_vs_ledit"] = row["step_s"] / ledit["step_s"] if ledit else None
    name = f"DiT-{args.variant}/2 latent {args.latent} ({tokens} tokens) batch {args.batch} {args.dtype} on {device}"
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name()})"
    print(name + (" compiled" if args.compile else ""))
    print(f"{'arm':12}{'step ms':>10}{'img/s':>10}{'peak GiB':>10}{'TFLOP/s':>10}{'MFU':>8}{'vs (a)':>9}"
          f"{'vs ledit':>9}")
    for arm, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['ratio_vs_diffusers']:.3f}x" if r["ratio_vs_diffusers"] else "-"
        vs_ledit = f"{r['ratio_vs_ledit']:.3f}x" if r["ratio_vs_ledit"] else "-"
        print(f"{arm:12}{1000 * r['step_s']:10.1f}{r['images_per_s']:10.1f}{r['peak_mem_gib']:10.2f}"
              f"{r['tflops']:10.2f}{mfu:>8}{ratio:>9}{vs_ledit:>9}")
    print(json.dumps({"config": vars(args), "forward_gmacs_per_image": forward_macs(depth, hidden, tokens) / 1e9,
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
