"""Sample class-conditional images from a LEDiT or DiT folder: the logic behind `ledit-convert sample`."""
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from diffusers import DiTTransformer2DModel
from PIL import Image

from ..conversion.checkpoints import (DIFFUSERS_DIT_CLASSES, DIFFUSERS_PIXART_CLASSES,  # old configs: Transformer2DModel
                                       DIFFUSERS_SD3_CLASSES)
from ..conversion.checkpoints import SourceCheckpoint, build_model, load_pretrained, read_checkpoint, read_json
from ..conversion.export import atomic_folder
from ..models.compiling import compile_blocks, is_compile_error, is_compiled, uncompile_blocks
from ..errors import CheckpointError, ConfigError, OutputExistsError, first_line
from ..models.dit import LEDiTTransformer2DModel
from .pipeline import SCHEDULER_KINDS, LEDiTPipeline, default_scheduler
from .text_pipeline import (FAMILY_OF_KIND, TEXT_DEFAULTS, kind_for_scaling, load_text_pipeline, make_text_scheduler,
                            plan_prompts, set_position_scaling, text_parts)
from .vae import assemble_vae, check_vae_fits, vae_scale_factor

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE DiT was trained with
GRID_MAX_IMAGES = 64  # a grid is a preview: 50K-sample runs must not build a gigapixel PNG


@dataclass
class ModelSource:
    """Where a transformer lives and what it is: a folder read from JSON only, or a DiT checkpoint file read."""

    path: str  # what the user named
    kind: str  # "ledit" (our LEDiTTransformer2DModel), "dit" (diffusers DiTTransformer2DModel), or a text-to-image
    # kind of text_pipeline.FAMILY_OF_KIND: "pixart", "sd3" (ours) and "pixart_diffusers", "sd3_diffusers" (stock)
    transformer_dir: Optional[str]  # None for a checkpoint file
    pipeline_dir: Optional[str]  # the folder holding model_index.json, if any
    config: dict
    checkpoint: Optional[SourceCheckpoint] = None  # a DiT checkpoint file's tensors, run in DiT mode

    @property
    def text(self) -> bool:
        """A text-to-image model (sampled from prompts)."""
        return self.kind in FAMILY_OF_KIND

    @property
    def num_classes(self) -> int:
        """Real classes of the model (the null class is this index)."""
        return int(self.config["num_classes"] if self.kind == "ledit" else self.config.get("num_embeds_ada_norm", 1000))

    @property
    def pipeline_vae(self) -> Optional[str]:
        """The pipeline folder's own vae/, if it has one."""
        vae_dir = os.path.join(self.pipeline_dir, "vae") if self.pipeline_dir is not None else None
        return vae_dir if vae_dir is not None and os.path.isfile(os.path.join(vae_dir, "config.json")) else None

    @property
    def pixel_space(self) -> bool:
        """A model with 3 input channels and no VAE of its own denoises RGB pixels directly."""
        return self.config["in_channels"] == 3 and self.pipeline_vae is None


@dataclass
class SampleResult:
    """What a sampling run wrote."""

    output_dir: str
    labels: List[int]
    image_paths: List[str] = field(default_factory=list)
    grid_path: Optional[str] = None
    npz_path: Optional[str] = None
    seconds: float = 0.0


def open_model(path: str, num_heads: Optional[int] = None) -> ModelSource:
    """A model folder (`inspect_model_dir`) or a DiT checkpoint file, read and checked to run in DiT mode
    (`num_heads` for a file of a non-standard width)."""
    path = str(path)
    if os.path.isfile(path):
        ckpt = read_checkpoint(path, num_heads=num_heads)
        return ModelSource(path, "ledit", None, None, ckpt.config, checkpoint=ckpt)
    return inspect_model_dir(path)


