# One transformer class for stock DiT and LEDiT (arXiv 2503.04344).
#
# This file needs torch, diffusers and its two sibling modules only (positions.py, attention.py): surgery copies the
# three beside the weights so that `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` loads a
# converted model where ledit_convert is not installed. Keep it that way.
#
# References:
#   DiT: https://github.com/facebookresearch/DiT/blob/main/models.py (layout and numerics)
#   LEDiT: causal attention, no positional encoding, locality conv, attention scaling.
#   DiT-RoPE (the LEDiT paper's baseline): axial 2D RoPE in every block, positions.py (FiT's VisionRoPE).
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from .modeling_ledit_attention import (ATTENTION_BACKENDS, CAUSAL_SCANS, DIFFUSERS_BACKENDS, attend, attention_mask,
                        log_scaling_factor, resolve_backend)
from .modeling_ledit_positions import (DYNAMIC_SCALINGS, ROPE_BASE, ROPE_SCALINGS, SINCOS_SCALINGS, apply_rope, diffusion_time,
                        rope_table, rope_turn, sincos_table)

ATTENTION_KINDS = ("self", "causal")
POSITION_ENCODINGS = ("none", "sincos", "rope2d")
POSITION_MODES = ("extrapolate", "interpolate")
ATTENTION_SCALINGS = ("log", "none")
LOCALITY_KINDS = ("none", "full", "depthwise")
REMOTE_CODE_FILE = "modeling_ledit.py"  # this file, as it is copied beside saved weights
POSITIONS_FILE = "modeling_ledit_positions.py"  # positions.py, as it is copied beside saved weights
ATTENTION_FILE = "modeling_ledit_attention.py"  # attention.py, as it is copied beside saved weights


# package module -> its copy's name; diffusers copies only a remote module's direct relative imports, so every model
# file imports positions and attention itself
_REMOTE_IMPORTS = tuple((re.compile(rf"^from \.(?:{module}|{Path(copy).stem}) import", re.MULTILINE), copy)
                        for module, copy in (("dit", REMOTE_CODE_FILE), ("positions", POSITIONS_FILE),
                                             ("attention", ATTENTION_FILE)))


def remote_code_text(path) -> str:
    """A model file's text with its imports of this package's model files pointed at their copies' names."""
    code = Path(path).read_text()
    for pattern, copy_name in _REMOTE_IMPORTS:
        code = pattern.sub(f"from .{Path(copy_name).stem} import", code)
    return code


def add_remote_code(folder, class_name: str = "LEDiTTransformer2DModel", model_file=None,
                    file_name: str = REMOTE_CODE_FILE) -> None:
    """Copy this file, positions.py and attention.py beside a saved model and point config.json's auto_map at
    `class_name` (diffusers AutoModel).

    A model defined in another file (`model_file`, which imports this one) is copied too, as `file_name`; every copy
    has its relative imports rewritten to the copies' names."""
    folder = Path(folder)
    sources = {REMOTE_CODE_FILE: __file__, POSITIONS_FILE: sys.modules[apply_rope.__module__].__file__,
               ATTENTION_FILE: sys.modules[attend.__module__].__file__}
    if model_file is not None:
        sources[file_name] = model_file
    for name, source in sources.items():
        target = folder / name
        if not (target.exists() and os.path.samefile(source, target)):  # a model loaded from this folder saves here
            _replace_text(target, remote_code_text(source))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": f"{Path(file_name).stem}.{class_name}"}
    _replace_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


#################################################################################
#                   Positions and the helpers the blocks share                  #
#################################################################################

def sincos_position_table(dim: int, height: int, width: int, base_height: int, base_width: int,
                          mode: str = "extrapolate", t: Optional[float] = None) -> torch.Tensor:
    """MAE/DiT 2D sin/cos table (H*W, dim) in float64; the first half of channels encodes the column. `mode` is one
    of SINCOS_SCALINGS ("extrapolate": DiT's code, "interpolate": diffusers' PatchEmbed); `t` is the diffusion time
    in [0, 1] of the DyPE variant."""
    return sincos_table(dim, (height, width), (base_height, base_width), mode, t=t)


