"""Training-step cost of our SD3 (MMDiT) transformer against diffusers' SD3Transformer2DModel of the same size.

    python benchmarks/bench_sd3_train.py                          # 384 wide, 12 blocks, batch 8, CPU: ~2.5 min
    python benchmarks/bench_sd3_train.py --dual 4                 # SD3.5-style: dual attention in blocks 0-3,
                                                                  #   RMS-normalised q/k (--qk-norm rms_norm)
    python benchmarks/bench_sd3_train.py --threads 1              # steadier on a small, shared CPU
    python benchmarks/bench_sd3_train.py --smoke                  # a tiny size that finishes in seconds (tests)
    python benchmarks/bench_sd3_train.py --device cuda --dtype bf16 --hidden 1536 --heads 24 --layers 24 \\
        --joint-dim 4096 --pooled-dim 2048 --text-tokens 333 --latent 128 --pos-embed-max-size 192 --batch 8 \\
        --compile

Arms, measured in one run with the same weights, the same batch (latents, joint text tokens, pooled text) and
the same optimizer (AdamW, fused on CUDA):
  (a) `diffusers`: diffusers' SD3Transformer2DModel,
  (b) `sd3`: our LEDiTSD3Transformer2DModel from the same config (stock mode: it keeps the stored, cropped sin/cos
      table `pos_embed.pos_embed`), with (a)'s state dict loaded strictly,
  (c) `ledit`: ours in LEDiT configuration (no positional encoding, alternating self/causal blocks, locality conv
      "full", attention scaling "log"), loaded strictly from (a)'s state dict without the stored table and with
      a zero locality conv added, as surgery does (so it starts as SD3 minus the table).
Each step is SD3's rectified-flow loss (`ledit_convert.training.flow.flow_loss` with the default `FlowSchedule()`:
logit-normal timesteps, shift 3, no loss weighting; every arm has its own generator with the same seed, so every
arm sees the same timesteps and noise at its k-th step), or with --loss mse an MSE against a fixed random
target, then backward + optimizer step + zero_grad. Arms are warmed up one at a time, then timed round-robin (the
order rotates every round, so no arm always runs right after the same other one), and the median per arm is
reported with its ratio to (a). Prints a table and one JSON line (the summary); --out also writes one JSON row per
arm (JSONL).
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_arms  # noqa: E402  (this folder is on sys.path)
from ledit_convert.conversion.surgery import STORED_TABLES  # noqa: E402
from ledit_convert.models.sd3 import LEDiTSD3Transformer2DModel  # noqa: E402
from ledit_convert.training.flow import FlowSchedule, flow_loss  # noqa: E402

ARMS = ("diffusers", "sd3", "ledit")
QK_NORMS = ("none", "rms_norm", "layer_norm")
IN_CHANNELS = 16  # SD3's VAE latents
# --smoke: the size tests/test_bench_sd3.py runs (seconds on two cores)
SMOKE = dict(hidden=32, heads=2, layers=2, latent=8, batch=2, text_tokens=5, joint_dim=16, pooled_dim=8,
             pos_embed_max_size=16, steps=2, warmup=1)


def qk_norm(args):
    """The q/k norm of the config (None for "none"); parse_args has resolved --qk-norm's default."""
    return None if args.qk_norm == "none" else args.qk_norm


def sd3_config(args) -> dict:
    """The diffusers SD3 config every model is built from (SD3.5-style with --dual: its first blocks also have an
    image-only attention)."""
    return dict(sample_size=args.latent, patch_size=2, in_channels=IN_CHANNELS, num_layers=args.layers,
                attention_head_dim=args.hidden // args.heads, num_attention_heads=args.heads,
                joint_attention_dim=args.joint_dim, caption_projection_dim=args.hidden,
                pooled_projection_dim=args.pooled_dim, out_channels=IN_CHANNELS,
                pos_embed_max_size=args.pos_embed_max_size, dual_attention_layers=tuple(range(args.dual)),
                qk_norm=qk_norm(args))


def ledit_state(reference_state: dict, model) -> dict:
    """(a)'s state dict as surgery turns it into the LEDiT arm's: the stored table dropped, the locality conv added
    with zero weight and bias. Every other tensor must match the model's own keys exactly."""
    state = {k: v for k, v in reference_state.items() if k not in STORED_TABLES}
    own = model.state_dict()
    added = sorted(set(own) - set(state))
    if any(not k.startswith("locality_conv.") for k in added):
        raise RuntimeError(f"ledit: keys missing from the reference beyond the locality conv: {added}")
    state.update({k: torch.zeros_like(own[k]) for k in added})
    return state


