"""A small-scale replication of LEDiT's Tables 1a, 1b and 2 on procedurally generated shapes, fully offline.

    python benchmarks/replicate.py --scale smoke --features pixels     # the harness itself, a minute on a CPU
    python benchmarks/replicate.py --scale quick                       # 2 CPU cores, hours
    python benchmarks/replicate.py --scale evidence --device cuda --deadline 400 --publish $OUT   # one GPU

Geometry as in the paper: a 16x16 token grid at the base size (32 px, patch 2, pixel space), evaluated at 1.5x
and 2x per side (2.25x and 4x the tokens) and at 48x64 (height x width). It decides between the candidate
causes of LEDiT losing at short budgets, in priority order:
  0. the base DiT (sin/cos PE), trained at the base size and measured along the way (is it right?);
  H. Table 2 in miniature, first: LEDiT and the paper's DiT-RoPE baseline (surgery to 2D RoPE, fine-tuned with
     LEDiT's budget and schedule) trained together at seed 0, the RoPE model scored extrapolated and with
     VisionNTK, VisionYaRN, RIFLEx and DyPE, the base's table extrapolated, interpolated, NTK-scaled and
     interpolated with DyPE's timestep dependence, at 1x, 1.5x and 2x;
  1. seed 0 of every other fine-tune arm at the main budget, all at once: the DiT trained further (compute-matched
     control), NoPE, NoPE + causal, NoPE + conv, LEDiT, the scan ablation (a, b, c, d in both readings) and
     LEDiT with the token norm matched at surgery; every arm with the same LR schedule and EMA half-life;
  2. the budget sweep: LEDiT and the DiT trained further go on to 32x the first sweep point, evaluated at each
     (FID, structure, held-out loss and the position probe, EMA and raw weights), with the second seed of the
     headline arms and LEDiT from scratch (as specified and refined) training alongside.
Every evaluation scores EMA weights at every size and raw weights at the base size and 2x. Rows go to
rows.jsonl as they are made; a rerun continues where a run stopped (arms resume from their saved state);
--deadline stops training in time to evaluate and publish; --publish refreshes a folder of at most 8 files
after each phase (for a GPU call's $OUT).
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.conversion.checkpoints import build_model, read_checkpoint  # noqa: E402
from ledit_convert.training.diffusion import DiffusionSchedule  # noqa: E402
from ledit_convert.evaluation.evaluate import label, markdown_table, plot_metric, reference_from_images  # noqa: E402
from ledit_convert.training.fastcheck import check_graphed_matches_eager  # noqa: E402
from ledit_convert.training.fastloop import Arm, ArmConfig, DeviceData, train_concurrently  # noqa: E402
from ledit_convert.models.dit import LEDiTTransformer2DModel, sincos_position_table  # noqa: E402
from ledit_convert.training.periodic import EvalPlan, heldout_loss, sample_images, score_samples  # noqa: E402
from ledit_convert.training.position_fade import suspended  # noqa: E402
from ledit_convert.replication.probe import norm_matching_factor, probe_model, rescale_patch_embedding  # noqa: E402
from ledit_convert.replication.shapes import ShapesDataset  # noqa: E402
from ledit_convert.conversion.surgery import SurgeryOptions, convert, surgery_options  # noqa: E402

BASE = 32
RESOLUTIONS = [(32, 32), (48, 48), (64, 64), (48, 64)]
RAW_RESOLUTIONS = [(32, 32), (64, 64)]  # raw weights are scored at the base size and 2x
SWEEP_RESOLUTIONS = [(32, 32), (64, 64)]
BASE_SHARE = 0.3  # the most of the training time (under --deadline) the base may take
MODEL = dict(sample_size=BASE, patch_size=2, in_channels=3, out_channels=6, hidden_size=128, num_layers=8,
             num_attention_heads=4, num_classes=4)
# budgets are in training images; LR is the base's at batch 128, scaled by sqrt(batch / 128) for other batches
SCALES = {
    "smoke": dict(model=dict(hidden_size=32, num_layers=2, num_attention_heads=2), train_items=64, heldout_items=16,
                  batch=8, base_budget=256, main_budget=32, sweep=[16, 32, 64], scratch_budget=32, samples=4,
                  ref_items=8, sample_steps=3, seeds=[0, 1], probe_images=8, classifier_steps=5, base_lr=6e-4,
                  ema_half_life=64, ema_rampup=0.05, warmup_images=16, fade_images=8),
    "quick": dict(model={}, train_items=4096, heldout_items=256, batch=32, base_budget=200_000, main_budget=32_000,
                  sweep=[8_000, 16_000, 32_000, 64_000, 128_000, 256_000], scratch_budget=64_000, samples=100,
                  ref_items=300, sample_steps=25, seeds=[0, 1], probe_images=32, classifier_steps=150, base_lr=6e-4,
                  ema_half_life=20_000, ema_rampup=0.05, warmup_images=2_000, fade_images=4_000),
    "evidence": dict(model={}, train_items=50_000, heldout_items=1000, batch=256, base_budget=2_000_000,
                     main_budget=500_000, sweep=[125_000, 250_000, 500_000, 1_000_000, 2_000_000, 4_000_000],
                     scratch_budget=1_000_000, samples=500, ref_items=1000, sample_steps=50, seeds=[0, 1],
                     probe_images=64, classifier_steps=150, base_lr=6e-4, ema_half_life=250_000, ema_rampup=0.05,
                     warmup_images=50_000, fade_images=62_500),
}
ARMS = {  # name -> how its model starts: the base trained further, surgery on the base, or from scratch
    "dit-continued": dict(init="dit"),
    "nope": dict(init="surgery", surgery=SurgeryOptions(causal_layers="none", locality="none")),
    "nope+causal": dict(init="surgery", surgery=SurgeryOptions(causal_layers="alternate", locality="none")),
    "nope+conv": dict(init="surgery", surgery=SurgeryOptions(causal_layers="none", locality="full")),
    "ledit": dict(init="surgery", surgery=SurgeryOptions(scan="mask_lower_right_corner")),  # scan (d), reading 1
    "ledit-scan-a": dict(init="surgery", surgery=SurgeryOptions(scan="one_dimension")),
    "ledit-scan-b": dict(init="surgery", surgery=SurgeryOptions(scan="mask_lower_right")),
    "ledit-scan-c": dict(init="surgery", surgery=SurgeryOptions(scan="unmask_neighborhood")),
    "ledit-scan-d2": dict(init="surgery", surgery=SurgeryOptions(scan="row_or_column_major")),  # (d), reading 2
    "ledit+norm": dict(init="surgery", surgery=SurgeryOptions(), match_norm=True),  # a remedy, beside the recipe
    "ledit+fade": dict(init="surgery", surgery=SurgeryOptions(), fade=True),  # the table fades out, not cut
    "ledit-scratch": dict(init="scratch", layout="alternate"),
    "ledit-scratch-refined": dict(init="scratch", layout="first", post_norm=True),  # the paper's dagger rows
    # the paper's DiT-RoPE: the table replaced by 2D RoPE, stock blocks; scored with every RoPE scaling
    "rope": dict(init="surgery", surgery=surgery_options("rope2d"), scalings=("ntk", "yarn", "riflex", "dype")),
}
HEADLINE = ["ledit", "rope"]  # trained first and together: the user's question (which method at 2x?) before the rest
BASE_SCALINGS = ("interpolate", "ntk", "dype-interpolate")  # the base's table, besides DiT's own extrapolation
# Table 2 in miniature: (row title, arm name in rows.jsonl), the paper's order
TABLE2 = [("DiT sin/cos, extrapolated", "dit-extrapolate"), ("DiT sin/cos, interpolated (PI)", "dit-interpolate"),
          ("DiT sin/cos, NTK", "dit-ntk"), ("DiT sin/cos, DyPE interpolation", "dit-dype-interpolate"),
          ("DiT-RoPE, extrapolated", "rope"), ("DiT-RoPE, VisionNTK", "rope-ntk"),
          ("DiT-RoPE, VisionYaRN", "rope-yarn"), ("DiT-RoPE, RIFLEx", "rope-riflex"), ("DiT-RoPE, DyPE (YaRN)", "rope-dype"),
          ("LEDiT", "ledit")]
PHASE1 = ["ledit", "dit-continued", "nope+causal", "ledit+fade", "ledit-scan-d2", "ledit-scan-a", "ledit-scan-b",
          "ledit-scan-c", "nope", "nope+conv", "ledit+norm"]
SWEEP_ARMS = ["ledit", "dit-continued"]
PHASE3_SEEDED = ["ledit", "ledit-scan-d2", "nope+causal", "dit-continued"]
PHASE3_SCRATCH = ["ledit-scratch", "ledit-scratch-refined"]


def scaled_name(arm: str, scaling: str) -> str:
    """The rows' name of an arm scored with a position scaling: rope-yarn, dit-ntk."""
    return f"{arm}-{scaling}"


