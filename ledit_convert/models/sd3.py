# SD3 / SD3.5 (MMDiT) as an LEDiT (arXiv 2503.04344, the paper's LEMMDiT): the transformer of diffusers'
# `SD3Transformer2DModel`, with the same modules and state-dict keys, plus LEDiT's changes on the image tokens: no
# positional table (and so no size cap), causal image tokens in some blocks, a locality conv after patchify.
#
# Surgery copies this file beside the weights as modeling_ledit_sd3.py, and dit.py and attention.py (with
# positions.py, which they import) under their modeling_ledit names, with the imports below rewritten, so that
# `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` loads a converted model where ledit_convert
# is not installed. Import nothing else from this package.
#
# References:
#   SD3 (MMDiT, rectified flow): https://arxiv.org/abs/2403.03206
#   SD3.5 adds an image-only self-attention (attn2) to its first blocks and RMS-normalised q and k.
import functools
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import apply_lora_scale

from .attention import (ImageSelfAttnProcessor, LEDiTAttentionMixin, attention_mask, cached, causal_visibility,
                        ledit_attention_kwargs, project_qkv)
from .dit import LEDiTModelMixin, LocalityConv, add_remote_code, image_path_config, unpatchify
from .positions import sincos_table

REMOTE_CODE_FILE = "modeling_ledit_sd3.py"  # this file, as it is copied beside saved weights
TEXT_VIEWS = ("all", "text")  # what a text token sees in a causal block: every token, or the text tokens only
LEDIT_OPTIONS = ("scaling", "causal_to_self", "locality_dilation", "position_scaling")  # joint_attention_kwargs read


@functools.lru_cache(maxsize=64)
def joint_visibility(scan: str, height: int, width: int, text_tokens: int, text_view: str, device: str):
    """Boolean [(N + T), (N + T)] visibility over [image; text] tokens in a causal block: image queries see the
    image keys their scan allows and every text key; text queries see every key ("all") or the text keys only
    ("text")."""
    n = height * width
    allowed = torch.ones(n + text_tokens, n + text_tokens, dtype=torch.bool, device=torch.device(device))
    allowed[:n, :n] = causal_visibility(scan, height, width, device=torch.device(device))
    if text_view == "text":
        allowed[n:, :n] = False
    return allowed


class JointAttnProcessor:
    """attn of an SD3 block: attention over [image; text] tokens (diffusers' JointAttnProcessor2_0's math) with an
    optional joint visibility mask (causal blocks) and logits scaled by `logit_factor`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, joint_mask=None,
                 scan_mask=None, causal_scan=None, logit_factor: float = 1.0, backend: str = "sdpa"):
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("joint attention takes text tokens and no attention_mask")
        n = hidden_states.shape[1]
        image_qkv = project_qkv(attn, hidden_states)
        text_qkv = project_qkv(attn, encoder_hidden_states, added=True)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(image_qkv, text_qkv))  # (B, heads, N + T, head_dim)
        scale = attn.scale * logit_factor
        if backend == "math":  # the textbook formula, for tests
            logits = (q @ k.transpose(-2, -1)) * scale
            if joint_mask is not None:
                logits = logits.masked_fill(~joint_mask, float("-inf"))
            out = logits.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_mask, scale=scale)
        b = out.shape[0]
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        image, text = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class SD3Block(JointTransformerBlock):
    """diffusers' joint block (its weights and forward unchanged) with our processors; `causal` marks the blocks
    whose image tokens are scan-masked."""

    def __init__(self, *args, causal: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal = causal
        self.set_default_processors()

    def set_default_processors(self) -> None:
        """Ours on the joint attention and on SD3.5's image attention (masked with the same scan)."""
        self.attn.set_processor(JointAttnProcessor())
        if self.attn2 is not None:
            self.attn2.set_processor(ImageSelfAttnProcessor())

    def attentions(self) -> List[nn.Module]:
        """The block's attention layers that take LEDiT's arguments."""
        return [self.attn] if self.attn2 is None else [self.attn, self.attn2]


