"""Sampling speed: our pipeline + LEDiT against diffusers' DiTPipeline + DiTTransformer2DModel of the same size.

    python benchmarks/bench_sampling.py                      # DiT-S/2-sized, CPU, fp32, 10 DDIM steps, batch 2
    python benchmarks/bench_sampling.py --threads 1          # steadier on a small, shared CPU
    python benchmarks/bench_sampling.py --device cuda --dtype bf16 --hidden 1152 --layers 28 --heads 16 --batch 8

Rows, all with classifier-free guidance (one batched forward of 2 x batch) and the same tiny VAE (so decoding
does not dominate): diffusers' DiTPipeline + DiT at the training size (the baseline), our pipeline + the same
DiT (pipeline overhead), then our pipeline with a stock DiT (our class, sin/cos, all self-attention: LEDiT's
peer at every size) and with the LEDiT at 1x, 2x (non-square) and 4x tokens, and the LEDiT at 4x with its causal
blocks run as self-attention (what the causal blocks cost). DDIM for all: DiTPipeline cannot run DDPM
"learned_range" (it drops the variance channels the scheduler then asks for). --compile adds the stock DiT
and the LEDiT with compiled blocks (ledit_convert.models.compiling; compile time is spent in the warm-up).
Prints a table and one JSON line with the ratios the targets name; all measured in this run, on this machine.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTPipeline
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import DTYPES, build, sync  # noqa: E402  (this folder is on sys.path)
from ledit_convert.models.compiling import compile_blocks  # noqa: E402
from ledit_convert.inference.pipeline import LEDiTPipeline, default_scheduler  # noqa: E402


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--sample-size", type=int, default=32, help="latent side at the training resolution")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over all rows; the best per row is reported")
    p.add_argument("--compile", action="store_true", help="add rows with compiled transformer blocks")
    return p.parse_args(argv)


def tiny_vae() -> AutoencoderKL:
    """An SD-shaped VAE (4 latent channels, factor 8) with 8-channel blocks: decoding costs next to nothing."""
    return AutoencoderKL(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def time_rows(fns, device, repeats: int):
    """Best wall time per row; rows are warmed up first (allocator, kernels, FlexAttention compile), then timed
    round-robin so a burst of load from elsewhere on the machine does not land on one row only."""
    for fn in fns:
        fn(warmup=True)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn(warmup=False)
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main(argv=None):
    """Run every row and print the table and a JSON line."""
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # .to(dtype) on a fresh model warns about fp32 modules it has none of
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:  # on a shared 2-core VM, 2 threads were up to 3x slower than 1 (OpenMP barriers)
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # diffusers' DiT, our LEDiT, and a stock DiT in our class (sin/cos extrapolated, all self-attention: LEDiT's
    # peer at every size), as the training benchmark builds them
    dit, ledit, stock = (build(arm, args.layers, args.hidden, args.heads, args.sample_size).to(device, dtype).eval()
                         for arm in ("diffusers", "ledit", "dit"))
    vae = tiny_vae().to(device, dtype).eval()
    labels = [i * 7 % 1000 for i in range(args.batch)]
    px = args.sample_size * 8
    theirs = DiTPipeline(dit, vae, default_scheduler("ddim"))
    ours_dit = LEDiTPipeline(dit, vae, default_scheduler("ddim"))
    ours = LEDiTPipeline(ledit, vae, default_scheduler("ddim"))
    ours_stock = LEDiTPipeline(stock, vae, default_scheduler("ddim"))
    pipes = [theirs, ours_dit, ours, ours_stock]
    if args.compile:
        fast_ledit, fast_stock = copy.deepcopy(ledit), copy.deepcopy(stock)
        compile_blocks(fast_ledit)
        compile_blocks(fast_stock)
        fast = LEDiTPipeline(fast_ledit, vae, default_scheduler("ddim"))
        fast_peer = LEDiTPipeline(fast_stock, vae, default_scheduler("ddim"))
        pipes += [fast, fast_peer]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)

    def call(pipe, **kw):
        def fn(warmup):
            gen = torch.Generator("cpu").manual_seed(0)
            pipe(labels, num_inference_steps=2 if warmup else args.steps, guidance_scale=args.cfg, generator=gen,
                 output_type="np", **kw)
        return fn

    tokens = (args.sample_size // 2) ** 2
    sizes = {"1x": {}, "2x": dict(height=px, width=2 * px), "4x": dict(height=2 * px, width=2 * px)}
    rows = [("diffusers DiTPipeline + DiT 1x", tokens, call(theirs)),
            ("ours + diffusers DiT 1x", tokens, call(ours_dit, guidance_channels="all"))]
    for name, pipe in (("stock DiT", ours_stock), ("LEDiT", ours)):
        for size, kw in sizes.items():
            n = tokens * {"1x": 1, "2x": 2, "4x": 4}[size]
            rows.append((f"ours + {name} {size}" + (" (1:2)" if size == "2x" else ""), n, call(pipe, **kw)))
    rows.append(("ours + LEDiT 4x, causal blocks as self", 4 * tokens,
                 call(ours, causal_to_self_below=1000, **sizes["4x"])))
    if args.compile:
        rows.append(("compiled stock DiT 4x", 4 * tokens, call(fast_peer, **sizes["4x"])))
        rows.append(("compiled LEDiT 4x", 4 * tokens, call(fast, **sizes["4x"])))
        rows.append(("compiled LEDiT 4x, causal blocks as self", 4 * tokens,
                     call(fast, causal_to_self_below=1000, **sizes["4x"])))
    with torch.inference_mode():
        times = time_rows([fn for _, _, fn in rows], device, args.repeats)
    results = [{"row": name, "tokens": n, "seconds": round(t, 4), "s_per_step": round(t / args.steps, 4),
                "images_per_s": round(args.batch / t, 4)}
               for (name, n, _), t in zip(rows, times)]
    base = results[0]["seconds"]
    for r in results:
        r["ratio_vs_diffusers"] = round(r["seconds"] / base, 3)
    by_name = {r["row"]: r["seconds"] for r in results}
    ratios = {"ledit_4x_vs_stock_4x": by_name["ours + LEDiT 4x"] / by_name["ours + stock DiT 4x"],
              "causal_vs_self_4x": by_name["ours + LEDiT 4x"] / by_name["ours + LEDiT 4x, causal blocks as self"],
              "ledit_1x_vs_diffusers": by_name["ours + LEDiT 1x"] / base}
    if args.compile:
        ratios.update({
            "compiled_ledit_4x_vs_stock_4x": by_name["compiled LEDiT 4x"] / by_name["compiled stock DiT 4x"],
            "compiled_causal_vs_self_4x": by_name["compiled LEDiT 4x"] / by_name["compiled LEDiT 4x, causal blocks as self"],
            "compiled_vs_eager_ledit_4x": by_name["compiled LEDiT 4x"] / by_name["ours + LEDiT 4x"]})
    ratios = {k: round(v, 3) for k, v in ratios.items()}

    print(f"device={device} dtype={args.dtype} hidden={args.hidden} layers={args.layers} heads={args.heads} "
          f"batch={args.batch} (x2 with CFG) steps={args.steps} threads={torch.get_num_threads()}")
    print(f"{'row':42s} {'tokens':>6s} {'seconds':>9s} {'img/s':>8s} {'vs (a)':>7s}")
    for r in results:
        print(f"{r['row']:42s} {r['tokens']:6d} {r['seconds']:9.3f} {r['images_per_s']:8.3f} "
              f"{r['ratio_vs_diffusers']:7.3f}")
    for key, value in ratios.items():
        print(f"{key:42s} {value:.3f}x")
    print(json.dumps({"bench": "sampling", "device": str(device), "dtype": args.dtype, "hidden": args.hidden,
                      "layers": args.layers, "heads": args.heads, "batch": args.batch, "steps": args.steps,
                      "compile": args.compile, "torch": torch.__version__,
                      "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
