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
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_arms  # noqa: E402  (this folder is on sys.path)
from ledit_convert.models.pixart import LEDiTPixArtTransformer2DModel  # noqa: E402

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


def build(arm: str, cfg: dict, reference_state: dict):
    """One arm's model, with the diffusers model's weights (`reference_state`) where the arm has them."""
    from diffusers import PixArtTransformer2DModel
    model = train_arms.build_arm(arm, ARMS, PixArtTransformer2DModel, LEDiTPixArtTransformer2DModel, cfg)
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
    """A closure running one training step of an arm (model, optimizer and batch built once), and its parameter
    count."""
    torch.manual_seed(0)
    model, opt = train_arms.prepare(build(arm, cfg, reference_state), args, device)
    x, kwargs, target = make_batch(args, device)

    def loss():
        with train_arms.autocast(device, dtype):
            out = model(x, **kwargs).sample
        return F.mse_loss(out.float(), target)
    return train_arms.training_step(model, opt, loss)


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
    train_arms.add_run_args(p, ARMS)
    args = train_arms.parse(p, argv, SMOKE)
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = pixart_config(args)
    from diffusers import PixArtTransformer2DModel
    description = (f"PixArt {args.hidden} wide x {args.layers} blocks ({args.heads} heads), latent {args.latent} "
                   f"({(args.latent // 2) ** 2} tokens), {args.text_tokens} text tokens x {args.caption_channels}, "
                   f"batch {args.batch}")
    # same weights and batch: (a) and (b) agree at the first warm-up step, (c) differs (no positions, causal blocks)
    return train_arms.run("pixart_train", args, cfg, PixArtTransformer2DModel, make_step, description,
                          tokens=(args.latent // 2) ** 2, text_tokens=args.text_tokens)


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # a script's own choice; main() called in-process leaves logging alone
    main()
