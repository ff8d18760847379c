"""Evaluation during training: every N steps, sample the EMA (and/or raw) weights at chosen sizes and score them.

Metrics: FID (and precision/recall when the reference carries features) against a reference per size, the
structure measure of the procedural shapes set (`structure.object_stats`), and the held-out loss (DiT's objective
on held-out inputs with fixed draws, in eval mode, also split at t < 300 and t >= 300). Every row goes to
`eval.jsonl` in the run folder (one JSON object per line, appended) and to the trackers; the best weights by a
chosen metric are exported as a model folder. A resumed run reads `eval.jsonl` back, so the best is kept across
restarts. Both training loops use it: `finetune` and `fastloop`.
"""
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError

Resolution = Tuple[int, int]  # (height, width) in pixels
METRICS = ("fid", "structure", "heldout_loss")
LOWER_IS_BETTER = ("fid", "heldout_loss", "heldout_loss_t_lt_300", "heldout_loss_t_ge_300")
HELDOUT_SPLIT_T = 300  # positional layout is decided at large t, detail at small t (LEDiT App. C)


@dataclass
class EvalPlan:
    """What to evaluate, how often, and which metric picks the best weights."""

    every: int  # optimizer steps between evaluations
    resolutions: List[Resolution]
    samples: int = 500
    metrics: Sequence[str] = ("fid",)
    weights: Sequence[str] = ("ema",)  # "ema" and/or "raw"
    steps: int = 50  # DDPM sampling steps
    cfg: float = 1.5
    seed: int = 0
    batch_size: int = 50
    best_metric: Optional[str] = None  # "fid@512", "object_rate@64", "heldout_loss" (EMA weights)
    references: Dict[Resolution, object] = field(default_factory=dict)  # evaluate.Reference per size, for FID

    def problems(self) -> List[str]:
        """Every problem with the plan at once."""
        p = [f"eval metric {m!r} is not one of {', '.join(METRICS)}" for m in self.metrics if m not in METRICS]
        p += [f"eval weights {w!r} is not ema or raw" for w in self.weights if w not in ("ema", "raw")]
        if self.every < 0 or self.samples < 1 or self.steps < 1 or self.batch_size < 1:
            p.append("eval_every must be >= 0 and eval_samples, eval_steps, eval_batch_size >= 1")
        if self.best_metric is not None:
            name, _, res = self.best_metric.partition("@")
            known = {"fid", "precision", "recall", "single_object_rate", "object_rate"} if res else \
                {"heldout_loss", "heldout_loss_t_lt_300", "heldout_loss_t_ge_300"}
            if name not in known:
                p.append(f"best_metric {self.best_metric!r}: expected one of {sorted(known)}"
                         + ("@RES" if res else " (or METRIC@RES for a sampled metric)"))
                return p
            needs = "heldout_loss" if not res else "structure" if name.endswith("object_rate") else "fid"
            if needs not in self.metrics:
                p.append(f"best_metric {self.best_metric!r} needs eval metric {needs}")
            if res and not any(metric_key(name, r) == self.best_metric for r in self.resolutions):
                p.append(f"best_metric {self.best_metric!r}: {res} is not one of the evaluated sizes "
                         f"{', '.join(metric_key('', r)[1:] for r in self.resolutions)}")
        return p


def metric_key(name: str, res: Optional[Resolution]) -> str:
    """'fid@512', 'object_rate@48x64', or a plain name for a size-free metric."""
    if res is None:
        return name
    return f"{name}@{res[0]}" if res[0] == res[1] else f"{name}@{res[0]}x{res[1]}"


def better(metric: str, new: float, old: Optional[float]) -> bool:
    """Whether `new` improves on `old` for this metric."""
    if old is None:
        return True
    name = metric.partition("@")[0]
    return new < old if name in LOWER_IS_BETTER else new > old


#################################################################################
#                                    Metrics                                    #
#################################################################################

@torch.no_grad()
def heldout_loss(model, schedule, x0: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                 batch_size: int = 64) -> Dict[str, float]:
    """DiT's loss (class-conditional, no dropout) on held-out inputs, the same draws at every call, in eval mode."""
    from .trainstep import diffusion_loss
    cfg = model.config
    learn_sigma = cfg.out_channels == 2 * cfg.in_channels
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    ts, losses = [], []
    try:
        for i in range(0, len(x0), batch_size):
            terms = diffusion_loss(model, schedule, x0[i:i + batch_size].to(device), labels[i:i + batch_size].to(device),
                                   g, 0.0, cfg.num_classes, learn_sigma, per_sample=True)
            ts.append(terms["t"].cpu())
            losses.append(terms["loss"].float().cpu())
    finally:
        model.train(was_training)
    t, loss = torch.cat(ts), torch.cat(losses)
    low = t < HELDOUT_SPLIT_T
    out = {"heldout_loss": float(loss.mean())}
    if low.any():
        out["heldout_loss_t_lt_300"] = float(loss[low].mean())
    if (~low).any():
        out["heldout_loss_t_ge_300"] = float(loss[~low].mean())
    return out


def shard_bounds(n: int, rank: int, world: int) -> Tuple[int, int]:
    """The contiguous slice [lo, hi) of n items that process `rank` of `world` takes."""
    return n * rank // world, n * (rank + 1) // world


