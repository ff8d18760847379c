"""What each model family trains with: DiT (class ids, DiT's objective), PixArt (text tokens and masks, DiT's
objective), SD3 (joint text tokens and pooled vectors, rectified flow). `finetune` asks these functions for the
family's objective, text inputs, batch conditions and LoRA layout, so its loop is one for every family."""
from pathlib import Path

import torch

from ..conversion.checkpoints import LEDIT_CLASS_NAMES, read_json
from ..data.images import CaptionSample, EncodedSample
from ..data.text import TextCondition
from ..errors import CheckpointError, ConfigError, DataError
from .flow import FlowSchedule
from .recipe import Recipe

# per family: the linears LoRA adapts, and what trains fully beside them (the locality conv, adaLN, the final layer)
LORA_TARGETS = {"dit": r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
                "pixart": r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
                "sd3": r".*transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
                       r"|ff(_context)?\.net\.(0\.proj|2))"}
FULLY_TRAINED_WITH_LORA = {"dit": ("locality_conv", "adaLN_modulation", "final_layer"),
                           "pixart": ("locality_conv", "adaln_single", "scale_shift_table", "proj_out"),
                           "sd3": ("locality_conv", "norm1.linear", "norm1_context.linear", "norm_out", "proj_out")}
OBJECTIVES = {"dit": "diffusion", "pixart": "diffusion", "sd3": "flow"}  # what each family is trained with
FAMILY_NAMES = {"dit": "DiT", "pixart": "PixArt", "sd3": "SD3"}


def model_family(model_path: Path) -> str:
    """The family ("dit", "pixart", "sd3") of a converted model folder, from its config's class name."""
    name = read_json(model_path / "config.json").get("_class_name")
    if name not in LEDIT_CLASS_NAMES:
        raise CheckpointError(f"{model_path}: holds a {name}, not a converted model; run `ledit-convert surgery` first")
    return LEDIT_CLASS_NAMES[name]


def apply_lora(model: torch.nn.Module, recipe: Recipe, family: str):
    """peft LoRA on attention/MLP linears; the locality conv, adaLN and final layer train fully."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha or recipe.lora_rank,
                        target_modules=LORA_TARGETS[family], init_lora_weights=True)
    wrapped = get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if any(part in name for part in FULLY_TRAINED_WITH_LORA[family]) and "lora_" not in name:
            p.requires_grad_(True)
    return wrapped


def flow_schedule(recipe: Recipe, family: str):
    """The rectified-flow schedule when the recipe's objective (auto: the family's) is flow, else None; an objective
    the family is not trained with is refused."""
    objective = OBJECTIVES[family] if recipe.objective == "auto" else recipe.objective
    if objective != OBJECTIVES[family]:
        raise ConfigError(f"objective {objective!r}: {FAMILY_NAMES[family]} models fine-tune with "
                          f"{OBJECTIVES[family]!r}")
    if objective != "flow":
        return None
    try:
        return FlowSchedule(shift=recipe.flow_shift, weighting_scheme=recipe.flow_weighting,
                            loss_weighting=recipe.flow_loss_weighting)
    except ValueError as e:
        raise ConfigError(f"recipe: {e}") from None


def text_inputs(dataset, recipe: Recipe, cfg, data, device, family: str):
    """A text model's encoder (loaded when captions must be encoded: uncached data, validation prompts) and the
    empty prompt's tokens, each checked against the transformer (PixArt's caption_channels, SD3's
    joint_attention_dim)."""
    from ..inference.text_pipeline import load_text_encoders
    cached = getattr(dataset, "text", None)
    key = "joint_attention_dim" if family == "sd3" else "caption_channels"
    if cached is not None and cached["width"] != getattr(cfg, key):
        raise DataError(f"{data}: the cache holds {cached['width']}-wide text tokens (from {cached['encoder']}), "
                        f"but the model takes {key} {getattr(cfg, key)}")
    if cached is not None and ("pooled" in cached["fields"]) != (family == "sd3"):
        raise DataError(f"{data}: the cache holds {'+'.join(cached['fields'])} text fields, which a {family} model "
                        f"does not take; cache with the model's own text encoders")
    needed = cached is None or recipe.validate_every > 0
    if needed and recipe.text_encoder is None:
        why = "validation prompts (validate_every > 0)" if cached is not None else "uncached captions"
        raise ConfigError(f"{why} need the recipe's text_encoder; set it, or cache captions with "
                          f"`ledit-convert cache-latents --text-encoder`" + (" and set validate_every 0" if
                                                                               cached is not None else ""))
    encoder = None
    if needed:
        encoder = load_text_encoders(family, recipe.text_encoder, recipe.text_max_length, device)
        encoder.check_fits(cfg, "the model")
    null = dataset.null_text() if cached is not None else {k: v[0] for k, v in encoder.encode([""]).items()}
    return encoder, {k: v.to(device) for k, v in null.items()}


def condition(run, batch):
    """A collated batch's condition on the device: class ids (Sample), or a TextCondition from cached tokens
    (EncodedSample) or from captions encoded now (CaptionSample), with PixArt-alpha's micro-conditions when the
    model has them: each item's `size` and the batch's aspect ratio (height / width of its images)."""
    device = run.accelerator.device
    if isinstance(batch, EncodedSample):
        tokens = {k: v.to(device, non_blocking=True) for k, v in batch.text.items()}
    elif isinstance(batch, CaptionSample):
        tokens = run.text_encoder.encode(batch.caption)
    else:
        return batch[1].to(device, non_blocking=True)
    micro = None
    if getattr(run.config, "use_additional_conditions", False):
        height, width = batch.x.shape[-2:]
        micro = {"resolution": batch.size.to(device), "aspect_ratio": torch.full(
            (len(batch.size), 1), height / width, device=device)}
    return TextCondition(tokens, run.null_text, micro)
