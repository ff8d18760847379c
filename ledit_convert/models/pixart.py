# PixArt-alpha/Sigma as an LEDiT (arXiv 2503.04344): the text-to-image transformer of diffusers'
# `PixArtTransformer2DModel`, with the same modules and state-dict keys, plus LEDiT's changes: no positional
# encoding, causal image self-attention in some blocks, a locality conv after patchify, attention scaling.
#
# Surgery copies this file beside the weights as modeling_ledit_pixart.py, and dit.py and attention.py (with
# positions.py, which they import) under their modeling_ledit names, with the imports below rewritten, so that
# `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` loads a converted model where ledit_convert
# is not installed. Import nothing else from this package.
#
# References:
#   PixArt-alpha: https://arxiv.org/abs/2310.00426 (adaLN-single, cross-attention to T5 tokens, micro-conditions)
#   PixArt-Sigma: https://arxiv.org/abs/2403.04692
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle

from .attention import ImageSelfAttnProcessor, LEDiTAttentionMixin, ledit_attention_kwargs
from .dit import LEDiTModelMixin, LocalityConv, add_remote_code, image_path_config, unpatchify
from .positions import sincos_table

REMOTE_CODE_FILE = "modeling_ledit_pixart.py"  # this file, as it is copied beside saved weights
TEXT_MASK_BIAS = -10000.0  # what diffusers' PixArt adds to the logits of masked text tokens