def scored_names() -> set:
    """Every arm name rows may carry: the arms, the base and its baselines, the arms' scaled variants."""
    names = set(ARMS) | {"base", "dit-extrapolate", "upscale"} | {scaled_name("dit", m) for m in BASE_SCALINGS}
    return names | {scaled_name(n, m) for n, spec in ARMS.items() for m in spec.get("scalings", ())}


LEDIT_FAMILY = ("ledit", "ledit-scan-a", "ledit-scan-b", "ledit-scan-c", "ledit-scan-d2", "ledit+norm", "ledit+fade",
                "ledit-scratch", "ledit-scratch-refined")
SCAN_TABLE = [("(a) one_dimension", "ledit-scan-a"), ("(b) mask_lower_right", "ledit-scan-b"),
              ("(c) unmask_neighborhood", "ledit-scan-c"), ("(d) reading 1, mask_lower_right_corner", "ledit"),
              ("(d) reading 2, row_or_column_major", "ledit-scan-d2")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def millions(images: int) -> str:
    """A budget in images, short: 250K, 4M, 64."""
    for size, unit in ((1e6, "M"), (1e3, "K")):
        if images >= size:
            return f"{images / size:g}{unit}"
    return str(images)


#################################################################################
#                                Data and models                                #
#################################################################################

def render_set(out: Path, name: str, n: int, res, seed: int, classes: int):
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


def load_model(path, num_heads=None) -> LEDiTTransformer2DModel:
    """A DiT checkpoint or model folder, with the sdpa backend: "auto" would compile FlexAttention on CUDA."""
    model = build_model(read_checkpoint(str(path), num_heads=num_heads))
    model.set_attention_backend("sdpa")
    return model


def to_facebook_format(model: LEDiTTransformer2DModel, path: Path) -> None:
    """A DiT-mode model -> a facebookresearch-style raw state dict with its pos_embed table (atomic)."""
    sd = {k: v.detach().cpu().clone().float() for k, v in model.state_dict().items()}
    cfg = model.config
    grid = cfg.sample_size // cfg.patch_size
    sd["pos_embed"] = sincos_position_table(cfg.hidden_size, grid, grid, grid, grid).float()[None]
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, tmp)
    os.replace(tmp, path)


