"""The replication's budget question on a CPU: one long fine-tune per arm from the shipped base DiT, with the
held-out loss and the position probe along the way and sampled scores (FID, single-object rate) at fixed budgets.

    nice -n 10 python benchmarks/cpu_evidence.py --out /root/ledit-evidence-cpu     # hours; rerun to resume
    # or one process per arm, one thread each, sharing the folder (two cores, and room for other work):
    python benchmarks/cpu_evidence.py --out F --arms ledit --threads 1 --skip-baselines &
    python benchmarks/cpu_evidence.py --out F --arms ledit+fade --threads 1
    python benchmarks/cpu_evidence.py --scale smoke --features pixels --out /tmp/e   # the plumbing, seconds

Arms (replicate.py's, at its quick-scale schedule: batch 32, LR 3e-4 after a 2K-image warm-up, EMA half-life
20K images with ramp-up 0.05, 4096 renders): LEDiT with the table cut at surgery (`ledit`), LEDiT with the table
faded out over the first 4K images (`ledit+fade`), the DiT trained further (`dit-continued`) and, with
--arms, `nope+causal`. They train together, round-robin. Every --every images each arm's EMA and raw weights
get the held-out loss (256 renders, fixed draws) and the probe R^2 of token row/column (curve.jsonl); at each
--score-at budget the EMA weights are sampled at 32, 48 and 64 px and the raw weights at 32 px (100 samples per
cell, 25 DDPM steps, CFG 1.5) into rows.jsonl, the replication's row format. The base DiT with its table
extrapolated and interpolated is scored once, after the first scored budget (or alone, with
--baselines-only), with the base's held-out loss. Arm states are saved at every --every point: a rerun with the
same --out continues from the last one and skips every row already written.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import replicate  # noqa: E402
from replicate import BASE, SCALES, Experiment, log, millions  # noqa: E402
from ledit_convert.conversion.export import write_json_atomic  # noqa: E402
from ledit_convert.training.periodic import heldout_loss  # noqa: E402
from ledit_convert.training.position_fade import suspended  # noqa: E402

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "ledit_convert" / "assets" / "shapes-dit-base.pt"
SIZES = [(32, 32), (48, 48), (64, 64)]
DEFAULTS = {  # scale -> (--every, --score-at, --final)
    "quick": (8_000, "32000,64000,128000,200000", 200_000),
    "smoke": (16, "32,64", 64),
}


def curve_rows(exp: Experiment, name: str, arm, images: int, done: set) -> list:
    """Held-out loss and probe of an arm's EMA and raw weights (the raw ones without a fading table)."""
    rows = []
    for weights in ("ema", "raw"):
        if (name, images, weights) in done:
            continue
        model = arm.ema if weights == "ema" else arm.model
        with suspended(model):
            row = {"arm": name, "images": images, "weights": weights, **heldout_loss(model, exp.schedule, *exp.heldout),
                   **exp.probe(model)}
        model.train(weights == "raw")
        rows.append(row)
    return rows


def base_row(exp: Experiment, done: set) -> list:
    """The base DiT's held-out loss and probe (arm "base", 0 images): what the fine-tunes are measured against."""
    if ("base", 0, "ema") in done:
        return []
    model = exp.base_model().eval()
    return [{"arm": "base", "images": 0, "weights": "ema", **heldout_loss(model, exp.schedule, *exp.heldout),
             **exp.probe(model)}]


def score_baselines(exp: Experiment) -> None:
    """The base DiT at every size with its table extrapolated, and interpolated past the base size (rows.jsonl)."""
    base = exp.base_model()
    exp.score(base, "dit-extrapolate", 0, 0, "ema", SIZES, position_mode="extrapolate")
    exp.score(base, "dit-interpolate", 0, 0, "ema", SIZES[1:], position_mode="interpolate")


