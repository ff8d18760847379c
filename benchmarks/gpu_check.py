"""Correctness of the GPU attention paths before any timing: every backend against the textbook formula.

    python benchmarks/gpu_check.py            # needs CUDA; prints one line per check and a JSON summary
    python benchmarks/gpu_check.py --sync-only               # host-device syncs in a fine-tune step (CUDA)
    python benchmarks/gpu_check.py --sync-only --device cpu  # the same code path, without detection

Checks, in float32 with TF32 off: FlexAttention (block masks) and SDPA (dense boolean mask, is_causal
for the 1D scan) against the explicit softmax for every scan on a non-square 24x40 grid (both readings
of scan (d) on 16x16 too);
compiled blocks (inductor, FlexAttention inside the graph) against eager math, outputs and every
gradient of a training step; our DiT mode against diffusers' DiTTransformer2DModel; the bf16 forward
against fp32. Exits non-zero if any of these fails. `--sync-only` instead reports whether a fine-tune
step (bf16, FlexAttention, fused AdamW, EMA) makes any host-device sync, under
torch.cuda.set_sync_debug_mode("error"); bench_all.py runs it after the timings.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.models.attention import CAUSAL_SCANS  # noqa: E402
from ledit_convert.models.compiling import compile_blocks  # noqa: E402
from ledit_convert.models.dit import LEDiTTransformer2DModel  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_model(**kw):
    torch.manual_seed(0)
    model = LEDiTTransformer2DModel(**kw)
    with torch.no_grad():  # non-zero everywhere so every path matters
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.cuda().eval()


def step_host_syncs(device: str) -> str:
    """Run fine-tune steps of a tiny LEDiT on `device`; on CUDA with sync detection on. "" if none, else the
    first sync's message."""
    import numpy as np
    from PIL import Image

    from ledit_convert.training.finetune import setup, train_step
    from ledit_convert.training.recipe import load_recipe
    from ledit_convert.training.runstate import update_ema
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        LEDiTTransformer2DModel(sample_size=16, patch_size=2, in_channels=3, out_channels=6, hidden_size=64,
                                num_layers=2, num_attention_heads=2, num_classes=2,
                                attention_layout=["self", "causal"]).save_pretrained(tmp / "model")
        for c in range(2):
            (tmp / "images" / f"class{c}").mkdir(parents=True)
            for i in range(8):
                pixels = np.random.default_rng(8 * c + i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp / "images" / f"class{c}" / f"{i}.png")
        recipe = load_recipe(None, dict(resolution=16, vae="none", global_batch_size=4, num_workers=0, steps=10,
                                        mixed_precision="bf16" if device == "cuda" else "no", trackers=[],
                                        validate_every=0, log_every=100, checkpoint_every=100))
        run = setup(str(tmp / "model"), str(tmp / "images"), recipe, str(tmp / "run"))
        data = iter(run.loader)
        batches = [next(data) for _ in range(4)]  # pinned on the host before detection starts

        def step(batch):
            train_step(run, batch)
            update_ema(run.ema_trainable, run.trainable, recipe.ema_decay)
        step(batches[0])  # warm-up: block masks built, kernels compiled
        if device != "cuda":
            for batch in batches[1:]:
                step(batch)
            return ""
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches[1:]:
                step(batch)
        except RuntimeError as e:
            return str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sync-only", action="store_true", help="Only the host-sync check of a fine-tune step.")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.sync_only:
        found = step_host_syncs(args.device)
        print(f"{'host-device syncs in a fine-tune step':48} {found or 'none'}")
        print(json.dumps({"device": args.device, "host_sync": found or None}))
        sys.exit(0)
    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results, ok = {}, True
    common = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, hidden_size=256, num_layers=4,
                  num_attention_heads=4, num_classes=1000)
    for scan in CAUSAL_SCANS:
        model = random_model(**common, position_encoding="none", attention_layout=["causal"] * 4, causal_scan=scan)
        scan_d = scan in ("mask_lower_right_corner", "row_or_column_major")  # both readings of the paper's (d)
        shapes = [(48, 80), (32, 32)] if scan_d else [(48, 80)]  # each shape compiles
        for h, w in shapes:
            x = torch.randn(2, 4, h, w, device="cuda")
            t = torch.tensor([10, 900], device="cuda")
            y = torch.tensor([1, 1000], device="cuda")
            outs = {}
            with torch.no_grad():
                for backend in ("math", "sdpa", "flex"):
                    model.set_attention_backend(backend)
                    outs[backend] = model(x, t, y).sample
            for backend in ("sdpa", "flex"):
                err = rel(outs[backend], outs["math"])
                key = f"{scan}/{h // 2}x{w // 2}/{backend}"
                results[key] = err
                ok &= err < 1e-4
                print(f"{key:48} rel err {err:.2e}")
    # compiled blocks (auto backend: FlexAttention traced into each block's graph) against eager math: a
    # training step's output and gradients
    import copy
    base = random_model(**common, position_encoding="none", attention_layout=["self", "causal"] * 2,
                        locality_dilation_prob=0.0).train()
    x = torch.randn(2, 4, 48, 80, device="cuda")
    t, y = torch.tensor([10, 900], device="cuda"), torch.tensor([1, 1000], device="cuda")
    ref_model = copy.deepcopy(base)
    ref_model.set_attention_backend("math")
    ref = ref_model(x, t, y).sample
    ref.square().mean().backward()
    fast = copy.deepcopy(base)
    compile_blocks(fast)
    out = fast(x, t, y).sample
    out.square().mean().backward()
    grad_err = max(rel(p.grad, q.grad) for p, q in zip(fast.parameters(), ref_model.parameters()))
    results["compiled_vs_math_output"], results["compiled_vs_math_max_grad"] = rel(out, ref), grad_err
    ok &= results["compiled_vs_math_output"] < 1e-4 and grad_err < 1e-3
    print(f"{'compiled blocks vs eager math (24x40), output':48} rel err {results['compiled_vs_math_output']:.2e}")
    print(f"{'compiled blocks vs eager math, worst gradient':48} rel err {grad_err:.2e}")
    # bf16 forward of the LEDiT against fp32 (auto backend)
    model = random_model(**common, position_encoding="none", attention_layout=["self", "causal"] * 2)
    x = torch.randn(2, 4, 64, 64, device="cuda")
    t, y = torch.tensor([10, 900], device="cuda"), torch.tensor([1, 1000], device="cuda")
    with torch.no_grad():
        ref = model(x, t, y).sample
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, y).sample
    results["bf16_vs_fp32"] = rel(low, ref)
    ok &= results["bf16_vs_fp32"] < 3e-2
    print(f"{'bf16 autocast vs fp32 (32x32 tokens)':48} rel err {results['bf16_vs_fp32']:.2e}")
    # DiT mode against diffusers' own model
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from factories import diffusers_dit
        from ledit_convert.conversion.checkpoints import build_model, read_checkpoint
        peer = diffusers_dit(seed=3, hidden=256, depth=4, heads=4, sample_size=32)
        with tempfile.TemporaryDirectory() as tmp:  # through the reader users go through
            peer.save_pretrained(tmp)
            ours = build_model(read_checkpoint(tmp))
        ours, peer = ours.cuda().eval(), peer.cuda().eval()
        x = torch.randn(2, 4, 32, 32, device="cuda")
        t, y = torch.tensor([10, 900], device="cuda"), torch.tensor([1, 10], device="cuda")
        with torch.no_grad():
            err = rel(ours(x, t, y).sample, peer(x, timestep=t, class_labels=y).sample)
        results["dit_mode_vs_diffusers"] = err
        ok &= err < 1e-5
        print(f"{'DiT mode vs diffusers DiTTransformer2DModel':48} rel err {err:.2e}")
    except ImportError as e:
        print(f"diffusers comparison skipped: {e}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ok": bool(ok),
                      "checks": results}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