def default_interpolation_scale(sample_size: int) -> float:
    """The sin/cos table's interpolation scale a PixArt config leaves unset gets (diffusers' rule)."""
    return max(sample_size // 64, 1)


class PixArtBlock(BasicTransformerBlock):
    """diffusers' PixArt block (adaLN-single, self-attention, cross-attention to text, MLP) with its weights
    unchanged; `causal` selects the scan-masked image self-attention."""

    def __init__(self, *args, causal: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal = causal
        self.set_default_processors()

    def set_default_processors(self) -> None:
        """Ours on the image self-attention (scan mask, scaling), diffusers' SDPA one on the cross-attention."""
        self.attn1.set_processor(ImageSelfAttnProcessor())
        self.attn2.set_processor(AttnProcessor2_0())

    def forward(self, x, time_mod, text, text_bias, causal_scan, logit_factor: float, backend: str, mask):
        b = x.shape[0]
        mods = self.scale_shift_table[None] + time_mod.reshape(b, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # each (B, 1, D)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = self.attn1(h, **ledit_attention_kwargs([self.attn1], causal_scan=causal_scan, logit_factor=logit_factor,
                                                   backend=backend, scan_mask=mask))
        x = gate_msa * h + x
        x = self.attn2(x, encoder_hidden_states=text, attention_mask=text_bias) + x  # PixArt: no norm before it
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return gate_mlp * self.ff(h) + x


class LEDiTPixArtTransformer2DModel(LEDiTModelMixin, LEDiTAttentionMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    PixArt-alpha/Sigma in PixArt mode (sin/cos positions, self-attention: diffusers' `PixArtTransformer2DModel`
    exactly, with its state-dict keys) or LEDiT mode (no positional encoding, causal blocks, locality conv). Any
    latent height and width divisible by the patch size is accepted.

    Parameters:
        num_attention_heads, attention_head_dim, in_channels, out_channels, num_layers, dropout, norm_num_groups,
        cross_attention_dim, attention_bias, sample_size, patch_size, activation_fn, num_embeds_ada_norm,
        upcast_attention, norm_type, norm_elementwise_affine, norm_eps, interpolation_scale,
        use_additional_conditions, caption_channels, attention_type: as in diffusers' `PixArtTransformer2DModel`
            (so alpha and Sigma configs load unchanged). `sample_size` also sets N_train for attention scaling;
            `interpolation_scale` (default max(sample_size // 64, 1)) and the base grid sample_size // patch_size
            place the sin/cos table on a new grid as diffusers does; `use_additional_conditions` None means "on
            when sample_size is 128" (alpha 1024's resolution and aspect-ratio micro-conditions).
        position_encoding (`str`): "sincos" (stock PixArt) or "none" (LEDiT).
        attention_layout (`List[str]`): one entry per block, "self" or "causal"; None means all "self". Only the
            image self-attention (attn1) of a causal block is masked; cross-attention to text is unchanged.
        causal_scan (`str`): visibility rule of causal blocks, as in `LEDiTTransformer2DModel`.
        attention_scaling (`str`): "log" multiplies image self-attention logits by sqrt(ln N / ln N_train).
        locality, locality_kernel_size, locality_dilation_prob, locality_dilation_rates, locality_post_norm: the
            locality conv after patchify, as in `LEDiTTransformer2DModel`.

    The defaults reproduce stock PixArt, so a diffusers PixArt config builds the stock model; surgery writes the
    LEDiT settings explicitly.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PixArtBlock", "PatchEmbed"]
    _repeated_blocks = ["PixArtBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "adaln_single"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: Optional[int] = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: Optional[int] = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: Optional[float] = None,
        use_additional_conditions: Optional[bool] = None,
        caption_channels: Optional[int] = None,
        attention_type: Optional[str] = "default",
        position_encoding: str = "sincos",
        attention_layout: Optional[List[str]] = None,
        causal_scan: str = "mask_lower_right_corner",
        attention_scaling: str = "none",
        locality: str = "none",
        locality_kernel_size: int = 3,
        locality_dilation_prob: float = 0.1,
        locality_dilation_rates: List[int] = (2,),
        locality_post_norm: bool = False,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        layout, problems = image_path_config(dim, num_attention_heads, num_layers, attention_layout, causal_scan,
                                             position_encoding, attention_scaling, locality, locality_kernel_size,
                                             locality_dilation_prob, locality_dilation_rates)
        if norm_type != "ada_norm_single":
            problems.append(f"norm_type {norm_type!r} is not PixArt's 'ada_norm_single'")
        if num_embeds_ada_norm is None:
            problems.append("num_embeds_ada_norm must be set for adaLN-single")
        if problems:
            raise ValueError("invalid LEDiT PixArt config: " + "; ".join(problems))
        self.gradient_checkpointing = False
        self.attention_backend = "auto"
        self._position_cache: Dict[Any, torch.Tensor] = {}
        self.out_channels = in_channels if out_channels is None else out_channels
        self.use_additional_conditions = (sample_size == 128 if use_additional_conditions is None
                                          else use_additional_conditions)
        self.interpolation_scale = (interpolation_scale if interpolation_scale is not None
                                    else default_interpolation_scale(sample_size))

        # 1. Patchify; the module keeps diffusers' name `pos_embed` (its keys), the table is added in forward
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=dim, pos_embed_type=None)
        self.locality_conv = None
        if locality != "none":
            self.locality_conv = LocalityConv(dim, locality_kernel_size, locality == "depthwise",
                                              locality_dilation_prob, list(locality_dilation_rates), locality_post_norm)
        # 2. Blocks
        self.transformer_blocks = nn.ModuleList([
            PixArtBlock(dim, num_attention_heads, attention_head_dim, dropout=dropout,
                        cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                        num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=attention_bias,
                        upcast_attention=upcast_attention, norm_type=norm_type,
                        norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                        attention_type=attention_type, causal=kind == "causal")
            for kind in layout
        ])
        # 3. Output head, timestep (and micro-condition) embedding, caption projection
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(dim, use_additional_conditions=self.use_additional_conditions)
        self.caption_projection = None
        if caption_channels is not None:
            self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=dim)
        if self.locality_conv is not None:  # zero conv: a converted model starts as PixArt minus PE plus causality
            nn.init.zeros_(self.locality_conv.conv.weight)
            nn.init.zeros_(self.locality_conv.conv.bias)

    @staticmethod
    def write_remote_code(folder) -> None:
        """This model's code (and dit.py, which it imports) and its auto_map entry in a saved folder."""
        add_remote_code(folder, "LEDiTPixArtTransformer2DModel", __file__, REMOTE_CODE_FILE)

    def position_table(self, height: int, width: int, device, method: str = "interpolate",
                       t: Optional[float] = None) -> torch.Tensor:
        """PixArt's sin/cos table for an h x w grid (float32, (1, N, D)) under a scaling (SINCOS_SCALINGS; `t` the
        diffusion time of DyPE's): "interpolate" is diffusers' own table, the stock model's; the others place the
        same positions (divided by the interpolation scale) as positions.py says. Cached per grid, method and device
        unless it follows t."""
        def build():
            base = self.config.sample_size // self.config.patch_size
            if method == "interpolate":
                table = get_2d_sincos_pos_embed(self.pos_embed.proj.out_channels, (height, width), base_size=base,
                                                interpolation_scale=self.interpolation_scale, output_type="pt")
            else:
                table = sincos_table(self.pos_embed.proj.out_channels, (height, width), (base, base), method,
                                     1.0 / self.interpolation_scale, t)
            return table.float()[None].to(device)
        return build() if t is not None else self.cached_position_table((height, width, method, str(device)), build)

    def _call_inputs(self, grid, device, to_self: bool, dilation=None, method: str = "interpolate", timestep=None):
        """Cached lookups and this call's random draw: the position table (or None), the causal blocks' concrete
        attention backend and mask, and the locality conv's dilation."""
        table = None
        if self.config.position_encoding == "sincos":
            table = self.batch_positions(method, timestep,
                                         lambda t: self.position_table(grid[0], grid[1], device, method, t))
        backend, mask, dilation = self._causal_inputs(grid, device, to_self,
                                                      any(b.causal for b in self.transformer_blocks), dilation)
        return table, backend, mask, dilation

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        timestep: Optional[torch.Tensor] = None,
        added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ):
        """
        Predict noise (and variance values) for latents `hidden_states` (B, C, H, W) given text tokens
        `encoder_hidden_states` (B, T, caption_channels) and `timestep`; the arguments are diffusers' PixArt ones.

        `encoder_attention_mask` is (B, T) with 1 = keep (or an additive bias (B, 1, T)); `added_cond_kwargs` holds
        "resolution" (B, 2) and "aspect_ratio" (B, 1) when micro-conditions are on. `attention_kwargs` may hold
        "scaling" ("log"/"none", overrides the config), "causal_to_self" (True runs causal blocks as
        self-attention), "position_scaling" (a stock PixArt's table on another grid: "interpolate", diffusers' and
        the default, "extrapolate", "ntk" or "dype-interpolate") and "locality_dilation" (an int: the conv's
        dilation for this call instead of the training-time draw)."""
        # 1. Input: checks, text mask as a bias, patchify, positions, locality
        if attention_mask is not None:
            raise ValueError("attention_mask over image tokens is not supported; mask text with "
                             "encoder_attention_mask")
        if cross_attention_kwargs:
            raise ValueError(f"cross_attention_kwargs {sorted(cross_attention_kwargs)} are not supported; LEDiT "
                             "options go in attention_kwargs")
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("added_cond_kwargs (resolution, aspect_ratio) are required: micro-conditions are on")
        opts = attention_kwargs or {}
        p = self.config.patch_size
        if hidden_states.shape[-2] % p or hidden_states.shape[-1] % p:
            raise ValueError(f"latent size {tuple(hidden_states.shape[-2:])} is not divisible by patch size {p}")
        text_bias = encoder_attention_mask
        if text_bias is not None and text_bias.ndim == 2:  # (B, T) keep-mask -> (B, 1, T) additive bias
            text_bias = ((1 - text_bias.to(hidden_states.dtype)) * TEXT_MASK_BIAS)[:, None]
        b = hidden_states.shape[0]
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        to_self = bool(opts.get("causal_to_self", False))
        method = self.call_scaling(opts, "interpolate")
        x = self.pos_embed(hidden_states).contiguous()  # (B, N, D); every block then sees one stride layout
        table, backend, mask, dilation = self._call_inputs(grid, x.device, to_self, opts.get("locality_dilation"),
                                                           method, timestep)
        if table is not None:
            x = (x + table).to(x.dtype)
        if self.locality_conv is not None:
            x = self.locality_conv(x, grid, dilation)

        # 2. Conditioning: adaLN-single (timestep, micro-conditions) and the projected text tokens
        time_mod, time_emb = self.adaln_single(timestep, added_cond_kwargs, batch_size=b, hidden_dtype=x.dtype)
        text = encoder_hidden_states
        if self.caption_projection is not None:
            text = self.caption_projection(text).view(b, -1, x.shape[-1])  # (B, T, D)

        # 3. Blocks: causal ones get the cached scan mask on attn1, the others plain SDPA
        factor = self.logit_factor(grid[0] * grid[1], opts.get("scaling", self.config.attention_scaling))
        for block in self.transformer_blocks:
            scan, block_mask = (self.config.causal_scan, mask) if block.causal and not to_self else (None, None)
            args = (x, time_mod, text, text_bias, scan, factor, backend, block_mask)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, *args)
            else:
                x = block(*args)

        # 4. Output: adaLN-modulated norm, linear map to patches, unpatchify
        shift, scale = (self.scale_shift_table[None] + time_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, N, p*p*C)
        out = unpatchify(x, grid[0], grid[1], p, self.out_channels)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