def build(arm: str, cfg: dict, reference_state: dict):
    """One arm's model, with the diffusers model's weights (`reference_state`) loaded strictly where given."""
    from diffusers import SD3Transformer2DModel
    model = train_arms.build_arm(arm, ARMS, SD3Transformer2DModel, LEDiTSD3Transformer2DModel, cfg)
    if reference_state is not None:
        model.load_state_dict(ledit_state(reference_state, model) if arm == "ledit" else reference_state, strict=True)
    return model


def make_batch(args, device):
    """Clean latents, joint text tokens, pooled text and (for --loss mse) timesteps and a fixed target."""
    g = torch.Generator(device=device).manual_seed(0)
    b = args.batch
    x0 = torch.randn(b, IN_CHANNELS, args.latent, args.latent, device=device, generator=g)
    text = torch.randn(b, args.text_tokens, args.joint_dim, device=device, generator=g)
    pooled = torch.randn(b, args.pooled_dim, device=device, generator=g)
    timestep = torch.rand(b, device=device, generator=g) * 1000
    target = torch.randn(b, IN_CHANNELS, args.latent, args.latent, device=device, generator=g)
    return x0, dict(encoder_hidden_states=text, pooled_projections=pooled), timestep, target


def make_step(arm, args, cfg, reference_state, device, dtype):
    """A closure running one training step of an arm (model, optimizer, batch and loss generator built once), and
    its parameter count."""
    torch.manual_seed(0)
    model, opt = train_arms.prepare(build(arm, cfg, reference_state), args, device)
    x0, cond, timestep, target = make_batch(args, device)
    schedule = FlowSchedule()
    generator = torch.Generator(device=device).manual_seed(1)  # the same draws, step for step, in every arm

    def predict(x_t, t):
        with train_arms.autocast(device, dtype):
            return model(x_t, timestep=t, **cond).sample

    def loss():
        if args.loss == "flow":
            return flow_loss(predict, schedule, x0, generator)
        return F.mse_loss(predict(x0, timestep).float(), target)
    return train_arms.training_step(model, opt, loss)


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384, help="Token width (= caption projection width).")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dual", type=int, default=0,
                   help="SD3.5-style: the first N blocks also get an image-only attention (dual_attention_layers).")
    p.add_argument("--qk-norm", default=None, choices=QK_NORMS,
                   help="q/k norm; default rms_norm with --dual (SD3.5), none without (SD3).")
    p.add_argument("--latent", type=int, default=32, help="Latent side (32 = 256 px with SD3's VAE; 256 tokens).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=154, help="Joint text tokens per prompt (SD3: 77 + 256).")
    p.add_argument("--joint-dim", type=int, default=1024, help="Joint text feature width (SD3: 4096).")
    p.add_argument("--pooled-dim", type=int, default=512, help="Pooled text width (SD3: 2048).")
    p.add_argument("--pos-embed-max-size", type=int, default=64,
                   help="Side of the stored sin/cos table that (a) and (b) crop (SD3: 192).")
    p.add_argument("--loss", default="flow", choices=("flow", "mse"),
                   help="flow: SD3's rectified-flow loss (flow_loss); mse: against a fixed random target.")
    train_arms.add_run_args(p, ARMS)
    args = train_arms.parse(p, argv, SMOKE)
    if args.hidden % args.heads:
        p.error("--hidden must be a multiple of --heads")
    if not 0 <= args.dual <= args.layers:
        p.error("--dual must lie in 0..--layers")
    if args.qk_norm is None:  # SD3.5 normalises q and k in every block; SD3 does not
        args.qk_norm = "rms_norm" if args.dual else "none"
    if args.latent % 2 or args.latent > args.pos_embed_max_size * 2:
        p.error("--latent must be even and fit the stored table (latent / 2 <= --pos-embed-max-size)")
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; expected some of {ARMS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = sd3_config(args)
    from diffusers import SD3Transformer2DModel
    style = f"SD3.5-style ({args.dual} dual-attention blocks)" if args.dual else "SD3"
    description = (f"{style} {args.hidden} wide x {args.layers} blocks ({args.heads} heads, qk_norm {cfg['qk_norm']}), "
                   f"latent {args.latent} ({(args.latent // 2) ** 2} tokens), {args.text_tokens} text tokens x "
                   f"{args.joint_dim}, pooled {args.pooled_dim}, batch {args.batch}, {args.loss} loss")
    # same weights and draws: (a) and (b) agree at the first warm-up step, (c) differs (no table, causal blocks)
    return train_arms.run("sd3_train", args, cfg, SD3Transformer2DModel, make_step, description,
                          tokens=(args.latent // 2) ** 2, text_tokens=args.text_tokens, dual=args.dual,
                          qk_norm=cfg["qk_norm"], loss=args.loss)


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # a script's own choice; main() called in-process leaves logging alone
    main()