def inspect_model_dir(model_dir: str) -> ModelSource:
    """Find the transformer in a model folder, a pipeline folder (model_index.json) or a diffusers DiT folder."""
    model_dir = str(model_dir)
    if not os.path.exists(model_dir):
        raise CheckpointError(f"{model_dir} does not exist: expected a model folder or a DiT checkpoint file")
    pipeline_dir = model_dir if os.path.isfile(os.path.join(model_dir, "model_index.json")) else None
    if pipeline_dir is None and os.path.isfile(os.path.join(model_dir, "config.json")):
        transformer_dir = model_dir
    elif os.path.isfile(os.path.join(model_dir, "transformer", "config.json")):
        transformer_dir = os.path.join(model_dir, "transformer")
    elif pipeline_dir is not None:
        raise CheckpointError(f"pipeline folder {model_dir} has no transformer/config.json")
    else:
        raise CheckpointError(f"{model_dir} is not a model folder: no config.json, model_index.json or transformer/")
    config_path = os.path.join(transformer_dir, "config.json")
    config = read_json(config_path)
    class_name = config.get("_class_name")
    if class_name == "LEDiTTransformer2DModel":
        kind = "ledit"
    elif class_name == "LEDiTPixArtTransformer2DModel":
        kind = "pixart"
    elif class_name in DIFFUSERS_PIXART_CLASSES and config.get("norm_type") == "ada_norm_single":
        kind = "pixart_diffusers"
    elif class_name == "LEDiTSD3Transformer2DModel":
        kind = "sd3"
    elif class_name in DIFFUSERS_SD3_CLASSES:
        kind = "sd3_diffusers"
    elif class_name in DIFFUSERS_DIT_CLASSES and config.get("norm_type", "ada_norm_zero") == "ada_norm_zero":
        kind = "dit"
    else:
        raise CheckpointError(f"{config_path} describes a {class_name}, not a LEDiT, DiT, PixArt or SD3 transformer")
    if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(transformer_dir)):
        raise CheckpointError(f"{transformer_dir} has no weights (*.safetensors or *.bin)")
    return ModelSource(model_dir, kind, transformer_dir, pipeline_dir, config)


def resolve_vae(vae: Optional[str], source: ModelSource) -> Optional[str]:
    """The VAE a model decodes through, or None for a pixel-space model: `vae` as given ("none" means pixel space),
    else the pipeline folder's own vae/, else DiT's sd-vae-ft-ema for a latent model. A VAE for a pixel-space
    model, or "none" for a latent model, is a ConfigError."""
    channels = source.config["in_channels"]
    if vae is None:
        return None if source.pixel_space else (source.pipeline_vae or DEFAULT_VAE)
    if str(vae).lower() == "none":
        if channels != 3:
            raise ConfigError(f"--vae none means pixel space, but {source.path} takes {channels}-channel latents; "
                              f"give the VAE it was trained with (DiT's: {DEFAULT_VAE})")
        return None
    if source.pixel_space:
        raise ConfigError(f"{source.path} is a pixel-space model (3 input channels, no VAE of its own); "
                          f"drop --vae {vae} or pass --vae none")
    return str(vae)


def model_vae(source: ModelSource, vae: Optional[str], text_encoder: Optional[str] = None) -> Optional[str]:
    """The VAE a model decodes through (`resolve_vae`; for a text model `vae` or its source pipeline's), checked to
    fit it (`check_vae_fits`) before any weights load."""
    if source.text:
        vae_path = text_parts(source.transformer_dir, vae, text_encoder)[0]
    else:
        vae_path = resolve_vae(vae, source)
    family = FAMILY_OF_KIND.get(source.kind, "dit")
    check_vae_fits(vae_path, source.config, family, source.path)
    return vae_path