def position_scaling(encoding: str, requested: Optional[str], default: str) -> Optional[str]:
    """The scaling a call uses for positions `encoding`: `requested`, else `default`; None for a model without
    positions. A scaling that does not apply to the positions is an error naming it and the ones that do."""
    allowed = {"sincos": SINCOS_SCALINGS, "rope2d": ROPE_SCALINGS}.get(encoding, ())
    if requested is None:
        return default if allowed else None
    if requested not in allowed:
        kind = {"sincos": "a sin/cos table", "rope2d": "2D RoPE"}.get(encoding, "no positional encoding")
        takes = ", ".join(allowed) if allowed else "no position scaling"
        raise ValueError(f"position scaling {requested!r} does not apply to a model with {kind}: it takes {takes}")
    return requested


def diffusion_times(timestep: torch.Tensor) -> List[float]:
    """Each sample's diffusion time in [0, 1] (DyPE's t) from the model's timesteps; a host read, so only the
    timestep-dependent scalings pay it."""
    return [diffusion_time(value) for value in torch.as_tensor(timestep).reshape(-1).tolist()]


def unpatchify(x, height: int, width: int, patch_size: int, channels: int):
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image, from an explicit token grid."""
    p, c = patch_size, channels
    x = x.reshape(x.shape[0], height, width, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, height * p, width * p)


def modulate(x, shift, scale):
    """adaLN modulation, as in DiT."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift  # DiT divides by half, diffusers by (half - 1)

    def timestep_features(self, t, max_period: int = 10000):
        """[cos, sin] features of shape (N, frequency_size), float32."""
        half = self.frequency_size // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - self.freq_shift))
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t, dtype: torch.dtype):
        """The embedding of timesteps `t` (N,), computed in `dtype` (the hidden states' dtype, which is the compute
        dtype also when the weights are stored in another one)."""
        return self.mlp(self.timestep_features(t).to(dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index num_classes) for the null class of CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels):
        return self.embedding_table(labels)


#################################################################################
#                                 Core LEDiT Model                              #
#################################################################################

class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection (rows q; k; v) as in DiT."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, causal_scan, logit_factor: float, backend: str, mask, rope=None):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        scale = logit_factor / math.sqrt(self.head_dim)
        out = attend(q, k, v, causal_scan, scale, backend, mask, rope)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximate GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; `causal` selects masked attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, causal: bool, norm_eps: float, mlp_norm_eps: float):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, causal_scan, logit_factor: float, backend: str, mask, rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), causal_scan, logit_factor, backend, mask, rope)
        x = x + gate_msa.unsqueeze(1) * h
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DilatedConv2d(nn.Conv2d):
    """A stride-1 conv whose dilation (and the zero padding that keeps the grid) is chosen per call. Called as a
    module, so hooks on it (diffusers' layerwise casting, offloading) see every use of its weights."""

    def forward(self, x, dilation: int = 1):
        pad = dilation * (self.kernel_size[0] - 1) // 2  # zero padding: borders leak position on purpose
        return F.conv2d(x, self.weight, self.bias, padding=pad, dilation=dilation, groups=self.groups)


