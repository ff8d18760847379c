"""A small-scale replication of LEDiT's Tables 1a and 2 on procedurally generated shapes, fully offline.

    python benchmarks/replicate.py --scale quick                       # 2 CPU cores, about an hour
    python benchmarks/replicate.py --scale evidence --device cuda      # minutes on one GPU
    python benchmarks/replicate.py --scale evidence --device cpu       # resumable: rerun to continue

Geometry as in the paper: a 16x16 token grid at the base size (32 px, patch 2, pixel space),
evaluated at 1.5x and 2x per side (2.25x and 4x the tokens) and at 48x64 (height x width).
Arms, same seeds and budgets: the base DiT with its sin/cos table extrapolated and interpolated;
base samples upscaled; the DiT trained further (compute-matched control); surgery + fine-tune for
NoPE only, NoPE + causal, NoPE + conv and full LEDiT; LEDiT from scratch as specified and with the
paper's refinement (LayerNorm after the conv, a single causal block). Metrics: FID (Inception),
precision/recall, single-object and compactness rates, and shape accuracy of a classifier trained on
real renders at each size. Every stage writes its output under --out and is skipped when present,
so an interrupted run continues where it stopped; --deadline stops training in time to evaluate.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.data import ArrayImageDataset  # noqa: E402
from ledit_convert.evaluate import label, markdown_table, plot_metric, reference_from_images  # noqa: E402
from ledit_convert.export import write_model_folder  # noqa: E402
from ledit_convert.finetune import finetune  # noqa: E402
from ledit_convert.model import LEDiTTransformer2DModel, sincos_position_table  # noqa: E402
from ledit_convert.recipe import load_recipe  # noqa: E402
from ledit_convert.shapes import ShapesDataset  # noqa: E402
from ledit_convert.surgery import SurgeryOptions, surgery_to_folder  # noqa: E402

BASE = 32
RESOLUTIONS = [(32, 32), (48, 48), (64, 64), (48, 64)]
SHIPPED_BASE = Path(__file__).resolve().parents[1] / "ledit_convert" / "assets" / "shapes-dit-base.pt"
MODEL = dict(sample_size=BASE, patch_size=2, in_channels=3, out_channels=6, hidden_size=128, num_layers=8,
             num_attention_heads=4, num_classes=4)
SCALES = {
    # train_items renders, steps x batch per stage, samples per (arm, resolution), DDPM steps for sampling
    "smoke": dict(train_items=64, base_steps=4, ft_steps=2, scratch_steps=4, batch=8, samples=8, ref_items=16,
                  sample_steps=4, seeds=[0], workers=0, base_lr=6e-4, ft_lr=2e-4, classifier_steps=20),
    "quick": dict(train_items=4096, base_steps=1500, ft_steps=100, scratch_steps=300, batch=16, samples=100,
                  ref_items=300, sample_steps=25, seeds=[0], workers=1, base_lr=6e-4, ft_lr=2e-4,
                  classifier_steps=150),
    "evidence": dict(train_items=20000, base_steps=6000, ft_steps=1500, scratch_steps=6000, batch=128, samples=500,
                     ref_items=1000, sample_steps=50, seeds=[0, 1], workers=6, base_lr=6e-4, ft_lr=2e-4,
                     classifier_steps=150),
}
# name -> surgery options (None: no surgery, the DiT itself is trained further)
FINETUNE_ARMS = {
    "dit-continued": None,
    "nope": SurgeryOptions(causal_layers="none", locality="none"),
    "nope+causal": SurgeryOptions(causal_layers="alternate", locality="none"),
    "nope+conv": SurgeryOptions(causal_layers="none", locality="full"),
    "ledit": SurgeryOptions(),
}
SCRATCH_ARMS = {
    "ledit-scratch": dict(attention_layout=["self", "causal"] * 4),
    "ledit-scratch-refined": dict(attention_layout=["causal"] + ["self"] * 7, locality_post_norm=True),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


#################################################################################
#                                 Data and base                                 #
#################################################################################

def render_set(out: Path, name: str, n: int, res, seed: int, classes: int) -> np.ndarray:
    """Render n scenes at a size (cached as npz); the same seed gives the same scenes at every size."""
    path = out / "data" / f"{name}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["images"], f["labels"]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(n, res, num_classes=classes, seed=seed)
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:  # rendering is per-image numpy work
        images = np.stack(list(pool.map(ds.render, range(n), chunksize=256)))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=ds.labels)
    os.replace(tmp, path)
    return images, ds.labels


def recipe_for(cfg: dict, steps: int, lr: float, seed: int, device: str) -> object:
    return load_recipe(None, dict(
        resolution=BASE, vae="none", steps=steps, global_batch_size=cfg["batch"], learning_rate=lr,
        ema_decay=0.999, class_dropout=0.1, max_grad_norm=1.0, seed=seed, num_workers=cfg["workers"],
        checkpoint_every=max(steps // 4, 1), keep_checkpoints=1, log_every=max(steps // 20, 1), validate_every=0,
        trackers=[], mixed_precision="bf16" if device == "cuda" else "no", attention_backend="sdpa"))


def to_facebook_format(model_dir: Path, path: Path) -> None:
    """Our DiT-mode folder -> a facebookresearch-style raw state dict with its pos_embed table."""
    model = LEDiTTransformer2DModel.from_pretrained(model_dir)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grid = BASE // MODEL["patch_size"]
    sd["pos_embed"] = sincos_position_table(MODEL["hidden_size"], grid, grid, grid, grid).float()[None]
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)


def train_base(out: Path, cfg: dict, data, device: str) -> Path:
    """The 'pretrained DiT': sin/cos PE, all self-attention, trained at the base size; facebookresearch format."""
    path = out / "base" / "shapes-dit-base.pt"
    if path.exists():
        return path
    init = out / "base" / "init"
    if not init.exists():
        torch.manual_seed(0)
        LEDiTTransformer2DModel(**MODEL, position_encoding="sincos", locality="none",
                                attention_scaling="none").save_pretrained(init)
    recipe = recipe_for(cfg, cfg["base_steps"], cfg["base_lr"], 0, device)
    summary = finetune(str(init), data, recipe, str(out / "base" / "run"), resume="latest")
    to_facebook_format(out / "base" / "run" / "model", path)
    (out / "base" / "training.json").write_text(json.dumps(summary, indent=2))
    return path


#################################################################################
#                                      Arms                                     #
#################################################################################

def dit_folder(base: Path, folder: Path) -> Path:
    """The base checkpoint as one of our folders in DiT mode (for training it further)."""
    if not folder.exists():
        from ledit_convert.checkpoints import read_checkpoint
        ckpt = read_checkpoint(str(base), num_heads=MODEL["num_attention_heads"])
        write_model_folder(folder, ckpt.config, ckpt.state_dict, overwrite=False)
    return folder


def train_arms(out: Path, cfg: dict, data, base: Path, device: str, deadline: float, only=None) -> None:
    """Fine-tune arms (every seed), then the from-scratch arms; stops starting new ones past the deadline."""
    # most important first, so a deadline cuts the least: every arm at the first seed, then the rest
    jobs = [(name, cfg["seeds"][0]) for name in FINETUNE_ARMS] + [(name, cfg["seeds"][0]) for name in SCRATCH_ARMS]
    jobs += [(name, seed) for seed in cfg["seeds"][1:] for name in FINETUNE_ARMS]
    if only:
        jobs = sorted((j for j in jobs if j[0] in only), key=lambda j: (j[1], only.index(j[0])))
    for name, seed in jobs:
        run = out / "arms" / f"{name}-s{seed}"
        if (run / "model" / "config.json").exists():
            continue
        if time.time() > deadline:
            log(f"deadline reached: {name} seed {seed} not trained")
            continue
        t0 = time.time()
        if name in SCRATCH_ARMS:
            init = out / "arms" / f"{name}-init"
            if not init.exists():
                torch.manual_seed(seed)
                LEDiTTransformer2DModel(**MODEL, **SCRATCH_ARMS[name]).save_pretrained(init)
            recipe = recipe_for(cfg, cfg["scratch_steps"], cfg["base_lr"], seed, device)
        else:
            init = out / "arms" / f"{name}-init"
            opts = FINETUNE_ARMS[name]
            if opts is None:
                dit_folder(base, init)
            elif not init.exists():
                surgery_to_folder(str(base), init, opts, num_heads=MODEL["num_attention_heads"])
            recipe = recipe_for(cfg, cfg["ft_steps"], cfg["ft_lr"], seed, device)
        summary = finetune(str(init), data, recipe, str(run), resume="latest")
        (run / "training.json").write_text(json.dumps(dict(summary, seconds=time.time() - t0), indent=2))
        log(f"trained {name} seed {seed}: loss {summary['losses'][-1]:.4f} in {time.time() - t0:.0f}s")


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def sample(model, res, n: int, steps: int, seed: int, device: str, position_mode=None) -> np.ndarray:
    """n class-balanced samples (uint8 NHWC), per-image seeds shared by every arm."""
    from ledit_convert.pipeline import LEDiTPipeline, default_scheduler
    from ledit_convert.sampling import plan_labels, sample_array
    pipe = LEDiTPipeline(transformer=model, vae=None, scheduler=default_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)
    labels = plan_labels(n, None, MODEL["num_classes"])
    call = dict(height=res[0], width=res[1], num_inference_steps=steps, guidance_scale=1.5, guidance_channels=None,
                position_mode=position_mode)
    batch = 500 if device == "cuda" else 50
    return sample_array(pipe, labels, seed, batch, **call)


def upscale(images: np.ndarray, res) -> np.ndarray:
    """The trivial baseline: base-size samples resized (bicubic) to the target size."""
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(im).resize((res[1], res[0]), Image.BICUBIC)) for im in images])


def models_to_evaluate(out: Path, cfg: dict, base: Path):
    """(arm, seed, folder or checkpoint, position mode) for every trained model."""
    yield "dit-extrapolate", 0, base, "extrapolate"
    yield "dit-interpolate", 0, base, "interpolate"
    for name in list(FINETUNE_ARMS) + list(SCRATCH_ARMS):
        for seed in cfg["seeds"]:
            folder = out / "arms" / f"{name}-s{seed}" / "model"
            if (folder / "config.json").exists():
                yield name, seed, folder, ("extrapolate" if name == "dit-continued" else None)


def load_model(path: Path, device: str):
    """A DiT checkpoint file or a LEDiT folder, in eval mode on `device`."""
    from ledit_convert.checkpoints import build_model, read_checkpoint
    model = build_model(read_checkpoint(str(path), num_heads=MODEL["num_attention_heads"]))
    model.set_attention_backend("sdpa")
    return model.to(device).eval()


def evaluate_all(out: Path, cfg: dict, base: Path, device: str, extractor, only=None) -> list:
    """Rows for every (arm, seed, resolution), cached one per line in rows.jsonl; sample grids saved."""
    from ledit_convert.evaluate import score
    from ledit_convert.structure import object_stats, shape_accuracy, train_shape_classifier
    rows_path = out / "rows.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["arm"], r["seed"], r["resolution"])] = r
    refs, classifiers, grids = {}, {}, {}
    for res in RESOLUTIONS:
        images, labels = render_set(out, f"ref_{label(res)}", cfg["ref_items"], res, 1000, MODEL["num_classes"])
        refs[res] = reference_from_images(images, extractor)
        classifiers[res] = train_shape_classifier(res[0], res[1], MODEL["num_classes"], seed=0,
                                                  steps=cfg["classifier_steps"])
    labels = np.arange(cfg["samples"]) % MODEL["num_classes"]
    arms = list(models_to_evaluate(out, cfg, base)) + [("upscale", 0, base, "extrapolate")]
    if only:
        arms = sorted((a for a in arms if a[0] in only), key=lambda a: only.index(a[0]))
    for arm, seed, path, mode in arms:
        model = load_model(path, device)
        needed = {res: 8 if (arm, seed, label(res)) in done else cfg["samples"] for res in RESOLUTIONS}
        if arm == "upscale":  # base-size samples once; per-image seeds make the first n of them any n-sample run
            base_images = sample(model, RESOLUTIONS[0], max(needed.values()), cfg["sample_steps"], 0, device, mode)
        for res in RESOLUTIONS:
            key = (arm, seed, label(res))
            n = needed[res]  # a scored row only needs its grid row again
            t0 = time.time()
            if arm == "upscale":
                images = upscale(base_images[:n], res)
            else:
                images = sample(model, res, n, cfg["sample_steps"], 0, device, mode)
            grids.setdefault(res, []).append((f"{arm} s{seed}", images[:8]))
            if key in done:
                continue
            row = {"arm": arm, "seed": seed, "resolution": label(res), "height": res[0], "width": res[1],
                   "samples": len(images), "sample_seconds": time.time() - t0}
            row.update(score(images, refs[res], extractor))
            stats = object_stats(images)
            row.update(single_object_rate=float(stats["single_object_rate"]), object_rate=float(stats["object_rate"]),
                       shape_accuracy=float(shape_accuracy(classifiers[res], images, labels)))
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            done[key] = row
            log(f"{arm} s{seed} @ {label(res)}: FID {row['fid']:.1f} single-object {row['single_object_rate']:.2f} "
                f"shape acc {row['shape_accuracy']:.2f}")
    save_grids(out, grids)
    return list(done.values())


def save_grids(out: Path, grids: dict) -> None:
    """One PNG per resolution: a row of 8 samples (2 per class) per arm."""
    from PIL import Image
    for res, rows in grids.items():
        pad = 2
        h, w = res
        canvas = np.full((len(rows) * (h + pad) + pad, 8 * (w + pad) + pad, 3), 255, np.uint8)
        for r, (_, imgs) in enumerate(rows):
            for c, im in enumerate(imgs[:8]):
                canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
        Image.fromarray(canvas).save(out / f"grid_{label(res)}.png")
        (out / f"grid_{label(res)}.txt").write_text("\n".join(name for name, _ in rows) + "\n")


#################################################################################
#                                     Report                                    #
#################################################################################

def report(out: Path, rows: list, meta: dict) -> None:
    """Mean over seeds with the spread (half the range), as JSON, markdown tables and a plot."""
    merged = {}
    for r in rows:
        merged.setdefault((r["arm"], r["resolution"]), []).append(r)
    table = []
    for (arm, res), group in merged.items():
        row = {"model": arm, "resolution": res, "seeds": len(group)}
        for metric in ("fid", "precision", "recall", "single_object_rate", "object_rate", "shape_accuracy"):
            vals = [g[metric] for g in group if g.get(metric) is not None]
            if vals:
                row[metric] = float(np.mean(vals))
                row[metric + "_spread"] = float((max(vals) - min(vals)) / 2)
        table.append(row)
    md = [f"# Replication ({meta['scale']} scale)\n", f"{json.dumps(meta)}\n"]
    for metric in ("fid", "single_object_rate", "shape_accuracy", "precision", "recall"):
        md.append(f"\n## {metric}\n\n" + markdown_table(table, metric))
    (out / "results.md").write_text("".join(md))
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": table}, indent=2))
    plot_metric(table, str(out / "fid.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="quick", choices=sorted(SCALES))
    parser.add_argument("--out", default=None, help="Run folder (default runs/replication-<scale>).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", default=None, help="A base DiT checkpoint to reuse instead of training one "
                                                     "(default: the shipped one when present, except at smoke scale).")
    parser.add_argument("--train-base", action="store_true", help="Train the base even if a shipped one exists.")
    parser.add_argument("--deadline", type=float, default=None, help="Seconds after which no new training starts.")
    parser.add_argument("--inception-weights", default=None, help="FID Inception TorchScript (default: shipped).")
    parser.add_argument("--arms", default=None, help="Comma list: train and evaluate only these arms, in this order.")
    args = parser.parse_args()
    cfg = SCALES[args.scale]
    only = [a.strip() for a in args.arms.split(",")] if args.arms else None
    out = Path(args.out or f"runs/replication-{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.deadline if args.deadline else float("inf")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images, labels = render_set(out, "train_32", cfg["train_items"], BASE, 0, MODEL["num_classes"])
    data = ArrayImageDataset(images, labels)
    log(f"data: {len(images)} renders at {BASE}px")
    times = {}
    if args.base:
        base = Path(args.base)
    elif SHIPPED_BASE.exists() and not args.train_base and args.scale != "smoke":
        base = SHIPPED_BASE
    else:
        t0 = time.time()
        base = train_base(out, cfg, data, args.device)
        times["base_s"] = time.time() - t0
    log(f"base DiT: {base}")
    t0 = time.time()
    train_arms(out, cfg, data, base, args.device, deadline, only)
    times["arms_s"] = time.time() - t0
    from ledit_convert.fid import InceptionFeatures
    extractor = InceptionFeatures(args.inception_weights, device=args.device)
    t0 = time.time()
    rows = evaluate_all(out, cfg, base, args.device, extractor, only)
    times["evaluate_s"] = time.time() - t0
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    meta = dict(scale=args.scale, device=device_name, torch=torch.__version__, base=str(base), config=cfg,
                model=MODEL, seconds=dict(times, total_s=time.time() - start))
    report(out, rows, meta)
    log(f"done in {time.time() - start:.0f}s: {out / 'results.md'}")


if __name__ == "__main__":
    main()