def band_table(at: dict, images: list, arms: list) -> list:
    """Markdown lines: each arm's EMA held-out loss (`at[arm, images, weights]`, the base DiT's at ("base", 0,
    "ema")) as a multiple of the base DiT's, at low noise (t < 300, detail) and high noise (t >= 300, where the
    layout is decided), every 16K images and at the last point."""
    base = at["base", 0, "ema"]
    bands = ("heldout_loss_t_lt_300", "heldout_loss_t_ge_300")
    md = ["| images | " + " | ".join(f"{a}: t < 300 | {a}: t >= 300" for a in arms) + " |",
          "|---|" + "---|---|" * len(arms)]
    for i in [i for i in images if i and (i % 16_000 == 0 or i == images[-1])]:
        cells = [f"{at[a, i, 'ema'][b] / base[b]:.2f}x" if (a, i, "ema") in at else "" for a in arms for b in bands]
        md.append(f"| {millions(i)} | " + " | ".join(cells) + " |")
    return ["EMA held-out loss as a multiple of the base DiT's, by noise level:\n"] + md + [""]


def report(out: Path) -> str:
    """evidence.md (held-out loss and probe by images, sampled scores by budget) and two plots: the EMA held-out
    loss as a multiple of the base DiT's, and the single-object rate at 32 and 64 px, against images."""
    from ledit_convert.evaluation.evaluate import plot_metric
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()] \
        if (out / "rows.jsonl").exists() else []
    base = next((r["heldout_loss"] for r in curve if r["arm"] == "base"), None)
    arms = list(dict.fromkeys(r["arm"] for r in curve if r["arm"] != "base"))
    at = {(r["arm"], r["images"], r["weights"]): r for r in curve}
    md = ["| images | " + " | ".join(f"{a}: held-out EMA (raw) | {a}: probe row/col" for a in arms) + " |",
          "|---|" + "---|---|" * len(arms)]
    points = sorted({r["images"] for r in curve if r["arm"] != "base"})
    for images in points:
        cells = []
        for a in arms:
            ema, raw = at.get((a, images, "ema")), at.get((a, images, "raw"))
            cells += [f"{ema['heldout_loss']:.4f} ({raw['heldout_loss']:.4f})" if ema and raw else "",
                      f"{ema['probe_row_r2_mid']:.2f} / {ema['probe_col_r2_mid']:.2f}" if ema else ""]
        md.append(f"| {millions(images)} | " + " | ".join(cells) + " |")
    if base is not None:
        md.append(f"\nBase DiT: held-out loss {base:.4f}.\n")
        md += band_table(at, points, arms)
    md += ["\n| arm | images | weights | " + " | ".join(f"FID / single-object @{s}" for s in ("32", "48", "64")) + " |",
           "|---|---|---|---|---|---|"]
    cells = {(r["arm"], r["budget"], r["weights"], r["resolution"]): r for r in rows}
    for arm, budget, weights in dict.fromkeys((r["arm"], r["budget"], r["weights"]) for r in rows):
        scores = [cells.get((arm, budget, weights, s)) for s in ("32", "48", "64")]
        md.append(f"| {arm} | {millions(budget) if budget else '-'} | {weights} | " + " | ".join(
            f"{c['fid']:.1f} / {c['single_object_rate']:.2f}" if c else "" for c in scores) + " |")
    text = "\n".join(md) + "\n"
    (out / "evidence.md").write_text(text)
    if base:
        plot_metric([dict(model=r["arm"], resolution=millions(r["images"]), ratio=r["heldout_loss"] / base)
                     for r in sorted(curve, key=lambda r: r["images"]) if r["weights"] == "ema" and r["images"]
                     and r["arm"] != "base"], str(out / "evidence_heldout.png"), "ratio",
                    xlabel="training images (EMA held-out loss / base DiT's)")
    objects = [dict(model=f"{r['arm']} @{r['resolution']}", resolution=millions(r["budget"]),
                    single_object_rate=r["single_object_rate"]) for r in sorted(rows, key=lambda r: r["budget"])
               if r["weights"] == "ema" and r["budget"] and r["resolution"] in ("32", "64")]
    if objects:
        plot_metric(objects, str(out / "evidence_single_object.png"), "single_object_rate",
                    xlabel="training images (single-object rate, EMA)")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="quick", choices=sorted(DEFAULTS))
    parser.add_argument("--out", required=True, help="Run folder; a rerun with the same folder resumes.")
    parser.add_argument("--arms", default="ledit,ledit+fade,dit-continued")
    parser.add_argument("--every", type=int, default=None, help="Held-out loss and probe every this many images.")
    parser.add_argument("--score-at", default=None, help="Comma list of budgets (images) sampled and scored.")
    parser.add_argument("--final", type=int, default=None, help="Training images per arm.")
    parser.add_argument("--samples", type=int, default=None, help="Samples per scored cell (default the scale's).")
    parser.add_argument("--features", default="inception", choices=["inception", "pixels"])
    parser.add_argument("--base", default=str(SHIPPED_BASE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default torch's). One per process keeps two runs side by side efficient.")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="Do not score the base's baselines (another process sharing --out scores them).")
    parser.add_argument("--baselines-only", action="store_true",
                        help="Score the base's baselines (the rows not yet written) and the report; train nothing.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite evidence.md and the plots, train nothing.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        print(report(Path(args.out)))
        return
    every, score_at, final = DEFAULTS[args.scale]
    every, final = args.every or every, args.final or final
    score_at = sorted(int(b) for b in (args.score_at or score_at).split(","))
    cfg = dict(SCALES[args.scale], model={})  # the arms are the shipped base's size at every scale
    if args.samples:
        cfg["samples"] = args.samples
    names = [a.strip() for a in args.arms.split(",")]
    unknown = [n for n in names if n not in replicate.ARMS or replicate.ARMS[n]["init"] == "scratch"]
    if unknown:
        parser.error(f"unknown or from-scratch arms {unknown}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exp_args = argparse.Namespace(scale=args.scale, out=str(out), device=args.device, base=args.base, deadline=None,
                                  graphed="off", features=args.features, inception_weights=None, arms=None,
                                  publish=None)
    exp = Experiment(exp_args, cfg)
    curve_path = out / "curve.jsonl"
    done = set()
    if curve_path.exists():
        done = {(r["arm"], r["images"], r["weights"]) for r in map(json.loads, curve_path.read_text().splitlines())}
    rows = [] if args.skip_baselines else base_row(exp, done)
    with open(curve_path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.baselines_only:
        score_baselines(exp)
        print(report(out))
        return
    meta = {"scale": args.scale, "arms": names, "every": every, "score_at": score_at, "final": final,
            "samples": cfg["samples"], "sample_steps": cfg["sample_steps"], "features": args.features,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": replicate.device_name("cpu"),
            "config": {k: v for k, v in cfg.items() if k != "model"}}
    if (out / "meta.json").exists():  # another process sharing --out: its arms stay listed
        meta["arms"] = list(dict.fromkeys(json.loads((out / "meta.json").read_text())["arms"] + names))
    write_json_atomic(out / "meta.json", meta)  # a second process reading it never sees it half written
    arms = {(n, 0): exp.open_arm(n, 0) for n in names}
    start = min(a.step_count for a in arms.values()) * cfg["batch"]
    log(f"arms {names} from {millions(start)} images; held-out loss every {millions(every)}, scored at "
        f"{[millions(b) for b in score_at]}, to {millions(final)}")
    baselines_done = args.skip_baselines
    points = sorted({*range(0, final + 1, every), *score_at} - {p for p in score_at if p > final})
    for point in points:
        t0 = time.time()
        exp.train_to(arms, point, "cpu evidence")
        for (name, _), arm in arms.items():
            rows = curve_rows(exp, name, arm, point, done)
            with open(curve_path, "a") as f:
                f.writelines(json.dumps(dict(r, seconds=time.time() - t0)) + "\n" for r in rows)
            done.update((r["arm"], r["images"], r["weights"]) for r in rows)
            for r in rows:
                log(f"{name} {millions(point)} {r['weights']}: held-out {r['heldout_loss']:.4f} probe row/col "
                    f"{r['probe_row_r2_mid']:.2f}/{r['probe_col_r2_mid']:.2f}")
        if point not in score_at:
            continue
        for (name, seed), arm in arms.items():
            folder = out / "arms" / f"{name}-s{seed}" / "models" / str(point)
            if not (folder / "config.json").exists():
                arm.export(folder)
            exp.score(arm.ema, name, seed, point, "ema", SIZES)
            with suspended(arm.model):
                exp.score(arm.model, name, seed, point, "raw", [(BASE, BASE)])
            arm.model.train()
        if not baselines_done:
            score_baselines(exp)
            baselines_done = True
        report(out)
    report(out)
    log(f"done: {out / 'evidence.md'}")


if __name__ == "__main__":
    main()