def load_pipeline(model: Union[str, ModelSource], vae: Optional[str] = None, scheduler: Optional[str] = None,
                  device: str = "cpu", dtype: str = "fp32", compile: bool = False) -> LEDiTPipeline:
    """Load a model, pipeline or diffusers DiT folder, or a DiT checkpoint file (DiT mode), into an LEDiTPipeline
    (no remote code; VAE kept in fp32; `vae` as in `resolve_vae`).

    `compile=True` compiles the transformer's blocks (regional torch.compile, one compile per resolution and batch size);
    compilation happens at the first forward, so errors surface there (see `sample_images`)."""
    torch_dtype = check_dtype(dtype)
    source = model if isinstance(model, ModelSource) else open_model(model)
    vae_path = resolve_vae(vae, source)
    if source.checkpoint is not None:
        transformer = build_model(source.checkpoint)  # float32
        if torch_dtype != torch.float32:  # diffusers warns on every cast, even a no-op one
            transformer = transformer.to(torch_dtype)
    else:
        model_cls = LEDiTTransformer2DModel if source.kind == "ledit" else DiTTransformer2DModel
        transformer = load_pretrained(model_cls, source.transformer_dir, torch_dtype=torch_dtype)
    if scheduler is not None:
        noise_scheduler = make_scheduler(scheduler)
    elif source.pipeline_dir is not None and os.path.isdir(os.path.join(source.pipeline_dir, "scheduler")):
        import diffusers  # the saved scheduler's class is named in its config

        scheduler_dir = os.path.join(source.pipeline_dir, "scheduler")
        class_name = read_json(os.path.join(scheduler_dir, "scheduler_config.json")).get("_class_name")
        noise_scheduler = getattr(diffusers, class_name).from_pretrained(scheduler_dir)
    else:
        noise_scheduler = default_scheduler("ddpm")
    return assemble_pipeline(transformer, vae_path, noise_scheduler, device, compile)


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype named fp32, bf16 or fp16."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def make_scheduler(kind: str):
    """DiT's schedule as a ddpm, ddim or dpm scheduler; an unknown kind is a ConfigError."""
    if kind not in SCHEDULER_KINDS:
        raise ConfigError(f"scheduler {kind!r} is not one of {SCHEDULER_KINDS}")
    return default_scheduler(kind)


def assemble_pipeline(transformer, vae_path: Optional[str], noise_scheduler, device: str,
                      compile: bool) -> LEDiTPipeline:
    """A loaded transformer with its VAE (read from `vae_path`, kept in fp32; None in pixel space) and scheduler, on
    `device`, its blocks compiled if asked. The VAE decodes once per image, so fp32 costs little and avoids fp16
    overflow in SD VAEs."""
    pipe = LEDiTPipeline(transformer=transformer, vae=assemble_vae(vae_path),
                         scheduler=noise_scheduler).to(_check_device(device))
    if compile:
        compile_blocks(pipe.transformer)
    return pipe


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} is not available: torch sees no CUDA GPU")
    return dev


def plan_labels(num_samples: int, class_labels: Optional[List[int]], num_classes: int) -> List[int]:
    """The label of every sample: class-balanced (i mod num_classes) or cycling over the given labels."""
    pool = list(class_labels) if class_labels else list(range(num_classes))
    return [int(pool[i % len(pool)]) for i in range(num_samples)]


