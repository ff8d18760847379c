"""Model surgery: small, pure steps that turn a stock DiT (or PixArt, SD3) into an LEDiT, or a stock DiT into the
LEDiT paper's DiT-RoPE baseline (`position="rope2d"`: the table replaced by 2D RoPE in every block).

Each step takes and returns (config, state_dict) and says what it did, so the written folder
describes itself. Every tensor not named by a step is passed through untouched (bit-exact).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from .checkpoints import SourceCheckpoint, check_against_model
from ..errors import ConfigError
from ..models.attention import CAUSAL_SCANS
from ..models.dit import ATTENTION_SCALINGS, LOCALITY_KINDS
from ..models.positions import ROPE_BASE

State = Tuple[Dict, Dict[str, torch.Tensor]]


@dataclass
class SurgeryOptions:
    """What surgery does; defaults are the paper's full LEDiT."""

    causal_layers: str = "alternate"  # (SA, CA) x depth/2, SA first
    scan: str = "mask_lower_right_corner"  # variant (d), the paper's best (Table 1b), in its first reading
    locality: str = "full"  # D->D 3x3 conv; "depthwise" or "none" for ablations
    kernel_size: int = 3
    dilation_prob: float = 0.1  # Table 1c: p = 0.1 is best
    dilation_rates: List[int] = field(default_factory=lambda: [2])  # the tables mark r = 2 as default
    post_norm: bool = False  # the from-scratch refinement only
    attention_scaling: str = "log"  # Jin et al. 2023; factor 1 at the training resolution
    position: str = "none"  # what replaces the table: nothing (LEDiT) or "rope2d" (the paper's DiT-RoPE baseline)


SURGERY_POSITIONS = ("none", "rope2d")
TARGETS = {"none": "LEDiT", "rope2d": "DiT-RoPE (the LEDiT paper's 2D RoPE baseline)"}  # the model card's title
# per position, what the layout options default to when not given: LEDiT's recipe, or for DiT-RoPE the stock blocks
# (no causal blocks, no conv, no logit scaling: the baseline differs from the DiT only in its positions)
POSITION_DEFAULTS = {"none": dict(causal_layers="alternate", locality="full", attention_scaling="log"),
                     "rope2d": dict(causal_layers="none", locality="none", attention_scaling="none")}


def surgery_options(position: str = "none", **given) -> SurgeryOptions:
    """SurgeryOptions for `position` with the given values; a layout option given as None takes the position's
    default (POSITION_DEFAULTS)."""
    if position not in SURGERY_POSITIONS:
        raise ConfigError(f"--position {position!r} is not one of {', '.join(SURGERY_POSITIONS)}")
    values = {k: v for k, v in given.items() if v is not None}
    return SurgeryOptions(position=position, **dict(POSITION_DEFAULTS[position], **values))


def parse_causal_layers(spec: str, depth: int) -> List[str]:
    """alternate | all | none | comma list of block indices -> one "self"/"causal" entry per block."""
    spec = spec.strip().lower()
    if spec == "alternate":
        return ["self" if i % 2 == 0 else "causal" for i in range(depth)]
    if spec == "all":
        return ["causal"] * depth
    if spec == "none":
        return ["self"] * depth
    try:
        picked = {int(part) for part in spec.split(",") if part.strip()}
    except ValueError:
        raise ConfigError(f"--causal-layers {spec!r}: expected alternate, all, none or a comma list of block indices")
    bad = sorted(i for i in picked if not 0 <= i < depth)
    if bad or not picked:
        raise ConfigError(f"--causal-layers {spec!r}: block indices must be in 0..{depth - 1}")
    return ["causal" if i in picked else "self" for i in range(depth)]


def validate_options(opts: SurgeryOptions) -> None:
    """Every problem with the options at once."""
    problems = []
    if opts.scan not in CAUSAL_SCANS:
        problems.append(f"--scan {opts.scan!r} is not one of {', '.join(CAUSAL_SCANS)}")
    if opts.locality not in LOCALITY_KINDS:
        problems.append(f"--locality {opts.locality!r} is not one of {', '.join(LOCALITY_KINDS)}")
    if opts.kernel_size < 1 or opts.kernel_size % 2 == 0:
        problems.append(f"--kernel-size {opts.kernel_size} must be odd and positive")
    if not 0.0 <= opts.dilation_prob <= 1.0:
        problems.append(f"--dilation-prob {opts.dilation_prob} is not in [0, 1]")
    if not opts.dilation_rates or any(r < 1 for r in opts.dilation_rates):
        problems.append(f"--dilation-rates {opts.dilation_rates} must be positive integers")
    if opts.position not in SURGERY_POSITIONS:
        problems.append(f"--position {opts.position!r} is not one of {', '.join(SURGERY_POSITIONS)}")
    if opts.attention_scaling not in ATTENTION_SCALINGS:
        problems.append(f"--attention-scaling {opts.attention_scaling!r} is not one of {', '.join(ATTENTION_SCALINGS)}")
    if problems:
        raise ConfigError("; ".join(problems))


STORED_TABLES = ("pos_embed.pos_embed",)  # SD3 stores its (cropped) table; DiT's readers already drop theirs


def drop_position_encoding(state: State) -> Tuple[State, str]:
    """Remove the sin/cos table: LEDiT has no explicit positional encoding (and so no size cap)."""
    config, sd = state
    stored = [k for k in STORED_TABLES if k in sd]
    sd = {k: v for k, v in sd.items() if k not in stored}
    note = "removed the 2D sin/cos positional encoding" + (" (its stored table, and with it the size cap)" if stored else "")
    return (dict(config, position_encoding="none"), sd), note


