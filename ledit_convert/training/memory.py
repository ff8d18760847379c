"""GPU memory per process for a fine-tune, under DDP and under FSDP2, before any GPU is rented.

    size = model_size(build_on_meta(family, config), family, recipe)      # parameter counts, no weights allocated
    plan = memory_plan(size, recipe, "fsdp2", gpus=8, tokens=tokens_per_sample(family, config, recipe))
    plan.total                                                              # bytes on each GPU

`ledit-convert inspect MODEL --memory --recipe R` prints these for a model folder or a published model (PUBLISHED).

What each process holds, in bytes (P all parameters, T the trained ones, R those outside the transformer blocks, B
the largest block's, B_T its trained ones, N processes, w 2 under bf16 or 4 under fp32):

  DDP     params      4P, plus autocast's bf16 weight copies, saved for the backward: 2P, or with activation
                      checkpointing 2(R + B) (one block's at a time)
          grads       4T for .grad, and 4T again for DDP's flat all-reduce buckets (accelerate leaves
                      gradient_as_bucket_view off)
          optimizer   8T (AdamW's two fp32 moments)
          EMA         4P (an fp32 copy of the whole model, frozen LoRA bases included)
  FSDP2   params      4P/N fp32 shards, plus gathered weights in w bytes: the root group (kept from forward to
                      backward) and two blocks (the running one, the prefetched next): w(R + 2B); without
                      reshard_after_forward every block stays gathered: wP
          grads       4T/N shards, plus the running block's unsharded gradients and FSDP's fp32 reduce-scatter
                      input: (w + 4) B_T
          optimizer   8T/N
          EMA         4T/N (trained parameters only, sharded beside them)
  both    activations per image, per block, 34 s h bytes in 16 bits (Korthikanti et al. 2022, "Reducing Activation
                      Recomputation in Large Transformer Models", sec. 4.1, without the attention scores that
                      SDPA and flash attention recompute instead of storing), doubled in fp32; s tokens, h width.
                      With activation checkpointing a block keeps only its input (w s h) and one block at a time
                      holds its full activations during the recompute. Times the images per GPU per micro-step.

Left out: the CUDA context and allocator fragmentation (budget 2-4 GiB per GPU), DDP's and FSDP2's few-MiB
communication buffers, the loss and latents, torch's padding of each shard to whole rows. Text enters SD3's joint
blocks as tokens (s counts them: 77 CLIP + the T5 length); PixArt's cross-attention keys and values of its text and
the extra image attention of SD3.5 Medium's first 13 blocks are not counted, so their activations are a few percent
low. The activation constant is a transformer-block estimate; the parameter terms are exact counts.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..conversion.checkpoints import LEDIT_CLASS_NAMES, MODEL_CLASSES, read_json, transformer_folder
from ..errors import CheckpointError, ConfigError
from ..models.compiling import repeated_blocks
from .recipe import Recipe

ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34  # per block, 16-bit (Korthikanti et al. 2022), see the module docstring
CLIP_TOKENS = 77  # SD3's joint text sequence: the two CLIPs' 77 tokens, then the T5's
VAE_FACTOR = 8  # every latent family here (SD, SDXL, SD3 VAEs) downsamples by 8
GiB = 2 ** 30

# The published configs (diffusers' transformer/config.json of each hub repo), which `model_size` counts after the
# LEDiT surgery's changes (surgery_defaults): the sizes in the README's memory table
PUBLISHED: Dict[str, Dict] = {
    "dit-xl-2-256": {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
                     "in_channels": 4, "out_channels": 8, "num_layers": 28, "patch_size": 2, "sample_size": 32,
                     "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero"},  # facebook/DiT-XL-2-256
    "pixart-sigma-xl-2-1024": {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS
        "_class_name": "PixArtTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
        "in_channels": 4, "out_channels": 8, "num_layers": 28, "cross_attention_dim": 1152, "caption_channels": 4096,
        "sample_size": 128, "patch_size": 2, "interpolation_scale": 2, "use_additional_conditions": False,
        "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000, "attention_bias": True},
    "sd3.5-medium": {  # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, image-only attention in blocks 0-12
        "_class_name": "SD3Transformer2DModel", "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64,
        "caption_projection_dim": 1536, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "sample_size": 128, "pos_embed_max_size": 384,
        "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))},
    "sd3.5-large": {  # stabilityai/stable-diffusion-3.5-large: 38 blocks of 38 heads x 64 (width 2432)
        "_class_name": "SD3Transformer2DModel", "num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64,
        "caption_projection_dim": 2432, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "sample_size": 128, "pos_embed_max_size": 192,
        "qk_norm": "rms_norm", "dual_attention_layers": []},
}
STOCK_FAMILIES = {"DiTTransformer2DModel": "dit", "Transformer2DModel": "dit", "PixArtTransformer2DModel": "pixart",
                  "SD3Transformer2DModel": "sd3"}


#################################################################################
#                           What the model is made of                           #
#################################################################################

@dataclass
class ModelSize:
    """The parameter counts memory depends on, for the model as trained (LoRA adapters included)."""

    params: int  # every parameter
    trainable: int  # those AdamW updates (all, or LoRA's adapters and fully trained modules)
    root: int  # outside the transformer blocks: FSDP2's root group
    largest_block: int  # FSDP2 gathers one block at a time (two with prefetch)
    largest_block_trainable: int
    blocks: int
    width: int  # token width h


def ledit_config(stock: Dict) -> Tuple[str, Dict]:
    """(family, LEDiT init kwargs) for a config.json: an LEDiT's as it is; a stock diffusers DiT, PixArt or SD3's with
    what `ledit-convert surgery` changes by default (no table, alternating causal blocks, a full 3x3 locality conv),
    the only change that adds parameters being the conv."""
    import inspect
    from ..conversion.surgery import parse_causal_layers
    name = stock.get("_class_name")
    if name in LEDIT_CLASS_NAMES:
        family = LEDIT_CLASS_NAMES[name]
        keys = inspect.signature(MODEL_CLASSES[family].__init__).parameters
        return family, {k: v for k, v in stock.items() if k in keys}
    if name not in STOCK_FAMILIES:
        raise CheckpointError(f"config.json describes {name!r}, not a DiT, PixArt or SD3 transformer")
    family = STOCK_FAMILIES[name]
    depth = stock.get("num_layers", 28)
    ledit = dict(position_encoding="none", attention_layout=parse_causal_layers("alternate", depth),
                 attention_scaling="log", locality="full", locality_kernel_size=3)
    if family == "dit":
        heads = stock.get("num_attention_heads", 16)
        return family, dict(ledit, hidden_size=heads * stock.get("attention_head_dim", 72), num_layers=depth,
                            num_attention_heads=heads, patch_size=stock["patch_size"],
                            in_channels=stock.get("in_channels", 4), out_channels=stock.get("out_channels") or 8,
                            num_classes=stock.get("num_embeds_ada_norm", 1000),
                            sample_size=stock.get("sample_size", 32))
    keys = inspect.signature(MODEL_CLASSES[family].__init__).parameters
    return family, dict({k: v for k, v in stock.items() if k in keys}, **ledit)


def build_on_meta(family: str, config: Dict) -> torch.nn.Module:
    """The family's model on the meta device: shapes and counts, no memory."""
    with torch.device("meta"):
        return MODEL_CLASSES[family](**config)