def image_seed(seed: int, index: int) -> int:
    """A 64-bit seed for sample `index` of a run; SeedSequence keeps (seed, index) pairs from colliding."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def iter_samples(pipe: LEDiTPipeline, labels: List[int], seed: int, batch_size: int, offset: int = 0, **call):
    """Yield (start index, NHWC uint8 images, labels) batch by batch; image i always uses seed (seed, offset + i),
    so a run split into shards (`offset` = where a shard starts) draws the images an unsplit run would.

    With compiled transformer blocks, the first batch is where compilation happens: if it fails, the blocks go
    back to eager with a warning and the batch is redone (the per-image seeds make it the same batch)."""
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start:start + batch_size]

        def images():
            generators = [torch.Generator("cpu").manual_seed(image_seed(seed, offset + start + i))
                          for i in range(len(batch_labels))]
            return to_uint8(pipe(batch_labels, generator=generators, output_type="pt", **call).images)
        if start == 0 and is_compiled(pipe.transformer):
            try:
                yield start, images(), batch_labels
                continue
            except Exception as e:  # e.g. no C++ toolchain for inductor on this machine
                if not is_compile_error(e):
                    raise
                logger.warning("torch.compile failed (%s: %s); sampling continues in eager mode",
                               type(e).__name__, first_line(e))
                uncompile_blocks(pipe.transformer)
        yield start, images(), batch_labels


def sample_array(pipe: LEDiTPipeline, labels: List[int], seed: int, batch_size: int,
                 progress: Optional[Callable[[int, int], None]] = None, offset: int = 0, **call) -> np.ndarray:
    """Every sample of `iter_samples` as one NHWC uint8 array; `progress(done, total)` after each batch."""
    out = []
    for start, images, _ in iter_samples(pipe, labels, seed, batch_size, offset, **call):
        out.append(images)
        if progress is not None:
            progress(start + len(images), len(labels))
    return np.concatenate(out)


def check_call(pipe: LEDiTPipeline, labels: List[int], where: str = "", **call) -> None:
    """Validate a pipeline call's options before any sampling; a bad one is a ConfigError (prefixed by `where`)."""
    try:
        pipe.check_inputs(labels[:1], call["height"], call["width"], call["num_inference_steps"],
                          call.get("guidance_channels", 3), "pt", call.get("attention_scaling"),
                          call.get("causal_to_self_below"), call.get("position_mode"))
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW float images in [0, 1] -> NHWC uint8, rounding half up like DiT's sample_ddp.py (127.5 x + 128)."""
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class NpzWriter:
    """Streams an ADM-format batch (arr_0 uint8 NHWC, arr_1 int64 labels) to a temp file, then os.replace."""

    def __init__(self, path: str, shape: tuple):
        self.path, self.shape, self.written = path, shape, 0
        self.tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)  # np.savez stores too
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)  # > 4 GB at 50K x 512 x 512
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.entry, header)

    def append(self, images: np.ndarray) -> None:
        """Add a batch of NHWC uint8 images in order."""
        self.entry.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        self.written += len(images)

    def close(self, labels: List[int]) -> str:
        """Finish the file (labels as arr_1) and move it into place."""
        if self.written != self.shape[0]:
            raise RuntimeError(f"npz holds {self.written} images, expected {self.shape[0]}")
        self.entry.close()
        with self.zip.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
        self.zip.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temp file after a failure."""
        try:
            self.entry.close()
            self.zip.close()
        except (ValueError, OSError, RuntimeError):
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def save_grid(images: List[np.ndarray], path: str, pad: int = 2) -> str:
    """Tile HWC uint8 images into a near-square grid PNG."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w = images[0].shape[:2]
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    Image.fromarray(canvas).save(path)
    return path


DIT_DEFAULTS = {"steps": 250, "cfg_scale": 1.5, "scheduler": "ddpm"}  # DiT's sample.py


def _check_text_options(model_dir, class_labels, guidance_channels, attention_scaling, causal_to_self_below) -> None:
    """Options of class-conditional sampling, which diffusers' PixArt pipelines do not take, are refused."""
    given = [name for name, value in (("--class-labels", class_labels), ("--guidance-channels", guidance_channels),
                                      ("--attention-scaling", attention_scaling),
                                      ("--causal-to-self-below", causal_to_self_below)) if value]
    if given:
        raise ConfigError(f"{model_dir} is a text-to-image model: {', '.join(given)} apply to class-conditional "
                          f"models only")


