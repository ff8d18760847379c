"""`ledit-convert evaluate`: FID (and precision/recall) of several models at several resolutions.

Samples are class-balanced with fixed per-image seeds, so every model sees the same noise and labels.
Features come from the standard FID Inception network (see fid.py); results are written as JSON, a
markdown table and a PNG plot of FID against resolution.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..conversion.export import write_json_atomic
from ..models.positions import ROPE_SCALINGS, SINCOS_SCALINGS
from .fid import InceptionFeatures, frechet_distance, precision_recall, reference_features, statistics

Resolution = Tuple[int, int]  # (height, width) in pixels
# every `@method` a spec may name; whether a model's positions take it is checked when its pipeline is built
SCALINGS = tuple(dict.fromkeys(SINCOS_SCALINGS + ROPE_SCALINGS))


@dataclass
class ModelSpec:
    """One model to evaluate: a folder, and how its positions meet new sizes (its position scaling)."""

    name: str
    path: str
    position_mode: Optional[str] = None  # a position scaling (SCALINGS): sin/cos ones or 2D RoPE ones
    attention_scaling: Optional[str] = None


@dataclass
class Reference:
    """Real-image statistics at one resolution; features too when images were given (for precision/recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None


def parse_model_spec(text: str) -> ModelSpec:
    """`[NAME=]PATH[@METHOD]`, METHOD a position scaling (SCALINGS)."""
    name, _, rest = text.rpartition("=") if "=" in text else ("", "", text)
    path, _, mode = rest.partition("@")
    if mode and mode not in SCALINGS:
        raise ConfigError(f"--model {text!r}: position scaling {mode!r} is not one of {', '.join(SCALINGS)}")
    if not path:
        raise ConfigError(f"--model {text!r}: no model path")
    label = name or (Path(path).name + (f"@{mode}" if mode else ""))
    return ModelSpec(label, path, mode or None)


def parse_resolution(text: str) -> Resolution:
    """`512` (square) or `384x512` (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise ConfigError(f"resolution {text!r}: expected N or HxW (pixels)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"resolution {text!r}: expected N or HxW (pixels)")
    return parts[0], parts[1]


def label(res: Resolution) -> str:
    """'512' for squares, '384x512' (height x width) otherwise."""
    return str(res[0]) if res[0] == res[1] else f"{res[0]}x{res[1]}"


#################################################################################
#                                   References                                  #
#################################################################################

def reference_from_images(images: np.ndarray, extractor: InceptionFeatures, batch_size: int = 50) -> Reference:
    """Statistics and features of uint8 NHWC real images."""
    feats = extractor.features(images, batch_size)
    mu, sigma = statistics(feats)
    return Reference(mu, sigma, feats)


def reference_from_path(path: str, extractor: InceptionFeatures, batch_size: int = 50) -> Reference:
    """A stats npz (no features, so no precision/recall), an ADM npz batch, or an image folder."""
    return Reference(*reference_features(path, extractor, batch_size))


def parse_references(items: Sequence[str], resolutions: Sequence[Resolution]) -> Dict[Resolution, str]:
    """`PATH` for every resolution, or `RES=PATH` per resolution; every resolution needs one."""
    found: Dict[Resolution, str] = {}
    for item in items:
        if "=" in item:
            res, _, path = item.partition("=")
            found[parse_resolution(res)] = path
        else:
            found.update({r: item for r in resolutions if r not in found})
    missing = [label(r) for r in resolutions if r not in found]
    if missing:
        raise ConfigError(f"no --reference for resolution(s) {', '.join(missing)}")
    return found


#################################################################################
#                                     Scoring                                   #
#################################################################################

def score(images: np.ndarray, reference: Reference, extractor: InceptionFeatures,
          batch_size: int = 50) -> Dict[str, Optional[float]]:
    """FID, and precision/recall (k=3) when the reference carries features."""
    feats = extractor.features(images, batch_size)
    mu, sigma = statistics(feats)
    out = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), "precision": None, "recall": None}
    if reference.features is not None and min(len(feats), len(reference.features)) > 3:
        out["precision"], out["recall"] = precision_recall(reference.features, feats, k=3)
    return out


def evaluate_models(models: Sequence[ModelSpec], resolutions: Sequence[Resolution],
                    references: Dict[Resolution, Reference], generate: Callable[[ModelSpec, Resolution], np.ndarray],
                    extractor: InceptionFeatures, progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One row per (model, resolution): FID, precision, recall, sample count, seconds."""
    rows = []
    for spec in models:
        for res in resolutions:
            t0 = time.perf_counter()
            images = generate(spec, res)
            seconds = time.perf_counter() - t0
            row = {"model": spec.name, "resolution": label(res), "height": res[0], "width": res[1],
                   "samples": int(len(images)), "sample_seconds": seconds}
            row.update(score(images, references[res], extractor))
            rows.append(row)
            if progress is not None:
                progress(f"{spec.name} @ {label(res)}: FID {row['fid']:.2f}")
    return rows


#################################################################################
#                                     Reports                                   #
#################################################################################

def markdown_table(rows: List[Dict], metric: str = "fid") -> str:
    """Models as rows, resolutions as columns."""
    resolutions = list(dict.fromkeys(r["resolution"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["resolution"]): r.get(metric) for r in rows}
    lines = [f"| model | {' | '.join(resolutions)} |", "|---|" + "---|" * len(resolutions)]
    for m in models:
        vals = [cell.get((m, res)) for res in resolutions]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def tick_labels(top: float, ticks: int = 6) -> List[str]:
    """Labels of `ticks` evenly spaced values from 0 to `top`, with as many decimals as it takes to tell them apart."""
    decimals = max(1, 1 - math.floor(math.log10(top / (ticks - 1))))
    return [f"{top * k / (ticks - 1):.{decimals}f}" for k in range(ticks)]


def plot_metric(rows: List[Dict], path: str, metric: str = "fid", size=(720, 420),
                xlabel: str = "resolution (pixels)") -> str:
    """A PNG line chart of a metric against resolution (or another category in the rows' "resolution" field, in
    order of appearance), one line per model (drawn with PIL)."""
    from PIL import Image, ImageDraw
    resolutions = list(dict.fromkeys(r["resolution"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    values = [r[metric] for r in rows if r.get(metric) is not None and math.isfinite(r[metric])]
    top = max(values) * 1.1 if values and max(values) > 0 else 1.0
    w, h = size
    left, right, upper, lower = 60, 200, 20, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, upper, w - right, h - lower], outline="black")

    def xy(i, v):
        x = left + (i + 0.5) * (w - right - left) / max(len(resolutions), 1)
        return x, h - lower - v / top * (h - lower - upper)

    for k, label in enumerate(tick_labels(top)):  # y ticks
        _, y = xy(0, top * k / 5)
        d.line([left - 4, y, left, y], fill="black")
        d.text((5, y - 6), label, fill="black")
    for i, res in enumerate(resolutions):
        x, _ = xy(i, 0)
        d.text((x - 12, h - lower + 8), res, fill="black")
    d.text((left, h - 20), f"{metric} by {xlabel}", fill="black")
    for m_i, m in enumerate(models):
        colour = PALETTE[m_i % len(PALETTE)]
        pts = [xy(i, r[metric]) for i, res in enumerate(resolutions) for r in rows
               if r["model"] == m and r["resolution"] == res and r.get(metric) is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([w - right + 10, upper + 10 + 16 * m_i, w - right + 30, upper + 10 + 16 * m_i], fill=colour, width=3)
        d.text((w - right + 35, upper + 4 + 16 * m_i), m[:24], fill="black")
    img.save(path)
    return path


def write_report(rows: List[Dict], out_dir: str, settings: Optional[Dict] = None) -> Dict[str, str]:
    """results.json, results.md and fid.png in out_dir (written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "results.json"), "markdown": str(out / "results.md"), "plot": str(out / "fid.png")}
    write_json_atomic(Path(paths["json"]), {"settings": settings or {}, "rows": rows})
    md = "## FID\n\n" + markdown_table(rows, "fid")
    if any(r.get("precision") is not None for r in rows):
        md += "\n## Precision\n\n" + markdown_table(rows, "precision")
        md += "\n## Recall\n\n" + markdown_table(rows, "recall")
    Path(paths["markdown"]).write_text(md)
    plot_metric(rows, paths["plot"])
    return paths


#################################################################################
#                          Generating with saved models                         #
#################################################################################

def check_models(specs: Sequence[ModelSpec], vae: Optional[str] = None, text_encoder: Optional[str] = None,
                 prompts: Optional[Sequence[str]] = None) -> None:
    """Fail before any sampling if a model cannot be read (folders by their JSON, files by their tensors), its VAE
    does not fit it, or a text-to-image model has no prompts."""
    from ..inference.sampling import model_vae, open_model
    from ..inference.text_pipeline import plan_prompts
    for spec in specs:
        source = open_model(spec.path)
        if source.text:
            plan_prompts(1, list(prompts or []))  # refuses a text-to-image model without prompts
        model_vae(source, vae, text_encoder)


def pipeline_generator(settings: Dict, vae: Optional[str], progress: Optional[Callable[[int, int], None]] = None):
    """generate(spec, resolution) -> uint8 NHWC samples, one cached pipeline per model. A text-to-image model
    samples settings["prompts"] (cycled); steps, cfg_scale and scheduler left None take the family's defaults."""
    from ..models.compiling import compile_blocks
    from ..inference.sampling import DIT_DEFAULTS, check_call, check_dtype, load_pipeline, open_model, plan_labels, sample_array
    from ..inference.text_pipeline import (FAMILY_OF_KIND, TEXT_DEFAULTS, kind_for_scaling, load_text_pipeline,
                                           plan_prompts, set_position_scaling)
    cache = {}

    def setting(key: str, kind: Optional[str]):
        value = settings.get(key)
        return (TEXT_DEFAULTS[FAMILY_OF_KIND[kind]] if kind else DIT_DEFAULTS)[key] if value is None else value

    def generate(spec: ModelSpec, res: Resolution) -> np.ndarray:
        key = (spec.path, bool(spec.position_mode))  # a stock text model with a scaling loads into our class
        if key not in cache:
            cache.clear()  # one model in memory at a time
            source = open_model(spec.path)
            if source.text:
                if spec.attention_scaling:
                    raise ConfigError(f"{spec.name}: attention scaling applies to class-conditional DiTs only")
                kind = kind_for_scaling(source.kind, spec.position_mode)
                pipe = load_text_pipeline(source.transformer_dir, kind, vae, settings.get("text_encoder"),
                                          setting("scheduler", source.kind), settings["device"],
                                          check_dtype(settings["dtype"]), settings.get("negative_prompt", ""),
                                          settings.get("max_length"))
                if settings.get("compile", False):
                    compile_blocks(pipe.transformer)
            else:
                pipe = load_pipeline(spec.path, vae=vae, scheduler=setting("scheduler", None),
                                     device=settings["device"], dtype=settings["dtype"],
                                     compile=settings.get("compile", False))
            pipe.set_progress_bar_config(disable=True)
            cache[key] = (pipe, source.kind if source.text else None)
        pipe, kind = cache[key]
        call = dict(height=res[0], width=res[1], num_inference_steps=setting("steps", kind),
                    guidance_scale=setting("cfg_scale", kind))
        if kind:  # the scaling is set per spec: specs of one folder share its pipeline
            set_position_scaling(pipe, spec.position_mode, f"{spec.name}: ")
            labels = plan_prompts(settings["num_samples"], list(settings.get("prompts") or []))
        else:
            labels = plan_labels(settings["num_samples"], None, pipe.num_classes)
            call.update(guidance_channels=settings.get("guidance_channels") or 3, position_mode=spec.position_mode,
                        attention_scaling=spec.attention_scaling)
            check_call(pipe, labels, f"{spec.name}: ", **call)
        return sample_array(pipe, labels, settings["seed"], settings["batch_size"], progress, **call)

    return generate