def model_size(model: torch.nn.Module, family: str, recipe: Recipe) -> ModelSize:
    """Count `model` as the recipe trains it (with lora_rank > 0, LoRA applied to a copy, on the meta device)."""
    if recipe.lora_rank > 0:
        import copy
        from .families import apply_lora
        with torch.device("meta"):
            model = apply_lora(copy.deepcopy(model), recipe, family)
    blocks = repeated_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    params = list(model.parameters())
    per_block = [(sum(p.numel() for p in b.parameters()), sum(p.numel() for p in b.parameters() if p.requires_grad))
                 for b in blocks]
    config = model.base_model.model.config if hasattr(model, "peft_config") else model.config
    width = config.get("hidden_size") or config["num_attention_heads"] * config["attention_head_dim"]
    return ModelSize(params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                     root=sum(p.numel() for p in params if id(p) not in in_blocks),
                     largest_block=max(n for n, _ in per_block), largest_block_trainable=max(t for _, t in per_block),
                     blocks=len(blocks), width=width)


def tokens_per_sample(family: str, config: Dict, recipe: Recipe) -> int:
    """Tokens each block runs per image at the recipe's resolution: the latent grid's patches, plus for SD3 the
    joint text sequence (77 CLIP tokens and the T5's text_max_length, default 256)."""
    from ..data.text import SD3_MAX_LENGTH
    factor = 1 if recipe.vae is None else VAE_FACTOR
    patches = (recipe.resolution // factor // config["patch_size"]) ** 2
    if family == "sd3":
        return patches + CLIP_TOKENS + (recipe.text_max_length or SD3_MAX_LENGTH)
    return patches


#################################################################################
#                                   The plan                                    #
#################################################################################

@dataclass
class MemoryPlan:
    """Bytes on each GPU, by what holds them (see the module docstring for each term)."""

    strategy: str  # ddp | fsdp2
    gpus: int
    micro_batch: int  # images per GPU per micro-step
    params: int
    grads: int
    optimizer: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        """Everything above, without the CUDA context and fragmentation (2-4 GiB more)."""
        return self.params + self.grads + self.optimizer + self.ema + self.activations


def activation_bytes(size: ModelSize, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Activations of one image through the whole model, kept for its backward."""
    full_block = ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * size.width * compute_bytes // 2
    if checkpointing:
        return size.blocks * tokens * size.width * compute_bytes + full_block
    return size.blocks * full_block


def memory_plan(size: ModelSize, recipe: Recipe, strategy: str, gpus: int, tokens: int,
                micro_batch: Optional[int] = None) -> MemoryPlan:
    """Per-GPU bytes of a fine-tune of a model of `size` with `recipe` on `gpus` processes under `strategy` (ddp or
    fsdp2); `micro_batch` (images per GPU per micro-step) defaults to the recipe's global batch split over the GPUs
    and accumulation steps."""
    if strategy not in ("ddp", "fsdp2"):
        raise ConfigError(f"strategy {strategy!r} is not one of ddp, fsdp2")
    if gpus < 1:
        raise ConfigError(f"gpus {gpus} must be positive")
    if strategy == "fsdp2" and gpus < 2:
        raise ConfigError("fsdp2 on 1 GPU: it shards over 2 or more (the fine-tune refuses it too)")
    b = recipe.per_process_batch(gpus) if micro_batch is None else micro_batch
    w = 2 if recipe.mixed_precision in ("bf16", "fp16") else 4
    ckpt = recipe.gradient_checkpointing
    P, T, n = size.params, size.trainable, gpus
    if strategy == "ddp":
        casts = 0 if w == 4 else 2 * ((size.root + size.largest_block) if ckpt else P)
        return MemoryPlan("ddp", n, b, params=4 * P + casts, grads=8 * T, optimizer=8 * T, ema=4 * P,
                          activations=b * activation_bytes(size, tokens, w, ckpt))
    gathered = w * (size.root + 2 * size.largest_block) if recipe.fsdp_reshard_after_forward else w * P
    return MemoryPlan("fsdp2", n, b, params=math.ceil(4 * P / n) + gathered,
                      grads=math.ceil(4 * T / n) + (w + 4) * size.largest_block_trainable,
                      optimizer=math.ceil(8 * T / n), ema=math.ceil(4 * T / n),
                      activations=b * activation_bytes(size, tokens, w, ckpt))


#################################################################################
#                          From a folder or a name                              #
#################################################################################

def model_config(source: str) -> Dict:
    """config.json of a published model (PUBLISHED), a model folder or a pipeline folder's transformer/; only the
    config is read, never the weights."""
    if source in PUBLISHED:
        return dict(PUBLISHED[source])
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"{source}: neither a model folder nor one of the published models "
                          f"({', '.join(PUBLISHED)})")
    return read_json(transformer_folder(path) / "config.json")


def plans_for(source: str, recipe: Recipe, gpus: Sequence[int], micro_batch: Optional[int] = None
              ) -> Tuple[ModelSize, int, List[MemoryPlan]]:
    """(size, tokens per image, a DDP and (from 2 GPUs) an FSDP2 plan per GPU count) of fine-tuning `source` with
    `recipe`."""
    family, config = ledit_config(model_config(source))
    size = model_size(build_on_meta(family, config), family, recipe)
    tokens = tokens_per_sample(family, config, recipe)
    plans = [memory_plan(size, recipe, strategy, n, tokens, micro_batch) for n in gpus
             for strategy in ("ddp", "fsdp2") if n > 1 or strategy == "ddp"]  # one GPU has nothing to shard with
    return size, tokens, plans


def plan_rows(plans: List[MemoryPlan]) -> List[Dict]:
    """The plans as rows of GiB (JSON output, tables)."""
    rows = []
    for plan in plans:
        row = {k: (round(v / GiB, 2) if k in ("params", "grads", "optimizer", "ema", "activations") else v)
               for k, v in asdict(plan).items()}
        rows.append(dict(row, total=round(plan.total / GiB, 2)))
    return rows