def sample_images(
    model_dir: str,
    vae: Optional[str] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    class_labels: Optional[List[int]] = None,
    num_samples: int = 16,
    steps: Optional[int] = None,
    cfg_scale: Optional[float] = None,
    guidance_channels: Union[int, str, None] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "fp32",
    scheduler: Optional[str] = None,
    attention_scaling: Optional[str] = None,
    causal_to_self_below: Optional[int] = None,
    position_mode: Optional[str] = None,
    output_dir: str = "samples",
    write_png: bool = True,
    write_grid: bool = True,
    npz: bool = False,
    overwrite: bool = False,
    compile: bool = False,
    num_heads: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    prompts: Optional[List[str]] = None,
    negative_prompt: str = "",
    text_encoder: Optional[str] = None,
    max_length: Optional[int] = None,
) -> SampleResult:
    """Generate `num_samples` images and write PNGs, a grid and optionally an ADM-format npz.

    Determinism: sample i is drawn with its own generator seeded from (seed, i), so the same seed gives the same
    images whatever `batch_size` is (up to float noise from batched matmuls), and a run with more samples
    extends a shorter one. Labels: `class_labels` cycled, or class-balanced (i mod num_classes) when None.
    Everything is validated (folder, labels, sizes, options) before weights are loaded or files written.
    `progress(done, total)` is called after each batch. `model_dir` may also be a DiT checkpoint file, run in
    DiT mode (`num_heads` for a non-standard width). VAE: `vae` ("none": pixel space), else the pipeline folder's
    vae/, else none for a pixel-space model (3 input channels), else stabilityai/sd-vae-ft-ema (`resolve_vae`).
    `height`/`width` are pixels (default: the training size). `compile=True` compiles the transformer blocks; if
    compilation fails at the first batch, sampling warns and goes on eagerly.

    A text-to-image model (PixArt) samples `prompts` (cycled) with `negative_prompt`, encoded by `text_encoder`
    (`max_length` tokens); its VAE and text encoder default to the pipeline folder it was converted from. Defaults
    follow the family: DiT 250 ddpm steps at CFG 1.5 on 3 channels, PixArt 20 dpm steps at CFG 4.5.
    """
    # 1. Validate everything that needs no weights
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    _check_device(device)
    source = open_model(model_dir, num_heads=num_heads)
    defaults = TEXT_DEFAULTS[FAMILY_OF_KIND[source.kind]] if source.text else DIT_DEFAULTS
    steps = defaults["steps"] if steps is None else steps
    cfg_scale = defaults["cfg_scale"] if cfg_scale is None else cfg_scale
    scheduler = defaults["scheduler"] if scheduler is None else scheduler
    if source.text:
        make_text_scheduler(scheduler, FAMILY_OF_KIND[source.kind])  # refuses what cannot sample the family
    elif scheduler not in SCHEDULER_KINDS:
        raise ConfigError(f"scheduler {scheduler!r} is not one of {SCHEDULER_KINDS}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("steps", steps)):
        if value < 1:
            raise ConfigError(f"{name} {value} must be at least 1")
    if source.text:
        _check_text_options(model_dir, class_labels, guidance_channels, attention_scaling, causal_to_self_below)
        labels = plan_prompts(num_samples, list(prompts or []))
    else:
        if prompts:
            raise ConfigError(f"{model_dir} is class-conditional: it takes --class-labels, not prompts")
        num_classes = source.num_classes
        for label in class_labels or []:
            if not 0 <= label < num_classes:
                raise ConfigError(f"class label {label} is out of range: {model_dir} has {num_classes} classes "
                                  f"(0..{num_classes - 1})")
        labels = plan_labels(num_samples, class_labels, num_classes)
        guidance_channels = 3 if guidance_channels is None else guidance_channels
    vae_path = model_vae(source, vae, text_encoder)
    multiple = vae_scale_factor(vae_path) * source.config["patch_size"]
    default_size = source.config["sample_size"] * (multiple // source.config["patch_size"])
    height = default_size if height is None else height
    width = default_size if width is None else width
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise ConfigError(f"{name} {value} is not a positive multiple of {multiple} (VAE factor x patch size)")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise OutputExistsError(f"output folder {output_dir} is not empty; pass --overwrite to replace it")

    # 2. Load, then check the options that depend on the model class (LEDiT-only options on a DiT, ...)
    if source.text:
        pipe = load_text_pipeline(source.transformer_dir, kind_for_scaling(source.kind, position_mode), vae_path,
                                  text_encoder, scheduler, device, DTYPES[dtype], negative_prompt, max_length)
        set_position_scaling(pipe, position_mode, f"{model_dir}: ")
        if compile:
            compile_blocks(pipe.transformer)
        call = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=cfg_scale)
    else:
        pipe = load_pipeline(source, vae=vae, scheduler=scheduler, device=device, dtype=dtype, compile=compile)
        call = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=cfg_scale,
                    guidance_channels=guidance_channels, attention_scaling=attention_scaling,
                    causal_to_self_below=causal_to_self_below, position_mode=position_mode)
        check_call(pipe, labels, **call)
    pipe.set_progress_bar_config(disable=True)  # the caller reports progress per batch

    # 3. Sample batch by batch into a temporary sibling folder, renamed into place once every file is written
    result = SampleResult(output_dir=str(output_dir), labels=labels)
    with atomic_folder(Path(output_dir), overwrite=True) as tmp:
        names = _write_samples(pipe, labels, seed, batch_size, call, str(tmp), text=source.text, write_png=write_png,
                               write_grid=write_grid, npz=npz, num_prompts=len(prompts or []), progress=progress)
    result.image_paths = [os.path.join(output_dir, name) for name in names["images"]]
    result.grid_path = os.path.join(output_dir, names["grid"]) if names["grid"] else None
    result.npz_path = os.path.join(output_dir, names["npz"]) if names["npz"] else None
    result.seconds = time.perf_counter() - started
    return result