def sample_images(model, res: Resolution, n: int, plan: EvalPlan, vae=None, position_mode=None,
                  rank: int = 0, world: int = 1) -> np.ndarray:
    """n class-balanced uint8 NHWC samples at `res` with per-image seeds (the same at every evaluation), or this
    process's contiguous shard of them; `position_mode` chooses how a sin/cos model meets a new size."""
    from ..inference.pipeline import LEDiTPipeline, default_scheduler
    from ..inference.sampling import plan_labels, sample_array
    lo, hi = shard_bounds(n, rank, world)
    labels = plan_labels(n, None, model.config.num_classes)[lo:hi]
    if not labels:
        return np.zeros((0, res[0], res[1], 3), np.uint8)
    pipe = LEDiTPipeline(transformer=model, vae=vae, scheduler=default_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)
    return sample_array(pipe, labels, plan.seed, plan.batch_size, offset=lo, height=res[0], width=res[1],
                        num_inference_steps=plan.steps, guidance_scale=plan.cfg,
                        guidance_channels=3 if vae is not None else None, position_mode=position_mode)


def score_samples(images: np.ndarray, res: Resolution, plan: EvalPlan, extractor) -> Dict[str, Optional[float]]:
    """The sampled metrics of one size, keyed 'name@res'."""
    out: Dict[str, Optional[float]] = {}
    if "fid" in plan.metrics:
        from ..evaluation.evaluate import score
        for name, value in score(images, plan.references[res], extractor).items():
            out[metric_key(name, res)] = value
    if "structure" in plan.metrics:
        from ..replication.structure import object_stats
        stats = object_stats(images)
        for name in ("single_object_rate", "object_rate"):
            out[metric_key(name, res)] = float(stats[name])
    return out


#################################################################################
#                                  The evaluator                                #
#################################################################################

class PeriodicEvaluator:
    """Runs an EvalPlan at its steps, appends rows to eval.jsonl, logs them, and exports the best weights.

    With several processes (`rank`, `world`, and `gather`, which concatenates every process's array in rank
    order), each samples a contiguous shard of the images with the seeds an unsplit run would use; the main
    process scores, writes and logs. `start_step` is the step a run resumed from: rows written after it (by a
    run that stopped before its next checkpoint) are dropped, since those steps are trained and scored again."""

    def __init__(self, plan: EvalPlan, out_dir, *, vae=None, extractor=None, heldout=None, schedule=None,
                 log: Optional[Callable[[Dict, int], None]] = None, start_step: int = 0, rank: int = 0,
                 world: int = 1, gather: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.rank, self.world, self.start_step = rank, world, start_step
        self.gather = gather or (lambda images: images)
        self.is_main = rank == 0
        problems = plan.problems()
        if "fid" in plan.metrics and self.is_main:
            missing = [metric_key("", r)[1:] for r in plan.resolutions if r not in plan.references]
            if missing:
                problems.append(f"eval metric fid needs a reference for {', '.join(missing)}")
            if extractor is None:
                from ..evaluation.fid import InceptionFeatures
                extractor = InceptionFeatures()
        if "heldout_loss" in plan.metrics and heldout is None and self.is_main:
            problems.append("eval metric heldout_loss needs held-out data (eval_heldout)")
        if problems:
            raise ConfigError("evaluation: " + "; ".join(problems))
        self.plan, self.out_dir = plan, Path(out_dir)
        self.vae, self.extractor, self.heldout, self.log = vae, extractor, heldout, log
        if schedule is None:
            from .diffusion import DiffusionSchedule
            schedule = DiffusionSchedule()
        self.schedule = schedule
        self.path = self.out_dir / "eval.jsonl"
        self.rows: List[Dict] = []
        self.best: Optional[Dict] = None
        if self.is_main and self.path.exists():  # a resumed run: earlier rows and the best so far
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["step"] <= start_step]
            if len(kept) < len(rows):
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, self.path)
            for row in kept:
                self._remember(row)

    def due(self, step: int) -> bool:
        """Whether `step` is an evaluation step this run has not evaluated (the same answer on every process)."""
        return bool(self.plan.every) and step % self.plan.every == 0 and step > self.start_step

    def _remember(self, row: Dict) -> bool:
        self.rows.append(row)
        metric = self.plan.best_metric
        if metric is None or row.get("weights") != "ema" or row.get(metric) is None:
            return False
        if self.best is None or better(metric, row[metric], self.best[metric]):
            self.best = row
            return True
        return False

    def evaluate(self, step: int, models: Dict[str, torch.nn.Module], images_seen: int,
                 on_best: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
        """Score each of `models` ({"ema": ..., "raw": ...}, those in plan.weights); one row per weights (on the
        main process; every process must call this, as each samples its shard)."""
        rows = []
        for weights in self.plan.weights:
            model = models[weights]
            t0 = time.perf_counter()
            row: Dict = {"step": step, "images_seen": images_seen, "weights": weights}
            was_training = model.training
            model.eval()
            try:
                if "heldout_loss" in self.plan.metrics and self.is_main:
                    row.update(heldout_loss(model, self.schedule, *self.heldout, seed=self.plan.seed))
                sampled = any(m != "heldout_loss" for m in self.plan.metrics)
                for res in self.plan.resolutions if sampled else []:
                    shard = sample_images(model, res, self.plan.samples, self.plan, self.vae, rank=self.rank,
                                          world=self.world)
                    images = self.gather(shard)
                    if self.is_main:
                        row.update(score_samples(images, res, self.plan, self.extractor))
            finally:
                model.train(was_training)
            if not self.is_main:
                continue
            row["seconds"] = time.perf_counter() - t0
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.log is not None:
                self.log({f"eval/{weights}/{k}": v for k, v in row.items()
                          if isinstance(v, float) and k != "seconds"}, step)
            if self._remember(row) and on_best is not None:
                on_best(row)
            rows.append(row)
        return rows

    def write_best(self) -> None:
        """best.json beside eval.jsonl: the metric, its value and the step (atomic)."""
        if self.best is None:
            return
        from ..conversion.export import write_json_atomic
        metric = self.plan.best_metric
        write_json_atomic(self.out_dir / "best.json", {"metric": metric, "value": self.best[metric],
                                                       "step": self.best["step"], "row": self.best})
