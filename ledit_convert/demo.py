"""`ledit-convert demo`: the whole workflow on the shipped small DiT, on a CPU, in a few minutes, offline.

Surgery on the shipped shapes DiT, a short fine-tune, one comparison sheet (training size and 2x) of
the stock DiT with its table extrapolated and interpolated against the shipped LEDiT (fine-tuned 200K images
on a CPU by benchmarks/cpu_evidence.py, the table faded out) and this demo's own fine-tune, a reload through
plain diffusers, and a closing table with the structure measure of each row.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_CHECKPOINT = ASSETS / "shapes-dit-base.pt"
SHIPPED_LEDIT = ASSETS / "shapes-ledit"
HEADS = 4  # the shipped DiT is 128 wide, not a standard DiT width
NUM_CLASSES = 4  # circle, square, triangle, plus: the shipped models' classes


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults take a few minutes on a laptop CPU."""

    steps: int = 40  # fine-tune steps (the shipped LEDiT had 6250 at batch 32)
    batch_size: int = 16
    learning_rate: float = 2e-4
    images: int = 512  # renders to fine-tune on
    sample_steps: int = 25  # DDPM steps (DiT's respacing) for the comparison sheet
    per_class: int = 2  # samples per class and size in the sheet
    seed: int = 0


@dataclass
class DemoResult:
    """What the demo made and measured."""

    output_dir: Path
    rows: List[Dict] = field(default_factory=list)
    sheet: Optional[Path] = None
    surgery_dir: Optional[Path] = None
    finetuned_dir: Optional[Path] = None
    reload_max_abs_diff: Optional[float] = None
    seconds: Dict[str, float] = field(default_factory=dict)


def _sample(model, height: int, width: int, settings: DemoSettings, position_mode=None) -> np.ndarray:
    from .inference.pipeline import LEDiTPipeline, default_scheduler
    from .inference.sampling import sample_array
    pipe = LEDiTPipeline(transformer=model.eval(), vae=None, scheduler=default_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(NUM_CLASSES) for _ in range(settings.per_class)]
    call = dict(height=height, width=width, num_inference_steps=settings.sample_steps, guidance_scale=1.5,
                guidance_channels=None, position_mode=position_mode)
    return sample_array(pipe, labels, settings.seed, len(labels), **call)


def _sheet(rows: List[Dict], path: Path, base: int) -> Path:
    """A PNG: one row per model, the training-size samples (shown 2x, nearest) then the 2x-size samples."""
    from PIL import Image, ImageDraw
    pad, label_w, cell = 4, 230, 2 * base
    n = len(rows[0]["small"])
    width = label_w + 2 * n * (cell + pad) + 3 * pad
    height = 24 + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 6), f"trained size ({base}px, shown 2x)", fill="black")
    draw.text((label_w + n * (cell + pad) + 2 * pad, 6), f"2x per side ({2 * base}px, never seen)", fill="black")
    for r, row in enumerate(rows):
        y = 24 + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 6), row["name"], fill="black")
        for i, im in enumerate(row["small"]):
            canvas.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_w + i * (cell + pad), y))
        for i, im in enumerate(row["large"]):
            canvas.paste(Image.fromarray(im), (label_w + n * (cell + pad) + 2 * pad + i * (cell + pad), y))
    canvas.save(path)
    return path


def run_demo(output_dir, settings: Optional[DemoSettings] = None,
             say: Callable[[str], None] = print, overwrite: bool = False) -> DemoResult:
    """Run every step of the demo into output_dir and return what was measured."""
    from .conversion.checkpoints import build_model, read_checkpoint
    from .data.images import ArrayImageDataset
    from .errors import ConfigError, OutputExistsError
    from .training.finetune import finetune
    from .models.dit import LEDiTTransformer2DModel
    from .training.recipe import load_recipe
    from .replication.shapes import ShapesDataset
    from .replication.structure import object_stats
    from .conversion.surgery import SurgeryOptions, surgery_to_folder

    settings = settings or DemoSettings()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty; pass --overwrite or another --output-dir")
    if not BASE_CHECKPOINT.exists() or not (SHIPPED_LEDIT / "config.json").exists():
        raise ConfigError(f"{ASSETS}: the shipped demo models are missing from this installation")
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    torch.manual_seed(settings.seed)

    # 1. surgery on the shipped stock DiT
    t0 = time.perf_counter()
    result.surgery_dir = out / "ledit-surgery"
    surgery_to_folder(str(BASE_CHECKPOINT), result.surgery_dir, SurgeryOptions(), num_heads=HEADS, overwrite=True)
    result.seconds["surgery"] = time.perf_counter() - t0
    say(f"1/5 surgery: {BASE_CHECKPOINT.name} -> {result.surgery_dir}")

    # 2. a short fine-tune on freshly rendered shapes
    t0 = time.perf_counter()
    shapes = ShapesDataset(settings.images, 32, num_classes=NUM_CLASSES, seed=settings.seed)
    data = ArrayImageDataset(shapes.images(), shapes.labels)
    recipe = load_recipe(None, dict(resolution=32, vae="none", steps=settings.steps,
                                    global_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                                    ema_decay=0.9, max_grad_norm=1.0, num_workers=0, trackers=[],
                                    checkpoint_every=settings.steps, keep_checkpoints=1,
                                    log_every=max(1, settings.steps // 4), validate_every=0, seed=settings.seed))
    summary = finetune(str(result.surgery_dir), data, recipe, str(out / "finetune"), resume="latest")
    result.finetuned_dir = Path(summary["model"])
    result.seconds["finetune"] = time.perf_counter() - t0
    say(f"2/5 fine-tune: {settings.steps} steps at batch {settings.batch_size}, loss {summary['losses'][-1]:.4f}")

    # 3. the comparison sheet
    t0 = time.perf_counter()
    base = build_model(read_checkpoint(str(BASE_CHECKPOINT), num_heads=HEADS))
    shipped = LEDiTTransformer2DModel.from_pretrained(SHIPPED_LEDIT, torch_dtype=torch.float32)
    mine = LEDiTTransformer2DModel.from_pretrained(result.finetuned_dir)
    models = [("DiT, sin/cos extrapolated", base, "extrapolate"), ("DiT, sin/cos interpolated", base, "interpolate"),
              ("LEDiT, shipped (200K images)", shipped, None),
              (f"LEDiT, this demo ({settings.steps} steps)", mine, None)]
    for name, model, mode in models:
        small = _sample(model, 32, 32, settings, mode)
        large = _sample(model, 64, 64, settings, mode)
        result.rows.append({"name": name, "small": small, "large": large,
                            "single_object_32": float(object_stats(small)["single_object_rate"]),
                            "single_object_64": float(object_stats(large)["single_object_rate"])})
    result.sheet = _sheet(result.rows, out / "comparison.png", 32)
    result.seconds["sampling"] = time.perf_counter() - t0
    say(f"3/5 comparison sheet: {result.sheet}")

    # 4. reload through plain diffusers (remote code in the folder) and compare with ours
    from diffusers import AutoModel
    t0 = time.perf_counter()
    reloaded = AutoModel.from_pretrained(str(result.finetuned_dir), trust_remote_code=True).eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([10, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        a = reloaded(x, timestep=t, class_labels=y).sample
        b = mine.eval()(x, t, y).sample
    result.reload_max_abs_diff = float((a - b).abs().max())
    result.seconds["reload"] = time.perf_counter() - t0
    say(f"4/5 reloaded {result.finetuned_dir} with diffusers.AutoModel (max abs diff {result.reload_max_abs_diff:.1e})")
    say("5/5 done")
    return result
