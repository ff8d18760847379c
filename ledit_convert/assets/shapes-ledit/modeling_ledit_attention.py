# Attention for the LEDiT models: the causal scans (which keys each image token may see), the masks each backend
# takes (cached per scan, grid and device), one `attend` for every backend, and the processor and mixin that put
# them behind diffusers' `Attention` layers (PixArt, SD3).
#
# It needs torch, diffusers and positions.py only: surgery copies it beside the weights as
# modeling_ledit_attention.py, and each model file that uses it imports it directly (diffusers copies a remote
# module's direct relative imports only).
import functools
import inspect
import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention as DiffusersAttention

from .modeling_ledit_positions import apply_rope, apply_turn

CAUSAL_SCANS = ("one_dimension", "mask_lower_right", "unmask_neighborhood", "mask_lower_right_corner",
                "row_or_column_major")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "math")
# diffusers' attention backend names whose kernels take an arbitrary attention mask, and the backend of ours each
# runs as (SDPA picks its own masked kernel: a pinned efficient or cuDNN kernel is not honoured). diffusers' other
# names (flash, sage, xformers, NPU, XLA kernels) take no mask and are refused.
DIFFUSERS_BACKENDS = {"native": "sdpa", "_native_efficient": "sdpa", "_native_cudnn": "sdpa", "_native_math": "math",
                      "flex": "flex"}
# what our attention processors take besides diffusers' arguments: the causal scan and its cached mask, the logit
# factor of attention scaling and the concrete backend
LEDIT_ATTENTION_ARGS = ("causal_scan", "scan_mask", "logit_factor", "backend")


#################################################################################
#                          Causal scans and their masks                         #
#################################################################################

def _visible(scan: str, q_idx: torch.Tensor, kv_idx: torch.Tensor, width: int) -> torch.Tensor:
    """True where query `q_idx` may attend to key `kv_idx` (raster indices on a grid `width` wide). Elementwise on
    broadcastable tensors, so one definition serves the dense matrix and FlexAttention's mask_mod."""
    qr, qc = q_idx // width, q_idx % width
    kr, kc = kv_idx // width, kv_idx % width
    if scan == "one_dimension":
        return kv_idx <= q_idx
    if scan == "mask_lower_right":
        return (kr <= qr) & (kc <= qc)
    if scan == "unmask_neighborhood":
        return (kv_idx <= q_idx) | (((kr - qr).abs() <= 1) & ((kc - qc).abs() <= 1))
    if scan == "mask_lower_right_corner":  # scan (d), first reading: hide the keys strictly below-right
        return ~((kr > qr) & (kc > qc))
    if scan == "row_or_column_major":  # scan (d), second reading: at or before the query in either raster order
        return ~((kr >= qr) & (kc >= qc)) | (kv_idx == q_idx)
    raise ValueError(f"unknown causal_scan {scan!r}; expected one of {CAUSAL_SCANS}")


def causal_visibility(scan: str, height: int, width: int, device=None) -> torch.Tensor:
    """Boolean [N, N] matrix, True where query i (row) may attend to key j (column); raster order."""
    idx = torch.arange(height * width, device=device)
    return _visible(scan, idx[:, None], idx[None, :], width)


def cached(function, *args):
    """`function(*args)` through its lru_cache in eager code; traced afresh inside torch.compile, where a cache lookup
    is host code that would break the graph (and the traced tensor ops are computed once per compiled call)."""
    return function.__wrapped__(*args) if torch.compiler.is_compiling() else function(*args)


@functools.lru_cache(maxsize=64)
def _cached_dense_mask(scan: str, height: int, width: int, device: str) -> torch.Tensor:
    return causal_visibility(scan, height, width, device=torch.device(device))


def _flex_mask_mod(scan: str, width: int):
    """The visibility rule of `causal_visibility` as a FlexAttention mask_mod; an unknown scan raises when the block
    mask is built."""
    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(scan, q_idx, kv_idx, width)
    return mask_mod


