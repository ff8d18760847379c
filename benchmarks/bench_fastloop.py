"""Training throughput of the replication's small models: `fastloop` against `finetune`, measured in one run.

    python benchmarks/bench_fastloop.py                              # CPU: the replication's model, batch 32
    python benchmarks/bench_fastloop.py --device cuda --batch 256    # GPU: adds graphed and concurrent arms

Rows (images/s): finetune's loop (accelerate, DataLoader over images in memory: the peer), one fastloop arm
eager, one graphed (CUDA), and --arms arms at once, eager and graphed. Ratios are against the peer. The model
is the replication's LEDiT (2.5M parameters, 16x16 tokens, causal blocks and the locality conv) from scratch
on shapes renders; prints one JSON line.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.data.images import ArrayImageDataset  # noqa: E402
from ledit_convert.training.fastcheck import measure_throughput  # noqa: E402
from ledit_convert.training.fastloop import Arm, ArmConfig, DeviceData  # noqa: E402
from ledit_convert.models.dit import LEDiTTransformer2DModel  # noqa: E402
from ledit_convert.replication.shapes import ShapesDataset  # noqa: E402

MODEL = dict(sample_size=32, patch_size=2, in_channels=3, out_channels=6, hidden_size=128, num_layers=8,
             num_attention_heads=4, num_classes=4, attention_layout=["self", "causal"] * 4)


def finetune_rate(model_cfg, images, labels, batch: int, steps: int, warmup: int, device: str) -> float:
    """images/s of finetune's own step loop (train_step + EMA) after `warmup` untimed steps."""
    from ledit_convert.training.finetune import setup, train_step
    from ledit_convert.training.recipe import load_recipe
    from ledit_convert.training.runstate import update_ema
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LEDiTTransformer2DModel(**model_cfg).save_pretrained(f"{tmp}/model")
        recipe = load_recipe(None, dict(resolution=model_cfg["sample_size"], vae="none", global_batch_size=batch,
                                        steps=steps + warmup, num_workers=2, trackers=[], validate_every=0,
                                        max_grad_norm=1.0, attention_backend="sdpa",
                                        mixed_precision="bf16" if device == "cuda" else "no"))
        run = setup(f"{tmp}/model", ArrayImageDataset(images, labels), recipe, f"{tmp}/run")
        data = iter(run.loader)
        for i in range(steps + warmup):
            if i == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            train_step(run, next(data))
            update_ema(run.ema_trainable, run.trainable, recipe.ema_decay)
        if device == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--arms", type=int, default=4)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    model_cfg = dict(MODEL, hidden_size=args.hidden, num_layers=args.layers,
                     attention_layout=["self", "causal"] * (args.layers // 2))
    ds = ShapesDataset(args.items, model_cfg["sample_size"], num_classes=4, seed=0)
    images, labels = ds.images(), ds.labels
    data = DeviceData(images, labels, args.device)
    cfg = ArmConfig(batch=args.batch, lr=6e-4, mixed_precision="bf16" if args.device == "cuda" else "no")

    def make_arm(graphed: bool) -> Arm:
        torch.manual_seed(0)
        return Arm(LEDiTTransformer2DModel(**model_cfg), data, cfg, graphed=graphed)

    peer = finetune_rate(model_cfg, images, labels, args.batch, args.steps, args.warmup, args.device)
    fast = measure_throughput(make_arm, arms=args.arms, steps=args.steps, untimed_steps=args.warmup)
    rows = {"finetune (peer)": peer, **{k: v for k, v in fast.items() if k not in ("arms", "steps")}}
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "batch": args.batch, "arms": args.arms, "images_per_s": rows,
           "ratio_vs_finetune": {k: v / peer for k, v in rows.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