class LocalityConv(nn.Module):
    """Residual k x k convolution on the token grid right after patchify (LEDiT's locality enhancement)."""

    def __init__(self, dim: int, kernel_size: int, depthwise: bool, dilation_prob: float,
                 dilation_rates: List[int], post_norm: bool):
        super().__init__()
        self.conv = DilatedConv2d(dim, dim, kernel_size, groups=dim if depthwise else 1, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if post_norm else None
        self.dilation_prob = dilation_prob
        self.dilation_rates = list(dilation_rates)

    def sample_dilation(self) -> int:
        """Dilation 1, or in training mode with probability dilation_prob one of dilation_rates."""
        if not self.training or self.dilation_prob <= 0 or not self.dilation_rates:
            return 1
        if float(torch.rand(())) >= self.dilation_prob:
            return 1
        return self.dilation_rates[int(torch.randint(len(self.dilation_rates), ()))]

    def forward(self, x, grid, dilation: Optional[int] = None):
        height, width = grid
        dilation = self.sample_dilation() if dilation is None else dilation
        b, n, d = x.shape
        image = x.transpose(1, 2).reshape(b, d, height, width)  # (B, D, h, w)
        local = self.conv(image, dilation)
        x = x + local.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and the linear map back to patches."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """Non-overlapping patchify as a strided convolution."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # contiguous (B, N, D): compiled blocks (inductor, CPU) computed wrong attention gradients for the
        # transposed layout, and every linear layer after this prefers rows anyway
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class LEDiTModelMixin:
    """What the LEDiT model classes share: a save that reloads without this package, the attention backend switch,
    logit scaling and the causal blocks' mask lookup. Each class names its own code in `write_remote_code`."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Drop the AutoModel remote-code pointer, which is for diffusers' loader, not for __init__."""
        config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, plus the model code and the auto_map entry, so the folder reloads without ledit_convert."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.write_remote_code(save_directory)

    def set_attention_backend(self, backend: str):
        """Choose how attention is computed: ours, "auto", "sdpa", "flex" (compiled FlexAttention, for CUDA) or
        "math" (the textbook formula), or a diffusers backend name whose kernel takes a mask (DIFFUSERS_BACKENDS:
        "native" is "sdpa", "_native_math" is "math"); diffusers' mask-less kernels (flash, sage, xformers) are
        refused, since a causal block's scan is a mask."""
        name = str(getattr(backend, "value", backend)).lower()  # a name or diffusers' AttentionBackendName
        if name in ATTENTION_BACKENDS:
            self.attention_backend = name
            return
        if name in DIFFUSERS_BACKENDS:
            self.attention_backend = DIFFUSERS_BACKENDS[name]
            return
        from diffusers.models.attention_dispatch import AttentionBackendName
        if name in {member.value for member in AttentionBackendName}:
            raise ValueError(f"attention backend {backend!r} takes no attention mask, which LEDiT's causal blocks "
                             f"need; use one of {sorted(DIFFUSERS_BACKENDS)} or {ATTENTION_BACKENDS}")
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS} or "
                         f"{sorted(DIFFUSERS_BACKENDS)}")

    def reset_attention_backend(self) -> None:
        """Back to the default backend, "auto"."""
        self.attention_backend = "auto"

    def cached_position_table(self, key, build) -> torch.Tensor:
        """A position table from the model's cache, built by `build()` on a miss; under torch.compile built in the
        graph, since a cache the graph reads and fills would be guarded on and recompile the next call."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._position_cache:
            self._position_cache[key] = build()
        return self._position_cache[key]

    def check_position_scaling(self, method: str) -> None:
        """A one-line ValueError when this model's positions do not take the scaling `method`."""
        position_scaling(self.config.position_encoding, method, method)

    def set_position_scaling(self, method: Optional[str]) -> None:
        """The position scaling calls use when their kwargs name none (None: the model's default), for pipelines
        that pass no attention kwargs (diffusers' PixArt pipelines); an error for one its positions do not take."""
        if method is not None:
            self.check_position_scaling(method)
        self._position_scaling = method

    def call_scaling(self, opts: Dict[str, Any], default: str, older: Optional[str] = None) -> Optional[str]:
        """A call's position scaling: its kwargs' "position_scaling" (or `older`, a former option's value), else
        `set_position_scaling`'s, else `default`; None for a model without positions."""
        requested = opts.get("position_scaling") or older or getattr(self, "_position_scaling", None)
        return position_scaling(self.config.position_encoding, requested, default)

    def batch_positions(self, method: Optional[str], timestep, build) -> torch.Tensor:
        """`build(t)` (a (1, ...) tensor) for this call: once with t None for a static scaling; for DyPE's variants
        once per distinct diffusion time in the batch, concatenated per sample when the times differ."""
        if method not in DYNAMIC_SCALINGS:
            return build(None)
        if timestep is None:
            raise ValueError(f"position scaling {method!r} follows the diffusion time; the call has no timestep")
        times = diffusion_times(timestep)
        built = {t: build(t) for t in sorted(set(times))}
        return next(iter(built.values())) if len(built) == 1 else torch.cat([built[t] for t in times])

    def logit_factor(self, num_tokens: int, scaling: str) -> float:
        """sqrt(ln N / ln N_train) for "log" scaling, else 1."""
        return log_scaling_factor(num_tokens, (self.config.sample_size // self.config.patch_size) ** 2, scaling)

    def _causal_inputs(self, grid, device, to_self: bool, any_causal: bool, dilation=None):
        """The causal blocks' concrete attention backend and cached mask, and the locality conv's dilation (drawn
        unless the caller fixed it); called from each model's eager (uncompiled) prelude."""
        scan = None if to_self else self.config.causal_scan
        backend = resolve_backend(self.attention_backend, scan, torch.device(device).type)
        mask = attention_mask(scan, grid, device, backend) if any_causal else None
        if dilation is None:
            dilation = self.locality_conv.sample_dilation() if self.locality_conv is not None else 1
        return backend, mask, dilation


class LEDiTTransformer2DModel(LEDiTModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A class-conditional diffusion transformer in DiT mode (sin/cos positions, self-attention) or LEDiT mode
    (no positional encoding, causal blocks, locality conv). Any latent height and width divisible by the patch
    size is accepted.

    Parameters:
        sample_size (`int`): latent side length the model was trained at (sets N_train for attention scaling
            and the base grid of position interpolation).
        patch_size (`int`): patch side length.
        in_channels (`int`): latent channels.
        out_channels (`int`): output channels; 2 x in_channels when the variance is learned.
        hidden_size (`int`): token width D.
        num_layers (`int`): number of transformer blocks.
        num_attention_heads (`int`): attention heads per block.
        mlp_ratio (`float`): MLP hidden width as a multiple of D.
        num_classes (`int`): number of classes; index `num_classes` is the null class.
        position_encoding (`str`): "sincos" (stock DiT), "none" (LEDiT) or "rope2d" (DiT-RoPE, the paper's
            baseline: no table; every block rotates q and k by axial 2D RoPE, FiT's VisionRoPE, positions.py).
        position_mode (`str`): how the sin/cos table meets a new grid by default: "extrapolate" (DiT's code, a larger
            grid) or "interpolate" (diffusers' PatchEmbed, the new grid squeezed into the trained range).
        rope_theta (`float`): base of the 2D RoPE frequencies (rope2d only).
        attention_layout (`List[str]`): one entry per block, "self" or "causal"; None means all "self".
        causal_scan (`str`): visibility rule of causal blocks (query at grid (r, c), key at (r', c')):
            "one_dimension" (raster order), "mask_lower_right" (r' <= r and c' <= c), "unmask_neighborhood"
            (raster order or the 3x3 neighbourhood), "mask_lower_right_corner" (the paper's (d), first reading:
            hidden when r' > r and c' > c) or "row_or_column_major" ((d), second reading: visible when the key
            precedes or is the query in row-major or in column-major order, i.e. hidden when r' >= r and c' >= c
            except the query itself).
        attention_scaling (`str`): "log" multiplies logits by sqrt(ln N / ln N_train); "none" leaves them.
        locality (`str`): "none", "full" (D->D conv) or "depthwise".
        locality_kernel_size (`int`): conv kernel size (odd).
        locality_dilation_prob (`float`): probability of a dilated conv at a training step.
        locality_dilation_rates (`List[int]`): dilations drawn from (uniformly) when dilating.
        locality_post_norm (`bool`): LayerNorm after the conv residual (the paper's from-scratch refinement).
        timestep_freq_shift (`int`): 0 reproduces DiT's timestep features, 1 diffusers' (divides by half-1).
        norm_eps (`float`): eps of the pre-attention LayerNorm.
        mlp_norm_eps (`float`): eps of the pre-MLP LayerNorm (1e-6 in DiT, 1e-5 in diffusers).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _repeated_blocks = ["DiTBlock"]  # model.compile_repeated_blocks() compiles these (regional compilation)
    # kept in the compute dtype under enable_layerwise_casting, as diffusers' DiT keeps its patchify, embedders,
    # adaLN and norms: conditioning and modulation are precision-critical
    _skip_layerwise_casting_patterns = ["x_embedder", "t_embedder", "y_embedder", "adaLN_modulation", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int = 8,
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        position_encoding: str = "none",
        position_mode: str = "extrapolate",
        attention_layout: Optional[List[str]] = None,
        causal_scan: str = "mask_lower_right_corner",
        attention_scaling: str = "log",
        locality: str = "full",
        locality_kernel_size: int = 3,
        locality_dilation_prob: float = 0.1,
        locality_dilation_rates: List[int] = (2,),
        locality_post_norm: bool = False,
        timestep_freq_shift: int = 0,
        norm_eps: float = 1e-6,
        mlp_norm_eps: float = 1e-6,
        rope_theta: float = ROPE_BASE,
    ):
        super().__init__()
        layout = list(attention_layout) if attention_layout is not None else ["self"] * num_layers
        problems = _config_problems(
            hidden_size=hidden_size, num_attention_heads=num_attention_heads, num_layers=num_layers,
            layout=layout, causal_scan=causal_scan, position_encoding=position_encoding,
            position_mode=position_mode, attention_scaling=attention_scaling, locality=locality,
            locality_kernel_size=locality_kernel_size, dilation_prob=locality_dilation_prob,
            dilation_rates=list(locality_dilation_rates), timestep_freq_shift=timestep_freq_shift,
        )
        if position_encoding == "rope2d" and (hidden_size // num_attention_heads) % 4:
            problems.append(f"head size {hidden_size // num_attention_heads} must be divisible by 4 for 2D RoPE")
        if problems:
            raise ValueError("invalid LEDiT config: " + "; ".join(problems))
        self.gradient_checkpointing = False
        self.attention_backend = "auto"
        self._position_cache: Dict[Any, torch.Tensor] = {}

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.locality_conv = None
        if locality != "none":
            self.locality_conv = LocalityConv(hidden_size, locality_kernel_size, locality == "depthwise",
                                         locality_dilation_prob, list(locality_dilation_rates), locality_post_norm)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_attention_heads, mlp_ratio, kind == "causal", norm_eps, mlp_norm_eps)
            for kind in layout
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    @staticmethod
    def write_remote_code(folder) -> None:
        """This model's code and its auto_map entry in a saved folder."""
        add_remote_code(folder)

    def initialize_weights(self):
        """DiT's init for a model trained from scratch; conversion overwrites all but the locality conv."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data  # patchify initialised like a linear layer
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        if self.locality_conv is not None:  # zero conv: a converted model starts as the DiT minus PE plus causality
            nn.init.zeros_(self.locality_conv.conv.weight)
            nn.init.zeros_(self.locality_conv.conv.bias)

    def position_table(self, height: int, width: int, mode: str, device, dtype,
                       t: Optional[float] = None) -> torch.Tensor:
        """The sin/cos table (1, N, D) for an h x w token grid under a scaling `mode` (SINCOS_SCALINGS; `t` the
        diffusion time of DyPE's), cached per grid, mode, device and dtype unless it follows t (computed in the
        graph under torch.compile)."""
        def build():
            base = self.config.sample_size // self.config.patch_size
            table = sincos_position_table(self.config.hidden_size, height, width, base, base, mode, t)
            return table.to(dtype=torch.float32).to(device=device, dtype=dtype)[None]
        return build() if t is not None else self.cached_position_table((height, width, mode, str(device), dtype),
                                                                         build)

    def rope_tables(self, height: int, width: int, method: str, device, t: Optional[float] = None) -> torch.Tensor:
        """2D RoPE's cos and sin, float32 (1, 2, 1, N, head_dim), for an h x w grid under a scaling (ROPE_SCALINGS;
        `t` the diffusion time of DyPE's), cached like `position_table`."""
        def build():
            base = self.config.sample_size // self.config.patch_size
            cos, sin = rope_table(self.config.hidden_size // self.config.num_attention_heads, (height, width),
                                  (base, base), method, self.config.rope_theta, t)
            return torch.stack([cos, sin]).to(dtype=torch.float32, device=device)[None, :, None]
        return build() if t is not None else self.cached_position_table(("rope", height, width, method, str(device)),
                                                                         build)

    def _positions(self, grid, method: Optional[str], timestep, device, dtype):
        """This call's sin/cos table (B or 1, N, D) or 2D RoPE (cos, sin), each None when the model has no such
        positions."""
        encoding = self.config.position_encoding
        if encoding == "sincos":
            return self.batch_positions(method, timestep,
                                        lambda t: self.position_table(grid[0], grid[1], method, device, dtype, t)), None
        if encoding == "rope2d":
            tables = self.batch_positions(method, timestep, lambda t: self.rope_tables(grid[0], grid[1], method,
                                                                                         device, t))
            cos, sin = tables.unbind(1)  # (B or 1, 1, N, head_dim) each
            compiling = torch.compiler.is_compiling()  # compiled code turns with the real tables (`rotate_qk`)
            return None, (cos, sin, None if compiling else rope_turn(cos, sin))
        return None, None

    def _call_inputs(self, grid, device, dtype, method, timestep, to_self, dilation=None):
        """Cached lookups and this call's random draw: the position table and the 2D RoPE (each or None), the
        causal blocks' concrete attention backend and mask, and the locality conv's dilation (drawn unless the caller
        fixed it)."""
        table, rope = self._positions(grid, method, timestep, device, dtype)
        backend, mask, dilation = self._causal_inputs(grid, device, to_self, any(b.causal for b in self.blocks),
                                                      dilation)
        return table, rope, backend, mask, dilation

    def scaling_for_call(self, opts: Dict[str, Any]) -> Optional[str]:
        """The position scaling of a call (`call_scaling`; a sin/cos model also reads the older "position_mode",
        and defaults to its config's position_mode); an error for one that does not apply to its positions."""
        sincos = self.config.position_encoding == "sincos"
        return self.call_scaling(opts, self.config.position_mode if sincos else "none",
                                 opts.get("position_mode") if sincos else None)

    def unpatchify(self, x, height: int, width: int):
        """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image, from an explicit token grid."""
        return unpatchify(x, height, width, self.config.patch_size, self.config.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ):
        """
        Predict noise (and variance values) for latents `hidden_states` (B, C, H, W).

        `attention_kwargs` may hold "scaling" ("log"/"none", overrides the config), "causal_to_self"
        (True runs causal blocks as self-attention), "position_scaling" (how positions meet a grid other than the
        training one: SINCOS_SCALINGS for a sin/cos model, ROPE_SCALINGS for a 2D RoPE one; "position_mode" is its
        older name for a sin/cos model) and "locality_dilation" (an int: the conv's dilation for this call instead of
        the training-time draw, for a caller that draws it itself, such as a captured CUDA graph per dilation)."""
        # 1. Input: patchify, positions, locality
        opts = attention_kwargs or {}
        p = self.config.patch_size
        if hidden_states.shape[-2] % p or hidden_states.shape[-1] % p:
            raise ValueError(f"latent size {tuple(hidden_states.shape[-2:])} is not divisible by patch size {p}")
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        to_self = bool(opts.get("causal_to_self", False))
        method = self.scaling_for_call(opts)
        x = self.x_embedder(hidden_states)  # (B, N, D)
        b = x.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=x.device)
        timestep = timestep.to(x.device).reshape(-1).expand(b) if timestep.numel() == 1 else timestep.to(x.device)
        table, rope, backend, mask, dilation = self._call_inputs(grid, x.device, x.dtype, method, timestep, to_self,
                                                                  opts.get("locality_dilation"))
        if table is not None:
            x = x + table
        if self.locality_conv is not None:
            x = self.locality_conv(x, grid, dilation)

        # 2. Conditioning
        class_labels = torch.as_tensor(class_labels, device=x.device).reshape(-1).expand(b)
        c = self.t_embedder(timestep, x.dtype) + self.y_embedder(class_labels)  # (B, D)

        # 3. Blocks: causal ones get the cached mask, self-attention ones plain SDPA; 2D RoPE turns q and k in all
        factor = self.logit_factor(grid[0] * grid[1], opts.get("scaling", self.config.attention_scaling))
        for block in self.blocks:
            scan, block_mask = (self.config.causal_scan, mask) if block.causal and not to_self else (None, None)
            args = (x, c, scan, factor, backend, block_mask, rope)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, *args)
            else:
                x = block(*args)

        # 4. Output
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        out = self.unpatchify(x, grid[0], grid[1])
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def image_path_config(dim: int, num_attention_heads: int, num_layers: int, attention_layout, causal_scan: str,
                      position_encoding: str, attention_scaling: str, locality: str, locality_kernel_size: int,
                      locality_dilation_prob: float, locality_dilation_rates) -> Tuple[List[str], List[str]]:
    """A text-to-image family's attention layout (None: every block "self") and the problems of its LEDiT settings,
    which all act on the image path (positions interpolated as diffusers does, no timestep shift)."""
    layout = list(attention_layout) if attention_layout is not None else ["self"] * num_layers
    problems = _config_problems(
        hidden_size=dim, num_attention_heads=num_attention_heads, num_layers=num_layers, layout=layout,
        causal_scan=causal_scan, position_encoding=position_encoding, position_mode="interpolate",
        attention_scaling=attention_scaling, locality=locality, locality_kernel_size=locality_kernel_size,
        dilation_prob=locality_dilation_prob, dilation_rates=list(locality_dilation_rates), timestep_freq_shift=0)
    return layout, problems


def _config_problems(*, hidden_size, num_attention_heads, num_layers, layout, causal_scan, position_encoding,
                     position_mode, attention_scaling, locality, locality_kernel_size, dilation_prob,
                     dilation_rates, timestep_freq_shift) -> List[str]:
    """Every problem with a config at once, each naming the bad value."""
    problems = []
    if hidden_size % num_attention_heads:
        problems.append(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
    if position_encoding == "sincos" and hidden_size % 4:
        problems.append(f"hidden_size {hidden_size} must be divisible by 4 for a 2D sin/cos table")
    if len(layout) != num_layers:
        problems.append(f"attention_layout has {len(layout)} entries for {num_layers} layers")
    bad = sorted({k for k in layout if k not in ATTENTION_KINDS})
    if bad:
        problems.append(f"attention_layout entries {bad} are not in {ATTENTION_KINDS}")
    for name, value, allowed in (("causal_scan", causal_scan, CAUSAL_SCANS),
                                 ("position_encoding", position_encoding, POSITION_ENCODINGS),
                                 ("position_mode", position_mode, POSITION_MODES),
                                 ("attention_scaling", attention_scaling, ATTENTION_SCALINGS),
                                 ("locality", locality, LOCALITY_KINDS)):
        if value not in allowed:
            problems.append(f"{name} {value!r} is not one of {allowed}")
    if locality_kernel_size < 1 or locality_kernel_size % 2 == 0:
        problems.append(f"locality_kernel_size {locality_kernel_size} must be odd and positive")
    if not 0.0 <= dilation_prob <= 1.0:
        problems.append(f"locality_dilation_prob {dilation_prob} is not in [0, 1]")
    if any((not isinstance(r, int)) or r < 1 for r in dilation_rates):
        problems.append(f"locality_dilation_rates {dilation_rates} must be positive integers")
    if timestep_freq_shift not in (0, 1):
        problems.append(f"timestep_freq_shift {timestep_freq_shift} must be 0 or 1")
    return problems