class LEDiTSD3Transformer2DModel(LEDiTModelMixin, LEDiTAttentionMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    SD3 / SD3.5 in stock mode (its stored sin/cos table cropped from `pos_embed_max_size`: diffusers'
    `SD3Transformer2DModel` exactly, with its state-dict keys) or LEDiT mode (no table, so no size cap; causal
    image tokens in some blocks; locality conv). Any latent height and width divisible by the patch size is
    accepted in LEDiT mode.

    Parameters:
        sample_size, patch_size, in_channels, num_layers, attention_head_dim, num_attention_heads,
        joint_attention_dim, caption_projection_dim, pooled_projection_dim, out_channels, pos_embed_max_size,
        dual_attention_layers, qk_norm: as in diffusers' `SD3Transformer2DModel` (SD3 and SD3.5 configs load
            unchanged). `sample_size` also sets N_train for attention scaling.
        position_encoding (`str`): "sincos" (the stored, cropped table of stock SD3) or "none" (LEDiT).
        attention_layout (`List[str]`): one entry per block, "self" or "causal"; None means all "self".
        causal_scan (`str`): visibility rule among image tokens in causal blocks, as in `LEDiTTransformer2DModel`.
        causal_text (`str`): what a text token sees in a causal block: "all" (every token, as in a self block) or
            "text" (the text tokens only). Image tokens always see every text token. SD3.5's image-only attn2 of a
            causal block is masked with the same scan.
        attention_scaling (`str`): "log" multiplies attention logits by sqrt(ln N / ln N_train), N the image
            tokens.
        locality, locality_kernel_size, locality_dilation_prob, locality_dilation_rates, locality_post_norm: the
            locality conv after patchify, as in `LEDiTTransformer2DModel`.
        objective (`str`): what the model was trained to predict: "flow" (rectified flow's noise - x0, SD3's). A
            record for readers of the folder; the forward is the same.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SD3Block"]
    _repeated_blocks = ["SD3Block"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple = (),
        qk_norm: Optional[str] = None,
        position_encoding: str = "sincos",
        attention_layout: Optional[List[str]] = None,
        causal_scan: str = "mask_lower_right_corner",
        causal_text: str = "all",
        attention_scaling: str = "none",
        locality: str = "none",
        locality_kernel_size: int = 3,
        locality_dilation_prob: float = 0.1,
        locality_dilation_rates: List[int] = (2,),
        locality_post_norm: bool = False,
        objective: str = "flow",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        layout, problems = image_path_config(dim, num_attention_heads, num_layers, attention_layout, causal_scan,
                                             position_encoding, attention_scaling, locality, locality_kernel_size,
                                             locality_dilation_prob, locality_dilation_rates)
        if objective != "flow":
            problems.append(f"objective {objective!r}: an SD3 is trained with 'flow'")
        if causal_text not in TEXT_VIEWS:
            problems.append(f"causal_text {causal_text!r} is not one of {TEXT_VIEWS}")
        if any(not 0 <= i < num_layers for i in dual_attention_layers):
            problems.append(f"dual_attention_layers {list(dual_attention_layers)} name blocks outside "
                            f"0..{num_layers - 1}")
        if problems:
            raise ValueError("invalid LEDiT SD3 config: " + "; ".join(problems))
        self.gradient_checkpointing = False
        self.attention_backend = "auto"
        self._position_cache: Dict[Any, torch.Tensor] = {}
        self.out_channels = in_channels if out_channels is None else out_channels

        # 1. Patchify; stock mode keeps diffusers' stored, cropped table (and its size cap), LEDiT mode has none
        table = position_encoding == "sincos"
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=dim,
                                    pos_embed_max_size=pos_embed_max_size if table else None,
                                    pos_embed_type="sincos" if table else None)
        self.locality_conv = None
        if locality != "none":
            self.locality_conv = LocalityConv(dim, locality_kernel_size, locality == "depthwise",
                                              locality_dilation_prob, list(locality_dilation_rates), locality_post_norm)
        # 2. Conditioning: timestep + pooled text, and the joint text tokens
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim,
                                                                  pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        # 3. Blocks (the last one updates no text tokens)
        self.transformer_blocks = nn.ModuleList([
            SD3Block(dim=dim, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
                     context_pre_only=i == num_layers - 1, qk_norm=qk_norm,
                     use_dual_attention=i in dual_attention_layers, causal=kind == "causal")
            for i, kind in enumerate(layout)
        ])
        # 4. Output head
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels, bias=True)
        if self.locality_conv is not None:  # zero conv: a converted model starts as SD3 minus the table
            nn.init.zeros_(self.locality_conv.conv.weight)
            nn.init.zeros_(self.locality_conv.conv.bias)

    @staticmethod
    def write_remote_code(folder) -> None:
        """This model's code (and dit.py, which it imports) and its auto_map entry in a saved folder."""
        add_remote_code(folder, "LEDiTSD3Transformer2DModel", __file__, REMOTE_CODE_FILE)

    def position_table(self, height: int, width: int, device, method: str, t: Optional[float] = None) -> torch.Tensor:
        """A stock SD3's table (float32, (1, N, D)) for an h x w grid under a scaling other than its own centred crop
        ("extrapolate"): recomputed from diffusers' formula for the stored table, within its pos_embed_max_size
        rows and columns (positions.cropped_sincos_axis). Cached per grid, method and device unless it follows t."""
        def build():
            c, cap = self.config, self.config.pos_embed_max_size
            base = c.sample_size // c.patch_size
            table = sincos_table(c.num_attention_heads * c.attention_head_dim, (height, width), (base, base), method,
                                 base / cap / self.pos_embed.interpolation_scale, t, table_grid=(cap, cap))
            return table.float()[None].to(device)
        return build() if t is not None else self.cached_position_table((height, width, method, str(device)), build)

    def embed_patches(self, hidden_states, grid, method: Optional[str], timestep):
        """Patch tokens (B, N, D): diffusers' PatchEmbed (with the stored table's crop in stock mode), or for another
        scaling of a stock model the bare patch projection plus `position_table`."""
        if method in (None, "extrapolate"):
            return self.pos_embed(hidden_states)
        x = self.pos_embed.proj(hidden_states).flatten(2).transpose(1, 2)  # SD3's PatchEmbed has no layer norm
        table = self.batch_positions(method, timestep,
                                     lambda t: self.position_table(grid[0], grid[1], x.device, method, t))
        return (x + table).to(x.dtype)

    def _call_inputs(self, grid, text_tokens: int, device, to_self: bool, dilation=None):
        """Cached masks and this call's random draw: the image-only attention's backend and mask, the joint
        [image; text] mask (None without causal blocks), and the locality conv's dilation."""
        any_causal = any(b.causal for b in self.transformer_blocks) and not to_self
        backend, mask, dilation = self._causal_inputs(grid, device, to_self, any_causal, dilation)
        if backend == "flex":  # the joint mask is dense: attn2 follows it onto SDPA with the dense scan mask
            backend, mask = "sdpa", attention_mask(self.config.causal_scan, grid, device, "sdpa")
        joint = None
        if any_causal:
            joint = cached(joint_visibility, self.config.causal_scan, grid[0], grid[1], text_tokens,
                           self.config.causal_text, str(device))
        return backend, mask, joint, dilation

    @apply_lora_scale("joint_attention_kwargs")  # takes "scale" (the LoRA scale) out of joint_attention_kwargs
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        pooled_projections: Optional[torch.Tensor] = None,
        timestep: Optional[torch.Tensor] = None,
        block_controlnet_hidden_states: Optional[List[torch.Tensor]] = None,
        joint_attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
        skip_layers: Optional[List[int]] = None,
    ):
        """
        Predict the flow (noise - x0 under rectified flow) for latents `hidden_states` (B, C, H, W) given the joint
        text tokens `encoder_hidden_states` (B, T, joint_attention_dim), the pooled text `pooled_projections`
        (B, pooled_projection_dim) and `timestep`; the arguments are diffusers' SD3 ones (`skip_layers` skips
        blocks, as skip-layer guidance does).

        `joint_attention_kwargs` may hold "scaling" ("log"/"none", overrides the config), "causal_to_self" (True
        runs causal blocks as self-attention), "position_scaling" (a stock SD3's table on another grid, within the
        stored table: "extrapolate", its own crop and the default, "interpolate", "ntk" or "dype-interpolate"),
        "locality_dilation" (an int: the conv's dilation for this call instead of the training-time draw) and
        "scale" (the scale of loaded LoRA adapters, as in diffusers)."""
        # 1. Input: checks, patchify (+ table in stock mode), locality
        if block_controlnet_hidden_states is not None:
            raise ValueError("ControlNet residuals are not supported by the LEDiT SD3 transformer")
        opts = dict(joint_attention_kwargs or {})
        unknown = sorted(set(opts) - set(LEDIT_OPTIONS))
        if unknown:
            raise ValueError(f"joint_attention_kwargs {unknown} are not supported; LEDiT options are {LEDIT_OPTIONS}")
        p = self.config.patch_size
        if hidden_states.shape[-2] % p or hidden_states.shape[-1] % p:
            raise ValueError(f"latent size {tuple(hidden_states.shape[-2:])} is not divisible by patch size {p}")
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        to_self = bool(opts.get("causal_to_self", False))
        method = self.call_scaling(opts, "extrapolate")
        x = self.embed_patches(hidden_states, grid, method, timestep).contiguous()  # (B, N, D)
        backend, scan_mask, joint_mask, dilation = self._call_inputs(
            grid, encoder_hidden_states.shape[1], x.device, to_self, opts.get("locality_dilation"))
        if self.locality_conv is not None:
            x = self.locality_conv(x, grid, dilation)

        # 2. Conditioning
        temb = self.time_text_embed(timestep, pooled_projections)
        text = self.context_embedder(encoder_hidden_states)

        # 3. Blocks: causal ones get the cached joint mask (attn) and scan mask (attn2)
        factor = self.logit_factor(grid[0] * grid[1], opts.get("scaling", self.config.attention_scaling))
        for index, block in enumerate(self.transformer_blocks):
            if skip_layers is not None and index in skip_layers:
                continue
            kwargs = dict(logit_factor=factor, backend=backend)
            if block.causal and not to_self:
                kwargs.update(joint_mask=joint_mask, scan_mask=scan_mask, causal_scan=self.config.causal_scan)
            kwargs = ledit_attention_kwargs(block.attentions(), **kwargs)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                text, x = self._gradient_checkpointing_func(block, x, text, temb, kwargs)
            else:
                text, x = block(hidden_states=x, encoder_hidden_states=text, temb=temb, joint_attention_kwargs=kwargs)

        # 4. Output: adaLN-continuous norm, linear map to patches, unpatchify
        x = self.proj_out(self.norm_out(x, temb))
        out = unpatchify(x, grid[0], grid[1], p, self.out_channels)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
