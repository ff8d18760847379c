"""The first steps after surgery, measured without sampling: held-out loss and the position probe along a short
fine-tune from the shipped base DiT, for LEDiT variants and the DiT trained further. Sized for a CPU.

    python benchmarks/early_recovery.py                      # 5 arms x 16K images at batch 32, about 40 min on 2 cores
    python benchmarks/early_recovery.py --images 2000 --every 1000 --arms ledit,dit-continued   # minutes

Arms are the replication's (benchmarks/replicate.py) with its kind of schedule: the base's LR (6e-4 at batch
128, scaled by sqrt(batch / 128)) after a warm-up over 5% of the run, and an EMA half-life in images with a
ramp-up; `ledit@old` is LEDiT with the earlier harness's schedule (LR 2e-4, fixed EMA decay 0.999). Every --every images: the held-out
loss of the EMA and raw weights (fixed draws, eval mode; also at t < 300 and t >= 300) and the probe R^2 of
token row and column at the middle block (mean over t = 100, 500, 900). Rows to <out>/rows.jsonl, a markdown
table to stdout.
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledit_convert.conversion.checkpoints import build_model, read_checkpoint  # noqa: E402
from ledit_convert.training.diffusion import DiffusionSchedule  # noqa: E402
from ledit_convert.training.fastloop import Arm, ArmConfig, DeviceData, train_concurrently  # noqa: E402
from ledit_convert.training.periodic import heldout_loss  # noqa: E402
from ledit_convert.replication.probe import norm_matching_factor, probe_model, rescale_patch_embedding  # noqa: E402
from ledit_convert.replication.shapes import ShapesDataset  # noqa: E402
from ledit_convert.conversion.surgery import convert  # noqa: E402
from replicate import ARMS  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / "ledit_convert" / "assets" / "shapes-dit-base.pt"


def renders(n: int, seed: int):
    ds = ShapesDataset(n, 32, num_classes=4, seed=seed)
    return ds.images(), np.asarray(ds.labels, dtype=np.int64)


def initial_model(name: str, calibration: torch.Tensor):
    """The base itself, or surgery on it (with the token norm matched for ledit+norm)."""
    ckpt = read_checkpoint(str(BASE), num_heads=4)
    spec = ARMS[name]
    if spec["init"] == "dit":
        return build_model(ckpt)
    state = convert(ckpt, spec["surgery"])[:2]
    if spec.get("match_norm"):
        state, _ = rescale_patch_embedding(state, norm_matching_factor(build_model(ckpt), calibration))
    return build_model(dataclasses.replace(ckpt, config=state[0], state_dict=state[1]))


def schedule_for(kind: str, batch: int, seed: int, images: int) -> ArmConfig:
    if kind == "old":
        return ArmConfig(batch=batch, lr=2e-4, ema_decay=0.999, seed=seed)
    return ArmConfig(batch=batch, lr=6e-4 * math.sqrt(batch / 128), lr_warmup_steps=max(images // 20 // batch, 1),
                     ema_half_life_images=images / 4, ema_rampup_ratio=0.05, seed=seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="ledit@old,ledit,ledit+norm,ledit-scan-d2,dit-continued")
    parser.add_argument("--images", type=int, default=16_000)
    parser.add_argument("--every", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-items", type=int, default=4096)
    parser.add_argument("--heldout-items", type=int, default=256)
    parser.add_argument("--probe-images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/early-recovery")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = renders(args.train_items, 0)
    held_images, held_labels = renders(args.heldout_items, 500)
    held = (torch.from_numpy(held_images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, torch.from_numpy(held_labels))
    data, schedule = DeviceData(images, labels, "cpu"), DiffusionSchedule()
    arms = {}
    for entry in args.arms.split(","):
        name, _, kind = entry.partition("@")
        arms[entry] = Arm(initial_model(name, held[0][:64]), data,
                          schedule_for(kind or "new", args.batch, args.seed, args.images))
    rows, t0 = [], time.time()
    for point in range(0, args.images + 1, args.every):
        steps = point // args.batch - next(iter(arms.values())).step_count
        if steps:
            train_concurrently(list(arms.values()), steps)
        for entry, arm in arms.items():
            row = {"arm": entry, "images": point, "seconds": time.time() - t0}
            for weights, model in (("ema", arm.ema), ("raw", arm.model)):
                row.update({f"{k}_{weights}": v for k, v in heldout_loss(model, schedule, *held).items()})
            depth = arm.ema.config.num_layers
            probe = probe_model(arm.ema, held[0][:args.probe_images], timesteps=(100, 500, 900),
                                labels=held[1][:args.probe_images], seed=0, layers=[depth // 2 - 1])
            row["probe_row_mid"] = float(np.mean([r["row"] for r in probe]))
            row["probe_col_mid"] = float(np.mean([r["col"] for r in probe]))
            arm.model.train()
            rows.append(row)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"[{time.time() - t0:.0f}s] {point} images", flush=True)
    print("| arm | images | held-out loss EMA | raw | EMA t>=300 | probe R^2 row / col (mid, EMA) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['images']} | {r['heldout_loss_ema']:.4f} | {r['heldout_loss_raw']:.4f} | "
              f"{r.get('heldout_loss_t_ge_300_ema', float('nan')):.4f} | {r['probe_row_mid']:.2f} / "
              f"{r['probe_col_mid']:.2f} |")


if __name__ == "__main__":
    main()