@functools.lru_cache(maxsize=64)
def _cached_block_mask(scan: str, height: int, width: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask
    n = height * width
    return create_block_mask(_flex_mask_mod(scan, width), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def resolve_backend(backend: str, causal_scan: Optional[str], device_type: str) -> str:
    """The concrete backend for a block: "auto" is FlexAttention for 2D scans on CUDA, else SDPA."""
    if backend != "auto":
        return backend
    return "flex" if (device_type == "cuda" and causal_scan not in (None, "one_dimension")) else "sdpa"


def attention_mask(causal_scan: Optional[str], grid: tuple, device, backend: str):
    """What `attend` needs for a causal scan under a concrete backend, cached per (scan, grid, device): a
    FlexAttention BlockMask ("flex"), a boolean matrix ("sdpa" for 2D scans, "math"), or None (is_causal SDPA)."""
    if causal_scan is None or (backend == "sdpa" and causal_scan == "one_dimension"):
        return None
    if backend == "flex":
        return cached(_cached_block_mask, causal_scan, grid[0], grid[1], str(device))
    return cached(_cached_dense_mask, causal_scan, grid[0], grid[1], str(device))


#################################################################################
#                        One attention for every backend                        #
#################################################################################

def rotate_qk(q, k, rope):
    """q and k turned by 2D RoPE, `rope` = (cos, sin, turn): float32 tables broadcastable to them and the same as
    complex factors (`rope_turn`). The rotation runs in float32 or wider whatever the compute dtype, so bf16 keeps
    the angles' precision: one complex multiplication in eager code, the real form inside torch.compile (which
    fuses it, and whose support for complex tensors is partial)."""
    cos, sin, turn = rope
    if torch.compiler.is_compiling():
        work = torch.promote_types(q.dtype, torch.float32)
        return apply_rope(q.to(work), cos, sin).to(q.dtype), apply_rope(k.to(work), cos, sin).to(k.dtype)
    return apply_turn(q, turn), apply_turn(k, turn)


def attend(q, k, v, causal_scan: Optional[str], scale: float, backend: str, mask, rope=None):
    """Multi-head attention over image tokens; q, k, v are (B, heads, N, head_dim).

    `backend` is concrete (`resolve_backend`) and `mask` is `attention_mask(...)` for this scan and backend; the
    model looks both up outside compiled code, so a compiled block never rebuilds a mask. `rope` (cos, sin, turn),
    when given, rotates q and k first (2D RoPE models, `rotate_qk`)."""
    if rope is not None:
        q, k = rotate_qk(q, k, rope)
    if backend == "math":  # the textbook formula, for tests
        logits = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1) @ v
    if causal_scan is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if causal_scan == "one_dimension" and backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if backend == "flex":
        if torch.compiler.is_compiling():  # inside a compiled block: traced into its graph
            from torch.nn.attention.flex_attention import flex_attention
            return flex_attention(q, k, v, block_mask=mask, scale=scale)
        return _compiled_flex_attention()(q, k, v, block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def log_scaling_factor(num_tokens: int, train_tokens: int, scaling: str) -> float:
    """sqrt(ln N / ln N_train) for "log" scaling, else 1 (also 1 at the training token count)."""
    if scaling == "none" or train_tokens <= 1 or num_tokens == train_tokens:
        return 1.0
    return math.sqrt(math.log(num_tokens) / math.log(train_tokens))


#################################################################################
#                       Behind diffusers' Attention layers                      #
#################################################################################

def project_qkv(attn, x, added: bool = False):
    """q, k, v of tokens `x` (B, L, D), each (B, heads, L, head_dim), through a diffusers `Attention`'s image
    projections (with `added`, its text ones), one fused matmul after `fuse_projections`, and its q/k norms."""
    if added:
        fused, projections = "to_added_qkv", (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        norms = (attn.norm_added_q, attn.norm_added_k, None)
    else:
        fused, projections, norms = "to_qkv", (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k, None)
    if attn.fused_projections:
        states = getattr(attn, fused)(x).chunk(3, dim=-1)
    else:
        states = [projection(x) for projection in projections]
    heads = []
    for state, norm in zip(states, norms):
        state = state.view(x.shape[0], -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
        heads.append(norm(state) if norm is not None else state)
    return heads


def takes_ledit_args(processor) -> bool:
    """Whether an attention processor takes LEDiT's scan mask and logit factor (ours do, diffusers' own do not)."""
    parameters = inspect.signature(processor.__call__).parameters
    return all(name in parameters for name in LEDIT_ATTENTION_ARGS)


def ledit_attention_kwargs(attentions, **kwargs) -> Dict[str, Any]:
    """`kwargs` (LEDiT's attention arguments) for a block's diffusers `Attention` layers when their processors take
    them, nothing when they do not and the call needs neither a mask nor scaled logits; an error naming the
    processor when they do not and the call needs them, so a processor set by a user never drops either silently."""
    if all(takes_ledit_args(attn.processor) for attn in attentions):
        return kwargs
    if kwargs.get("causal_scan") is None and kwargs.get("logit_factor", 1.0) == 1.0:
        return {}
    foreign = next(type(attn.processor).__name__ for attn in attentions if not takes_ledit_args(attn.processor))
    raise ValueError(f"attention processor {foreign} cannot take LEDiT's causal mask and attention scaling, which "
                     "this call needs; model.set_default_attn_processor() restores the model's own")


class ImageSelfAttnProcessor:
    """Self-attention over image tokens for a diffusers `Attention` (PixArt's attn1, SD3.5's attn2) through
    `attend`, so causal blocks use the cached scan mask; q/k norms apply when the layer has them; logits are scaled
    by `logit_factor` (LEDiT's attention scaling). `joint_mask` is the SD3 block's [image; text] mask, which the
    block hands to each of its attentions; image self-attention has no use for it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, causal_scan=None,
                 logit_factor: float = 1.0, backend: str = "sdpa", scan_mask=None, joint_mask=None, rope=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("image self-attention takes no encoder states and no attention_mask")
        q, k, v = project_qkv(attn, hidden_states)
        out = attend(q, k, v, causal_scan, attn.scale * logit_factor, backend, scan_mask, rope)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class LEDiTAttentionMixin(AttentionMixin):
    """diffusers' attention-processor API (`attn_processors`, `set_attn_processor`, QKV fusion) for the models built
    on diffusers `Attention` layers (PixArt, SD3). A processor that cannot take LEDiT's mask and scaling is refused
    by the first call that needs them (`ledit_attention_kwargs`); fusion keeps our processors, which read the fused
    weights themselves."""

    def set_default_attn_processor(self) -> None:
        """The model's own processors on every block again."""
        for block in self.transformer_blocks:
            block.set_default_processors()

    def fuse_qkv_projections(self) -> None:
        """One q/k/v matmul (and one for SD3's text q/k/v) in every attention layer running one of our processors;
        other layers (PixArt's cross-attention, a processor set by the user) stay as they are."""
        for module in self.modules():
            if isinstance(module, DiffusersAttention) and takes_ledit_args(module.processor):
                module.fuse_projections(fuse=True)

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections`: the fused weights are dropped, the separate ones were never touched."""
        for module in self.modules():
            if isinstance(module, DiffusersAttention) and module.fused_projections:
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)
                module.fused_projections = False
