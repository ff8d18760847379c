"""Where position lives in a model's residual stream: the linear-probe R^2 of token row and column, and token norms.

    python benchmarks/probe_models.py                                          # the shipped base DiT and LEDiT
    python benchmarks/probe_models.py runs/replication-evidence/arms/ledit-s0/models/500000 --images 128

Noised held-out shapes renders (ShapesDataset seed 500) at t = 100, 500, 900; R^2 at the block-0 input, the
middle block and the last block; one markdown table and one JSON line (rows).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ledit_convert.conversion.checkpoints import build_model, read_checkpoint  # noqa: E402
from ledit_convert.replication.probe import probe_model, token_norms  # noqa: E402
from ledit_convert.replication.shapes import ShapesDataset  # noqa: E402

SHIPPED = [str(ROOT / "ledit_convert/assets/shapes-dit-base.pt"), str(ROOT / "ledit_convert/assets/shapes-ledit")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=SHIPPED, help="DiT checkpoint files or model folders.")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=4)
    args = parser.parse_args()
    out = []
    print("| model | t | R^2 row (input / mid / last) | R^2 col (input / mid / last) | token norm at input |")
    print("|---|---|---|---|---|")
    for path in args.models:
        model = build_model(read_checkpoint(path, num_heads=args.num_heads))
        size = model.config.sample_size
        ds = ShapesDataset(args.images, size, num_classes=model.config.num_classes, seed=500)
        x = torch.from_numpy(ds.images()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        depth = model.config.num_layers
        rows = probe_model(model, x, timesteps=(100, 500, 900), labels=labels, seed=0,
                           layers=[-1, depth // 2 - 1, depth - 1])
        name = Path(path).name
        for t in (100, 500, 900):
            mine = sorted((r for r in rows if r["t"] == t), key=lambda r: r["layer"])
            row_r2, col_r2 = (" / ".join(f"{r[axis]:.2f}" for r in mine) for axis in ("row", "col"))
            print(f"| {name} | {t} | {row_r2} | {col_r2} | {mine[0]['norm']:.2f} |")
        norms = token_norms(model, x) if model.config.position_encoding == "sincos" else None
        out.append({"model": path, "rows": rows, "clean_token_norms": norms})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
