"""Training-step cost of our PixArt transformer against diffusers' PixArtTransformer2DModel of the same size.

    python benchmarks/bench_pixart_train.py                       # 384 wide, 12 blocks, batch 8, CPU: ~2 min
    python benchmarks/bench_pixart_train.py --threads 1           # steadier on a small, shared CPU
    python benchmarks/bench_pixart_train.py --smoke               # a tiny size that finishes in seconds (tests)
    python benchmarks/bench_pixart_train.py --device cuda --dtype bf16 --hidden 1152 --layers 28 --heads 16 \\
        --caption-channels 4096 --batch 32 --compile

Arms, measured in one run with the same weights, the same batch (latents, text tokens with padding masked,
timesteps, target) and the same optimizer (AdamW, fused on CUDA):
  (a) `diffusers`: diffusers' PixArtTransformer2DModel (Sigma-style config: no micro-conditions),
  (b) `pixart`: our LEDiTPixArtTransformer2DModel from the same config (sin/cos positions, all self-attention),
      with (a)'s state dict loaded,
  (c) `ledit`: ours in LEDiT configuration (no positional encoding, alternating self/causal blocks, locality
      conv "full", attention scaling "log"), with (a)'s weights (its locality conv starts at zero, as surgery's).
Each step is forward + MSE against a fixed random target (as bench_train.py) + backward + optimizer step +
zero_grad. Arms are warmed up one at a time, then timed round-robin (the order rotates every round, so no arm
always runs right after the same other one), and the median per arm is reported with its ratio to (a).
Prints a table and one JSON line (the summary); --out also writes one JSON row per arm (JSONL).
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.models.compiling import compile_blocks  # noqa: E402
from ledit_convert.models.pixart import LEDiTPixArtTransformer2DModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARMS = ("diffusers", "pixart", "ledit")
# --smoke: the size tests/test_bench_pixart.py runs (seconds on two cores)
SMOKE = dict(hidden=32, heads=2, layers=2, latent=8, batch=2, text_tokens=5, caption_channels=16, steps=2, warmup=1)


def pixart_config(args) -> dict:
    """The diffusers PixArt config both models are built from (Sigma-style: no micro-conditions)."""
    return dict(num_attention_heads=args.heads, attention_head_dim=args.hidden // args.heads, in_channels=4,
                out_channels=8, num_layers=args.layers, cross_attention_dim=args.hidden, attention_bias=True,
                sample_size=args.latent, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                use_additional_conditions=False, caption_channels=args.caption_channels)


def ledit_changes(layers: int) -> dict:
    """What surgery adds to a PixArt config for the LEDiT arm."""
    return dict(position_encoding="none", attention_layout=["self" if i % 2 == 0 else "causal" for i in range(layers)],
                locality="full", attention_scaling="log")


def build(arm: str, cfg: dict, reference_state: dict):
    """One arm's model, with the diffusers model's weights (`reference_state`) where the arm has them."""
    if arm == "diffusers":
        from diffusers import PixArtTransformer2DModel
        model = PixArtTransformer2DModel(**cfg)
    elif arm == "pixart":
        model = LEDiTPixArtTransformer2DModel(**cfg)
    elif arm == "ledit":
        model = LEDiTPixArtTransformer2DModel(**cfg, **ledit_changes(cfg["num_layers"]))
    else:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    if reference_state is not None:
        missing, unexpected = model.load_state_dict(reference_state, strict=arm != "ledit")
        if unexpected or any(not k.startswith("locality_conv.") for k in missing):
            raise RuntimeError(f"{arm}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def make_batch(args, device):
    """Latents, text tokens (the second half of the prompts padded to half length), timesteps, target."""
    g = torch.Generator(device=device).manual_seed(0)
    b, t = args.batch, args.text_tokens
    x = torch.randn(b, 4, args.latent, args.latent, device=device, generator=g)
    text = torch.randn(b, t, args.caption_channels, device=device, generator=g)
    mask = torch.ones(b, t, device=device)
    mask[b // 2:, max(t // 2, 1):] = 0
    timestep = torch.randint(0, 1000, (b,), device=device, generator=g)
    target = torch.randn(b, 8, args.latent, args.latent, device=device, generator=g)
    return x, dict(encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep), target


def make_step(arm, args, cfg, reference_state, device, dtype):
    """A closure running one training step of an arm (model, optimizer and batch built once)."""
    torch.manual_seed(0)
    model = build(arm, cfg, reference_state).to(device).train()
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    if args.compile:
        compile_blocks(model, args.compile_mode)
    x, kwargs, target = make_batch(args, device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, **kwargs).sample
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, sum(p.numel() for p in model.parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_arms(arms, args, cfg, device, dtype):
    """Per arm: every timed step (s), the parameter count and the first warm-up step's loss. Warm-up one arm at
    a time, then round-robin rounds in a rotating order, so load from elsewhere on the machine and cache effects
    hit every arm alike."""
    torch.manual_seed(0)
    from diffusers import PixArtTransformer2DModel
    reference_state = PixArtTransformer2DModel(**cfg).state_dict()  # the weights every arm starts from
    steps, params, first_loss = {}, {}, {}
    for arm in arms:
        steps[arm], params[arm] = make_step(arm, args, cfg, reference_state, device, dtype)
        first_loss[arm] = None
        for i in range(args.warmup):
            loss = steps[arm]()
            if i == 0:  # same weights and batch: (a) and (b) agree here, (c) differs (no positions, causal blocks)
                first_loss[arm] = float(loss)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{arm}: non-finite loss in the warm-up")
        sync(device)
    times = {arm: [] for arm in arms}
    for r in range(args.steps):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            t0 = time.perf_counter()
            steps[arm]()
            sync(device)
            times[arm].append(time.perf_counter() - t0)
    return times, params, first_loss


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--latent", type=int, default=32, help="Latent side (32 = 256 px with an SD VAE; 256 tokens).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=120, help="Text tokens per prompt (PixArt-alpha: 120).")
    p.add_argument("--caption-channels", type=int, default=1024, help="Text feature width (T5-XXL: 4096).")
    p.add_argument("--steps", type=int, default=10, help="Timed steps per arm (round-robin rounds).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every arm's blocks (ledit_convert.models.compiling).")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--grad-ckpt", action="store_true", help="Gradient checkpointing in every arm.")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--smoke", action="store_true",
                   help="Tiny defaults (SMOKE) that finish in seconds; flags given still win.")
    p.add_argument("--out", default=None, help="Also write one JSON row per arm here (JSONL, overwritten).")
    if p.parse_known_args(argv)[0].smoke:  # the tiny size as defaults: flags given still win
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    arms = args.arms.split(",")
    cfg = pixart_config(args)
    started = time.perf_counter()
    times, params, first_loss = time_arms(arms, args, cfg, device, dtype)
    machine = {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda"
               else (platform.processor() or platform.machine()), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version()}
    base = statistics.median(times["diffusers"]) if "diffusers" in times and times["diffusers"] else None
    rows = []
    for arm in arms:
        median = statistics.median(times[arm]) if times[arm] else None
        rows.append({"bench": "pixart_train", "arm": arm, "step_s": median, "step_s_all": times[arm],
                     "images_per_s": args.batch / median if median else None,
                     "ratio_vs_diffusers": median / base if median and base else None, "params": params[arm],
                     "first_loss": first_loss[arm], "batch": args.batch, "tokens": (args.latent // 2) ** 2,
                     "text_tokens": args.text_tokens,
                     "dtype": args.dtype, **machine})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"PixArt {args.hidden} wide x {args.layers} blocks ({args.heads} heads), latent {args.latent} "
          f"({(args.latent // 2) ** 2} tokens), {args.text_tokens} text tokens x {args.caption_channels}, batch "
          f"{args.batch}, {args.dtype} on {machine['device_name']}, {machine['threads']} threads"
          + (", compiled" if args.compile else ""))
    print(f"{'arm':12}{'step ms':>10}{'min ms':>10}{'max ms':>10}{'img/s':>9}{'vs (a)':>9}")
    for r in rows:
        ratio = f"{r['ratio_vs_diffusers']:.3f}x" if r["ratio_vs_diffusers"] else "-"
        if r["step_s"] is None:
            print(f"{r['arm']:12}{'-':>10}")
            continue
        print(f"{r['arm']:12}{1000 * r['step_s']:10.1f}{1000 * min(r['step_s_all']):10.1f}"
              f"{1000 * max(r['step_s_all']):10.1f}{r['images_per_s']:9.2f}{ratio:>9}")
    print(json.dumps({"bench": "pixart_train", "config": vars(args), "machine": machine,
                      "seconds": round(time.perf_counter() - started, 1),
                      "rows": {r["arm"]: {k: r[k] for k in ("step_s", "images_per_s", "ratio_vs_diffusers", "params",
                                                          "first_loss")}
                               for r in rows}}))
    return rows


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # a script's own choice; main() called in-process leaves logging alone
    main()