class Experiment:
    """Everything the phases share: scale, data on the device, references, classifiers and the rows so far."""

    def __init__(self, args, cfg: dict):
        self.args, self.cfg, self.device = args, cfg, torch.device(args.device).type  # "cuda:0" is "cuda"
        self.out = Path(args.out)
        self.model_cfg = dict(MODEL, **cfg["model"])
        self.heads = self.model_cfg["num_attention_heads"]
        self.deadline = time.time() + args.deadline if args.deadline else float("inf")
        self.graphed = False
        self.base_path = Path(args.base) if args.base else self.out / "base" / "shapes-dit-base.pt"
        self.meta = {"scale": args.scale, "features": args.features, "phases": {}, "throughput": {}}
        classes = self.model_cfg["num_classes"]
        images, labels = render_set(self.out, "train_32", cfg["train_items"], BASE, 0, classes)
        self.data = DeviceData(images, labels, self.device)
        held, held_labels = render_set(self.out, "heldout_32", cfg["heldout_items"], BASE, 500, classes)
        self.heldout = (torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
                        torch.from_numpy(np.asarray(held_labels, dtype=np.int64)))
        self.probe_x = self.heldout[0][:cfg["probe_images"]]
        self.probe_labels = self.heldout[1][:cfg["probe_images"]]
        self.schedule = DiffusionSchedule()
        self.rows_path = self.out / "rows.jsonl"
        self.rows = {}
        if self.rows_path.exists():
            for line in self.rows_path.read_text().splitlines():
                r = json.loads(line)
                self.rows[self.row_key(r)] = r
        self._refs = self._classifiers = None

    @staticmethod
    def row_key(r):
        return r["arm"], r["seed"], r["budget"], r["weights"], r["resolution"]

    def arm_config(self, seed: int) -> ArmConfig:
        """The same LR schedule and EMA half-life (in images) for every arm, base included."""
        c = self.cfg
        lr = c["base_lr"] * math.sqrt(c["batch"] / 128)
        return ArmConfig(batch=c["batch"], lr=lr, lr_warmup_steps=max(c["warmup_images"] // c["batch"], 0),
                         ema_half_life_images=c["ema_half_life"], ema_rampup_ratio=c["ema_rampup"],
                         class_dropout=0.1, max_grad_norm=1.0,
                         mixed_precision="bf16" if self.device == "cuda" else "no", seed=seed)

    # -- models ---------------------------------------------------------------
    def base_model(self) -> LEDiTTransformer2DModel:
        return load_model(self.base_path, self.heads)

    def initial_model(self, name: str, seed: int) -> LEDiTTransformer2DModel:
        """A fresh model for an arm: the base itself, surgery on the base, or a from-scratch init."""
        spec = ARMS[name]
        if spec["init"] == "dit":
            return self.base_model()
        if spec["init"] == "scratch":
            depth = self.model_cfg["num_layers"]
            layout = ["self", "causal"] * (depth // 2) if spec["layout"] == "alternate" else \
                ["causal"] + ["self"] * (depth - 1)
            torch.manual_seed(seed)
            return LEDiTTransformer2DModel(**self.model_cfg, attention_layout=layout,
                                           locality_post_norm=spec.get("post_norm", False))
        ckpt = read_checkpoint(str(self.base_path), num_heads=self.heads)
        config, sd, changes = convert(ckpt, spec["surgery"])
        state = (config, sd)
        if spec.get("match_norm"):
            factor = norm_matching_factor(self.base_model(), self.probe_x)
            state, note = rescale_patch_embedding(state, factor)
            log(f"{name}: {note}")
        return build_model(dataclasses.replace(ckpt, config=state[0], state_dict=state[1]))

    def open_arm(self, name: str, seed: int) -> Arm:
        """An arm, resumed from its saved state when there is one."""
        folder = self.out / "arms" / f"{name}-s{seed}"
        model = self.initial_model(name, seed)
        cfg = self.arm_config(seed)
        if ARMS[name].get("fade"):
            cfg = dataclasses.replace(cfg, position_fade_images=self.cfg["fade_images"])
        arm = Arm(model, self.data, cfg, graphed=self.graphed)
        if (folder / "state").exists():
            arm.load(folder / "state")
        return arm

    # -- training -------------------------------------------------------------
    def train_to(self, arms: dict, budget: int, label_: str, deadline: float = None) -> bool:
        """Train every arm to `budget` images together; stop at the deadline (state saved). True if reached."""
        deadline = self.deadline if deadline is None else deadline
        target = budget // self.cfg["batch"]
        chunk = max(1, min(500, target // 8))
        t0, done_images = time.time(), 0
        while True:
            behind = {k: a for k, a in arms.items() if a.step_count < target}
            if not behind:
                break
            if time.time() > deadline:
                log(f"deadline: {label_} stopped before {millions(budget)} images")
                self.save_arms(arms)
                return False
            steps = min(chunk, min(target - a.step_count for a in behind.values()))
            train_concurrently(list(behind.values()), steps)
            done_images += steps * self.cfg["batch"] * len(behind)
        self.save_arms(arms)
        seconds = time.time() - t0
        if done_images:
            rate = done_images / max(seconds, 1e-9)
            self.meta["throughput"].setdefault(label_, []).append(
                {"arms": len(arms), "images": done_images, "seconds": seconds, "images_per_s": rate})
            log(f"{label_}: {len(arms)} arm(s) to {millions(budget)} images, {rate:.0f} images/s in all")
        return True

    def save_arms(self, arms: dict) -> None:
        for (name, seed), arm in arms.items():
            folder = self.out / "arms" / f"{name}-s{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            arm.save(folder / "state")
            losses = arm.pop_losses()
            if losses:
                with open(folder / "losses.jsonl", "a") as f:
                    f.write(json.dumps({"step": arm.step_count, "loss": float(np.mean(losses))}) + "\n")

    # -- evaluation -----------------------------------------------------------
    def extractor(self):
        if self.args.features == "pixels":
            return PixelFeatures()
        from ledit_convert.evaluation.fid import InceptionFeatures
        return InceptionFeatures(self.args.inception_weights, device=self.device)

    def references(self):
        """Real renders at each size (seed 1000): FID references and the classifiers that name their shapes."""
        if self._refs is None:
            from ledit_convert.replication.structure import train_shape_classifier
            self._extractor = self.extractor()
            self._refs, self._classifiers = {}, {}
            for res in RESOLUTIONS:
                images, _ = render_set(self.out, f"ref_{label(res)}", self.cfg["ref_items"], res, 1000,
                                       self.model_cfg["num_classes"])
                self._refs[res] = reference_from_images(images, self._extractor)
                self._classifiers[res] = train_shape_classifier(res[0], res[1], self.model_cfg["num_classes"],
                                                                seed=0, steps=self.cfg["classifier_steps"])
        return self._refs

    def plan(self) -> EvalPlan:
        return EvalPlan(every=0, resolutions=RESOLUTIONS, samples=self.cfg["samples"], metrics=["fid", "structure"],
                        steps=self.cfg["sample_steps"], cfg=1.5, seed=0, batch_size=500 if self.device == "cuda" else 50,
                        references=self.references())

    def score(self, model, arm: str, seed: int, budget: int, weights: str, resolutions, position_mode=None,
              images_at=None) -> list:
        """Rows for one model at these sizes (cached in rows.jsonl); held-out loss and the probe at the base size."""
        from ledit_convert.replication.structure import shape_accuracy
        plan, new = self.plan(), []
        model = model.to(self.device).eval()
        for res in resolutions:
            row = {"arm": arm, "seed": seed, "budget": budget, "weights": weights, "resolution": label(res),
                   "height": res[0], "width": res[1]}
            if self.row_key(row) in self.rows:
                continue
            t0 = time.time()
            images = images_at(res) if images_at else sample_images(model, res, plan.samples, plan, None, position_mode)
            row["samples"], row["sample_seconds"] = len(images), time.time() - t0
            row.update({k.partition("@")[0]: v for k, v in score_samples(images, res, plan, self._extractor).items()})
            labels = np.arange(len(images)) % self.model_cfg["num_classes"]
            row["shape_accuracy"] = float(shape_accuracy(self._classifiers[res], images, labels))
            if res == (BASE, BASE) and images_at is None:
                row.update(heldout_loss(model, self.schedule, *self.heldout, seed=0))
                row.update(self.probe(model))
            self.add_row(row)
            new.append(row)
            log(f"{arm} s{seed} {millions(budget)} {weights} @ {label(res)}: FID {row['fid']:.1f} "
                f"single-object {row['single_object_rate']:.2f} object {row['object_rate']:.2f}")
        return new

    def probe(self, model) -> dict:
        """Position probe R^2 (row, col) from the residual stream, mean over t: at the block-0 input (where a random
        zero-padded conv already reveals the borders), the middle block and the last block."""
        depth = model.config.num_layers
        layers = [-1, depth // 2 - 1, depth - 1]
        rows = probe_model(model, self.probe_x.to(self.device), timesteps=(100, 500, 900),
                           labels=self.probe_labels.to(self.device), seed=0, layers=layers)
        out = {}
        for layer, where in zip(layers, ("in", "mid", "last")):
            mine = [r for r in rows if r["layer"] == layer]
            out[f"probe_row_r2_{where}"] = float(np.mean([r["row"] for r in mine]))
            out[f"probe_col_r2_{where}"] = float(np.mean([r["col"] for r in mine]))
        return out

    def add_row(self, row: dict) -> None:
        """Keep a row: rows.jsonl here, and a copy in the publish folder at once (a killed run keeps it)."""
        self.rows[self.row_key(row)] = row
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.args.publish:
            copy_atomic(self.rows_path, Path(self.args.publish) / "rows.jsonl")

    def score_arm(self, arm: Arm, name: str, seed: int, budget: int, resolutions=RESOLUTIONS) -> None:
        """EMA weights at every given size, raw weights at the base size and 2x; the EMA folder kept per budget."""
        folder = self.out / "arms" / f"{name}-s{seed}" / "models" / str(budget)
        if not (folder / "config.json").exists():
            arm.export(folder)
        self.score(arm.ema, name, seed, budget, "ema", resolutions)
        for scaling in ARMS.get(name, {}).get("scalings", ()):  # the same EMA weights, its positions scaled
            self.score(arm.ema, scaled_name(name, scaling), seed, budget, "ema", resolutions, position_mode=scaling)
        arm.join()  # the raw weights are read on this stream after the arm's queued updates
        with suspended(arm.model):  # an arm's fading table is for training only
            self.score(arm.model, name, seed, budget, "raw", [r for r in RAW_RESOLUTIONS if r in resolutions])
        arm.model.train()
        if arm.graph_error:
            self.meta.setdefault("graph_fallbacks", {})[f"{name}-s{seed}"] = arm.graph_error


class PixelFeatures:
    """A cheap stand-in for the Inception network (8x8 area-downsampled RGB) so a smoke run tests the plumbing
    in seconds; its FIDs are not comparable with Inception FIDs and rows record which features made them."""

    def features(self, images, batch_size: int = 50) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1).double().numpy()


#################################################################################
#                                     Phases                                    #
#################################################################################

# the attention paths the arms train through, each checked graphed against eager from scratch (no base needed)
CHECKED_PATHS = {
    "self-attention, sin/cos table (the base, the DiT trained further)": dict(position_encoding="sincos",
                                                                               locality="none"),
    "is_causal SDPA + conv (scan a)": dict(attention_layout="alternate", causal_scan="one_dimension"),
    "boolean-mask SDPA + conv (scans b, c, d)": dict(attention_layout="alternate"),
    "self-attention, 2D RoPE (the DiT-RoPE baseline)": dict(position_encoding="rope2d", locality="none",
                                                             attention_scaling="none"),
}


def phase_check(exp: Experiment) -> None:
    """On CUDA: graphed steps against eager ones on every attention path the arms use (all must pass, else every
    arm trains eagerly at batch 512), then samples/s of one arm eager and one graphed."""
    if exp.device != "cuda" or exp.args.graphed == "off":
        exp.meta["graphed"] = {"used": False, "why": "not CUDA" if exp.device != "cuda" else "--graphed off"}
        return

    def fresh(overrides, graphed):
        torch.manual_seed(0)
        cfg = dict(exp.model_cfg, **overrides)
        if cfg.get("attention_layout") == "alternate":
            cfg["attention_layout"] = ["self", "causal"] * (cfg["num_layers"] // 2)
        return Arm(LEDiTTransformer2DModel(**cfg), exp.data, exp.arm_config(0), graphed=graphed)
    checks = {name: check_graphed_matches_eager(functools.partial(fresh, o)) for name, o in CHECKED_PATHS.items()}
    exp.graphed = all(c["passed"] for c in checks.values())
    exp.meta["graphed"] = dict(checks=checks, used=exp.graphed)
    for name, check in checks.items():
        log(f"graphed against eager, {name}: {'passed' if check['passed'] else 'FAILED'} {check}")
    if not exp.graphed:
        log("graphed steps are off: every arm trains eagerly at batch 512")
        exp.cfg = dict(exp.cfg, batch=max(exp.cfg["batch"], 512))
    for graphed in ([False, True] if exp.graphed else [False]):
        arm = fresh(CHECKED_PATHS["boolean-mask SDPA + conv (scans b, c, d)"], graphed)
        train_concurrently([arm], 5)
        rate = train_concurrently([arm], 50)["samples_per_s"]
        exp.meta["throughput"][f"one arm, {'graphed' if graphed else 'eager'}"] = rate
        log(f"one arm {'graphed' if graphed else 'eager'}: {rate:.0f} images/s")


def phase_base(exp: Experiment) -> None:
    """The base DiT: given, or trained at the base size and measured at 1/4, 1/2 and all of its budget."""
    base_dir = exp.out / "base"
    if exp.base_path.exists():  # given with --base, or trained by an earlier run
        return
    budget = exp.cfg["base_budget"]
    torch.manual_seed(0)
    model = LEDiTTransformer2DModel(**exp.model_cfg, position_encoding="sincos", locality="none",
                                    attention_scaling="none")
    arm = Arm(model, exp.data, exp.arm_config(0), graphed=exp.graphed)
    if (exp.out / "arms" / "base-s0" / "state").exists():  # train_to saves the base's state like any arm's
        arm.load(exp.out / "arms" / "base-s0" / "state")
    t0 = time.time()
    # the base may take at most BASE_SHARE of the training time left, so that the arms it exists for still run
    limit = t0 + BASE_SHARE * (exp.deadline - t0) if math.isfinite(exp.deadline) else None
    for point in (budget // 4, budget // 2, budget):
        reached = exp.train_to({("base", 0): arm}, point, "base", limit)
        exp.score(arm.ema, "base", 0, arm.step_count * exp.cfg["batch"], "ema", [(BASE, BASE)])
        if not reached:
            break
    to_facebook_format(arm.ema, exp.base_path)
    (base_dir / "provenance.json").write_text(json.dumps({
        "trained_by": "benchmarks/replicate.py (ledit_convert.training.fastloop, DiT's objective)",
        "data": f"ShapesDataset({exp.cfg['train_items']}, {BASE}, num_classes=4, seed=0)",
        "images_seen": arm.step_count * exp.cfg["batch"], "config": dataclasses.asdict(exp.arm_config(0)),
        "seconds": time.time() - t0, "device": device_name(exp.device), "torch": torch.__version__}, indent=2))


def phase_baselines(exp: Experiment) -> None:
    """The base with its table extrapolated, interpolated, NTK-scaled and interpolated with DyPE's timestep
    dependence (all equal at the base size), and its base-size samples upscaled."""
    base = exp.base_model().to(exp.device)
    exp.score(base, "dit-extrapolate", 0, 0, "ema", RESOLUTIONS, position_mode="extrapolate")
    for scaling in BASE_SCALINGS:
        exp.score(base, scaled_name("dit", scaling), 0, 0, "ema", RESOLUTIONS[1:], position_mode=scaling)
    from PIL import Image
    plan = exp.plan()
    small = sample_images(base.to(exp.device).eval(), (BASE, BASE), plan.samples, plan, None, "extrapolate")

    def upscaled(res):
        return np.stack([np.asarray(Image.fromarray(im).resize((res[1], res[0]), Image.BICUBIC)) for im in small])
    exp.score(base, "upscale", 0, 0, "ema", RESOLUTIONS[1:], images_at=upscaled)


def train_and_score(exp: Experiment, plan: dict, title: str) -> None:
    """Train several arms together, each to its own final budget: plan maps (name, seed) to (arm, scoring points,
    final). At a point an arm scores at the base size and 2x, at its final budget at every size. Arms whose final
    budget is passed drop out, so short runs finish first while the long ones go on. Past the deadline every
    arm still in training is scored where it stopped, and nothing more is trained."""
    batch = exp.cfg["batch"]
    for point in sorted({p for _, points, _ in plan.values() for p in points}):
        active = {key: arm for key, (arm, _, final) in plan.items() if final >= point}
        reached = exp.train_to(active, point, title)
        for (name, seed), arm in active.items():
            _, points, final = plan[(name, seed)]
            images = point if reached else arm.step_count * batch
            if images and (point == final or not reached):
                exp.score_arm(arm, name, seed, images)
            elif images and point in points:
                exp.score_arm(arm, name, seed, images, SWEEP_RESOLUTIONS)
        exp.publish()
        if not reached:
            break


def first_seed_plan(exp: Experiment, names) -> dict:
    """train_and_score's plan for arms at the first seed to the main budget; sweep arms scored on the way."""
    seed, main = exp.cfg["seeds"][0], exp.cfg["main_budget"]
    early = [p for p in exp.cfg["sweep"] if p < main]
    return {(n, seed): (exp.open_arm(n, seed), (early if n in SWEEP_ARMS else []) + [main], main)
            for n in names if exp.wanted(n)}


def phase_headline(exp: Experiment) -> None:
    """Table 2 in miniature: LEDiT and DiT-RoPE at the first seed to the main budget, together, each scored at every
    size (the RoPE model with every scaling), then the base's baselines."""
    train_and_score(exp, first_seed_plan(exp, HEADLINE), "LEDiT and DiT-RoPE")
    phase_baselines(exp)


def phase_first_seed(exp: Experiment) -> None:
    """Every other fine-tune arm at the first seed to the main budget, together; the sweep arms scored on the way."""
    train_and_score(exp, first_seed_plan(exp, [n for n in PHASE1 if n not in HEADLINE]), "arms")


def phase_rest(exp: Experiment) -> None:
    """The budget sweep beyond the main budget (one long run per sweep arm, scored at every sweep point, at every
    size at the last), with the headline arms' other seeds and the from-scratch arms training alongside."""
    seeds, main = exp.cfg["seeds"], exp.cfg["main_budget"]
    later = [p for p in exp.cfg["sweep"] if p > main]
    plan = {}
    if later:
        plan.update({(n, seeds[0]): (exp.open_arm(n, seeds[0]), later, later[-1]) for n in SWEEP_ARMS})
    plan.update({(n, s): (exp.open_arm(n, s), [main], main) for s in seeds[1:] for n in PHASE3_SEEDED})
    scratch = exp.cfg["scratch_budget"]
    plan.update({(n, seeds[0]): (exp.open_arm(n, seeds[0]), [scratch], scratch) for n in PHASE3_SCRATCH})
    train_and_score(exp, {k: v for k, v in plan.items() if exp.wanted(k[0])}, "sweep, seeds, scratch")


#################################################################################
#                                     Report                                    #
#################################################################################

def summarize(rows: list) -> list:
    """Mean over seeds with the spread (half the range) per (arm, budget, weights, resolution)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["arm"], r["budget"], r["weights"], r["resolution"]), []).append(r)
    table = []
    for (arm, budget, weights, res), group in groups.items():
        row = {"arm": arm, "budget": budget, "weights": weights, "resolution": res, "seeds": len(group)}
        for metric in ("fid", "precision", "recall", "single_object_rate", "object_rate", "shape_accuracy",
                       "heldout_loss", "heldout_loss_t_lt_300", "heldout_loss_t_ge_300") + tuple(
                           f"probe_{axis}_r2_{where}" for axis in ("row", "col") for where in ("in", "mid", "last")):
            vals = [g[metric] for g in group if g.get(metric) is not None]
            if vals:
                row[metric] = float(np.mean(vals))
                row[metric + "_spread"] = float((max(vals) - min(vals)) / 2)
        table.append(row)
    return table


def _table(summary, metric, select, model_name) -> str:
    rows = [dict(r, model=model_name(r)) for r in summary if select(r) and r.get(metric) is not None]
    return markdown_table(rows, metric) if rows else "(no rows yet)\n"


def write_report(exp: Experiment) -> None:
    """results.md (headline, scan ablation, raw vs EMA, held-out loss and probe, budget curve), results.json,
    plots, and sample grids."""
    rows = list(exp.rows.values())
    summary = summarize(rows)
    main = exp.cfg["main_budget"]
    headline = ("dit-extrapolate", "dit-interpolate", "upscale", "dit-continued", "nope", "nope+causal", "nope+conv",
                "ledit", "ledit+fade", "ledit+norm", "ledit-scratch", "ledit-scratch-refined")
    at_main = lambda r: r["weights"] == "ema" and r["budget"] in (0, main, exp.cfg["scratch_budget"])  # noqa: E731
    name = lambda r: r["arm"] + (f" (n={r['seeds']})" if r["seeds"] > 1 else "")  # noqa: E731
    md = [f"# Replication ({exp.args.scale} scale, {exp.args.features} features)\n\n",
          f"`{json.dumps({k: v for k, v in exp.meta.items() if k != 'phases'})}`\n"]
    table2 = dict((arm, title) for title, arm in TABLE2)
    for metric in ("fid", "single_object_rate"):
        md.append(f"\n## Table 2 in miniature, {metric}, main budget ({millions(main)} images), EMA "
                  "(every scaling is the plain model at 32)\n\n")
        md.append(_table(summary, metric, lambda r: at_main(r) and r["arm"] in table2,
                         lambda r: table2[r["arm"]] + (f" (n={r['seeds']})" if r["seeds"] > 1 else "")))
    for metric in ("fid", "single_object_rate", "object_rate", "shape_accuracy"):
        md.append(f"\n## {metric}, main budget ({millions(main)} images), EMA\n\n")
        md.append(_table(summary, metric, lambda r: at_main(r) and r["arm"] in headline, name))
    scan_names = dict((arm, title) for title, arm in SCAN_TABLE)
    for metric in ("fid", "object_rate"):
        md.append(f"\n## Scan ablation, {metric} (Table 1b order d < c < a < b)\n\n")
        md.append(_table(summary, metric, lambda r: at_main(r) and r["arm"] in scan_names,
                         lambda r: scan_names[r["arm"]] + (f" (n={r['seeds']})" if r["seeds"] > 1 else "")))
    md.append("\n## Raw against EMA weights, object_rate and held-out loss at the main budget\n\n")
    md.append(_table(summary, "object_rate", lambda r: r["budget"] == main and r["resolution"] in ("32", "64"),
                     lambda r: f"{r['arm']} {r['weights']}"))
    for metric in ("heldout_loss", "heldout_loss_t_ge_300", "probe_row_r2_mid", "probe_col_r2_mid"):
        md.append(f"\n## {metric} at 32 px, by budget (EMA)\n\n")
        md.append(_budget_table(summary, metric))
    for metric in ("fid", "object_rate"):
        md.append(f"\n## Budget curve, {metric} (EMA; columns: images seen)\n\n")
        md.append(_budget_table(summary, metric, resolution="64") + "\n" + _budget_table(summary, metric))
    (exp.out / "results.md").write_text("".join(md))
    (exp.out / "results.json").write_text(json.dumps({"meta": exp.meta, "summary": summary}, indent=2))
    curve = [dict(model=f"{r['arm']} @{r['resolution']}", resolution=millions(r["budget"]), object_rate=r["object_rate"],
                  fid=r["fid"]) for r in sorted(summary, key=lambda r: r["budget"])
             if r["weights"] == "ema" and r["arm"] in SWEEP_ARMS + ["base"] and r["resolution"] in ("32", "64")
             and r.get("object_rate") is not None]
    if curve:
        plot_metric(curve, str(exp.out / "budget_object_rate.png"), "object_rate", xlabel="training images")
        plot_metric(curve, str(exp.out / "budget_fid.png"), "fid", xlabel="training images")
    plot_metric([dict(r, model=r["arm"]) for r in summary if at_main(r) and r["arm"] in headline
                 and r.get("fid") is not None], str(exp.out / "fid.png"))


def _budget_table(summary, metric, resolution="32") -> str:
    rows = [dict(model=r["arm"], resolution=millions(r["budget"]), **{metric: r[metric]})
            for r in sorted(summary, key=lambda r: r["budget"])
            if r["weights"] == "ema" and r["resolution"] == resolution and r.get(metric) is not None and r["budget"]]
    return markdown_table(rows, metric) if rows else "(no rows yet)\n"


def save_grids(exp: Experiment) -> None:
    """One PNG per size: 8 samples (2 per class) of each arm's main-budget EMA model and of the baselines."""
    from PIL import Image
    plan = dataclasses.replace(exp.plan(), samples=8)
    base = exp.base_model().to(exp.device)
    for res in [(BASE, BASE), (64, 64)]:
        rows = [("dit-extrapolate", sample_images(base, res, 8, plan, None, "extrapolate")),
                ("dit-interpolate", sample_images(base, res, 8, plan, None, "interpolate"))]
        for folder in sorted((exp.out / "arms").glob("*-s0")):
            main = folder / "models" / str(exp.cfg["main_budget"])
            if (main / "config.json").exists():
                model = load_model(main).to(exp.device)
                rows.append((folder.name[:-3], sample_images(model, res, 8, plan)))
        pad, (h, w) = 2, res
        canvas = np.full((len(rows) * (h + pad) + pad, 8 * (w + pad) + pad, 3), 255, np.uint8)
        for r, (_, imgs) in enumerate(rows):
            for c, im in enumerate(imgs[:8]):
                canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
        Image.fromarray(canvas).save(exp.out / f"grid_{label(res)}.png")
        (exp.out / f"grid_{label(res)}.txt").write_text("\n".join(n for n, _ in rows) + "\n")


def best_ledit(exp: Experiment):
    """The LEDiT-family EMA model with the lowest FID at 2x, and its row."""
    rows = [r for r in exp.rows.values() if r["arm"] in LEDIT_FAMILY and r["weights"] == "ema"
            and r["resolution"] == "64" and r.get("fid") is not None]
    if not rows:
        return None, None
    row = min(rows, key=lambda r: r["fid"])
    return exp.out / "arms" / f"{row['arm']}-s{row['seed']}" / "models" / str(row["budget"]), row


def publish(exp: Experiment) -> None:
    """Refresh the publish folder: rows, results, a report archive, the best LEDiT and the base (<= 8 files)."""
    write_report(exp)
    dest = exp.args.publish
    if not dest:
        return
    dest = Path(dest)
    for name in ("rows.jsonl", "results.md"):
        if (exp.out / name).exists():
            copy_atomic(exp.out / name, dest / name)
    _tar(dest / "report.tgz", exp.out, [p for p in exp.out.iterdir() if p.suffix in (".png", ".txt", ".json")] +
         list((exp.out / "arms").glob("*/losses.jsonl")) + [exp.out / "base" / "provenance.json"])
    folder, row = best_ledit(exp)
    if folder is not None and (folder / "config.json").exists():
        (folder / "evaluation.json").write_text(json.dumps(row, indent=2))
        _tar(dest / "best-ledit.tgz", folder.parent, [folder], arcname="best-ledit")
    if exp.base_path.exists() and exp.base_path.stat().st_size < 16 << 20:
        copy_atomic(exp.base_path, dest / "shapes-dit-base.pt")


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy a file into the publish folder under a temporary name, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _tar(path: Path, root: Path, members, arcname=None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for m in members:
            if m.exists():
                tar.add(m, arcname=arcname or str(m.relative_to(root)))
    os.replace(tmp, path)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="quick", choices=sorted(SCALES))
    parser.add_argument("--out", default=None, help="Run folder (default runs/replication-<scale>).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", default=None, help="A base DiT checkpoint to reuse instead of training one.")
    parser.add_argument("--deadline", type=float, default=None, help="Seconds after which training stops.")
    parser.add_argument("--graphed", default="auto", choices=["auto", "off"], help="CUDA-graphed steps (CUDA only).")
    parser.add_argument("--features", default="inception", choices=["inception", "pixels"],
                        help="FID features; pixels is a fast stand-in for smoke runs of the harness.")
    parser.add_argument("--inception-weights", default=None, help="FID Inception TorchScript (default: shipped).")
    parser.add_argument("--arms", default=None, help="Comma list: train only these arms (baselines always run).")
    parser.add_argument("--publish", default=None, help="Folder refreshed after each phase (at most 8 files).")
    args = parser.parse_args()
    args.out = args.out or f"runs/replication-{args.scale}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.time()
    exp = Experiment(args, dict(SCALES[args.scale]))
    only = [a.strip() for a in args.arms.split(",")] if args.arms else None
    unknown = [a for a in only or [] if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; expected some of {sorted(ARMS)}")
    exp.wanted = lambda name: only is None or name in only
    exp.publish = lambda: publish(exp)
    exp.meta.update(device=device_name(args.device), torch=torch.__version__, model=exp.model_cfg,
                    config={k: v for k, v in exp.cfg.items() if k != "model"})
    phases = [
        ("check", lambda: phase_check(exp)),
        ("base", lambda: phase_base(exp)),
        ("LEDiT and DiT-RoPE, then the base's baselines", lambda: phase_headline(exp)),
        ("every other arm, first seed", lambda: phase_first_seed(exp)),
        ("budget sweep, other seeds, from scratch", lambda: phase_rest(exp)),
    ]
    for title, run in phases:
        t0 = time.time()
        run()
        exp.meta["phases"][title] = time.time() - t0
        log(f"phase {title}: {time.time() - t0:.0f}s")
        publish(exp)
    save_grids(exp)
    exp.meta["total_s"] = time.time() - start
    publish(exp)
    log(f"done in {time.time() - start:.0f}s: {exp.out / 'results.md'}")


if __name__ == "__main__":
    main()