def add_rope(state: State) -> Tuple[State, str]:
    """Rotate q and k of every block by axial 2D RoPE (base 10000; rows then columns in each head): the LEDiT
    paper's DiT-RoPE. No tensor changes: RoPE has no weights."""
    config, sd = state
    return (dict(config, position_encoding="rope2d", rope_theta=ROPE_BASE), sd), \
        f"2D RoPE in every block (base {ROPE_BASE:g}; half of each head by the row, half by the column)"


def set_attention_layout(state: State, layout: List[str], scan: str, scaling: str) -> Tuple[State, str]:
    """Mark blocks causal or self-attention, pick the causal scan and the inference logit scaling."""
    config, sd = state
    n = layout.count("causal")
    config = dict(config, attention_layout=layout, causal_scan=scan, attention_scaling=scaling)
    return (config, sd), f"made {n} of {len(layout)} blocks causal (scan {scan}); attention scaling {scaling}"


PATCHIFY_WEIGHTS = ("x_embedder.proj.weight", "pos_embed.proj.weight")  # DiT's name, diffusers' PixArt name


def add_locality_conv(state: State, opts: SurgeryOptions) -> Tuple[State, str]:
    """Insert the residual locality conv after patchify with zero weight and bias (an exact no-op at first)."""
    config, sd = state
    config = dict(config, locality=opts.locality, locality_kernel_size=opts.kernel_size,
                  locality_dilation_prob=opts.dilation_prob, locality_dilation_rates=list(opts.dilation_rates),
                  locality_post_norm=opts.post_norm)
    if opts.locality == "none":
        return (config, sd), "no locality conv (ablation)"
    patchify = next(sd[k] for k in PATCHIFY_WEIGHTS if k in sd)  # (D, C, p, p): the token width and dtype
    d, k, dtype = patchify.shape[0], opts.kernel_size, patchify.dtype
    sd = dict(sd)
    sd["locality_conv.conv.weight"] = torch.zeros(d, 1 if opts.locality == "depthwise" else d, k, k, dtype=dtype)
    sd["locality_conv.conv.bias"] = torch.zeros(d, dtype=dtype)
    if opts.post_norm:
        sd["locality_conv.norm.weight"] = torch.ones(d, dtype=dtype)
        sd["locality_conv.norm.bias"] = torch.zeros(d, dtype=dtype)
    rates = ",".join(map(str, opts.dilation_rates))
    extra = " + LayerNorm" if opts.post_norm else ""
    return (config, sd), (f"added a zero-initialised {k}x{k} {opts.locality} locality conv{extra} "
                          f"(dilation {rates} with p={opts.dilation_prob:g} in training)")


def convert(source: SourceCheckpoint, opts: SurgeryOptions) -> Tuple[Dict, Dict[str, torch.Tensor], List[str]]:
    """Run every surgery step on a stock DiT or PixArt (options already checked by `validate_options`); returns the
    LEDiT config, its tensors and what changed."""
    if source.config.get("position_encoding") != "sincos" or source.config.get("locality", "none") != "none":
        raise ConfigError(f"{source.path}: already an LEDiT or a DiT-RoPE (no sin/cos table, or a locality "
                          "conv); "
                          "surgery takes a stock DiT, PixArt or SD3")
    if opts.position == "rope2d" and source.family != "dit":
        raise ConfigError(f"{source.path}: --position rope2d converts class-conditional DiTs, not a {source.family} "
                          "model; stock PixArt and SD3 sample with the sin/cos scalings (--position-scaling)")
    layout = parse_causal_layers(opts.causal_layers, source.config["num_layers"])
    state: State = (dict(source.config), source.state_dict)
    changes = []
    state, note = drop_position_encoding(state)
    changes.append(note)
    if opts.position == "rope2d":
        state, note = add_rope(state)
        changes.append(note)
    state, note = set_attention_layout(state, layout, opts.scan, opts.attention_scaling)
    changes.append(note)
    state, note = add_locality_conv(state, opts)
    changes.append(note)
    config, sd = state
    check_against_model(sd, config, source.path, source.family)
    return config, sd, changes


@dataclass
class SurgeryResult:
    """What `surgery_to_folder` read, changed and wrote."""

    source: Dict
    changes: List[str]
    config: Dict
    output: str
    sha256: str


def surgery_to_folder(source: str, out, opts: SurgeryOptions, *, weights: str = "ema", num_heads=None,
                      image_size=None, overwrite: bool = False) -> SurgeryResult:
    """Read a stock DiT or PixArt, convert it and write an LEDiT folder atomically."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import asdict
    from pathlib import Path

    from .checkpoints import describe, read_checkpoint, sha256_of
    from .export import model_card, provenance_record, refuse_existing, write_model_folder

    out = Path(out)
    refuse_existing(out, overwrite)
    validate_options(opts)
    ckpt = read_checkpoint(source, weights=weights, num_heads=num_heads, image_size=image_size)
    config, sd, changes = convert(ckpt, opts)  # fast, and fails before any hashing on a bad source
    summary = describe(ckpt)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the source hash runs alongside the weight write
        digest = pool.submit(sha256_of, ckpt.weights_file) if ckpt.weights_file else None

        def provenance():  # called by write_model_folder once the weights are on disk
            record = provenance_record(ckpt.path, digest.result() if digest else None, ckpt.format,
                                       dict(asdict(opts), weights=weights), changes)
            record["source"]["summary"] = summary
            return record
        write_model_folder(out, config, sd, overwrite=overwrite, provenance=provenance,
                           card=model_card(summary, changes, ckpt.family, TARGETS[opts.position]),
                           family=ckpt.family)
    return SurgeryResult(summary, changes, config, str(out), digest.result() if digest else "")