def _write_samples(pipe, labels: List, seed: int, batch_size: int, call: Dict, folder: str, text: bool,
                   write_png: bool, write_grid: bool, npz: bool, num_prompts: int,
                   progress: Optional[Callable[[int, int], None]]) -> Dict:
    """Sample every image of `labels` (class ids, or prompts when `text`) batch by batch into `folder`, streaming
    PNGs and the npz; returns the file names written: {"images": [...], "grid": name or None, "npz": name or None}."""
    num_samples, height, width = len(labels), call["height"], call["width"]
    names = {"images": [], "grid": None, "npz": None}
    npz_name = f"samples_{num_samples}x{height}x{width}x3.npz"
    writer = NpzWriter(os.path.join(folder, npz_name), (num_samples, height, width, 3)) if npz else None
    grid: List[np.ndarray] = []
    try:
        for start, images, batch_labels in iter_samples(pipe, labels, seed, batch_size, **call):
            for i, (image, label) in enumerate(zip(images, batch_labels)):
                if write_png:
                    name = f"{start + i:06d}.png" if text else f"{start + i:06d}_class{label}.png"
                    Image.fromarray(image).save(os.path.join(folder, name))
                    names["images"].append(name)
                if write_grid and len(grid) < GRID_MAX_IMAGES:
                    grid.append(image)
            if writer is not None:
                writer.append(images)
            if progress is not None:
                progress(min(start + batch_size, num_samples), num_samples)
        if writer is not None:  # a text model's arr_1 holds each image's index into the prompts
            writer.close([i % num_prompts for i in range(num_samples)] if text else labels)
            names["npz"] = npz_name
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if write_grid:
        names["grid"] = os.path.basename(save_grid(grid, os.path.join(folder, "grid.png")))
    if text:  # image i's prompt on line i + 1
        with open(os.path.join(folder, "prompts.txt"), "w", encoding="utf-8") as f:
            f.write("".join(p.replace("\n", " ") + "\n" for p in labels))
    return names
