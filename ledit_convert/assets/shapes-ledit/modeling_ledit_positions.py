# Positions for resolution extrapolation: axial 2D RoPE and the scalings that stretch it or a sin/cos table to a
# grid larger than the training one.
#
# This file is self-contained (torch only): surgery copies it beside the weights with dit.py, which imports it, so
# a saved folder loads where ledit_convert is not installed. Keep it that way.
#
# Everything is computed in float64 on the host; callers cast the tables. A grid axis of `length` tokens, trained
# at `train_length`, has the per-axis ratio s = length / train_length. Sources:
#   VisionRoPE, VisionNTK, VisionYaRN: FiT / FiTv2 (arXiv 2402.12376, 2410.13925), per axis.
#   Position interpolation (PI): Chen et al. 2023 (arXiv 2306.15595).
#   NTK-aware base change: bloc97 2023, as written in YaRN (arXiv 2309.00071, Sec. 3.1).
#   YaRN ramp and attention temperature: Peng et al. 2023 (arXiv 2309.00071, Sec. 3.2-3.4).
#   RIFLEx: Zhao et al. 2025 (arXiv 2502.15894).
#   DyPE: Issachar et al. 2025 (arXiv 2510.20766): the scaling follows the diffusion time.
import math
from typing import Optional, Sequence, Tuple

import torch

# scalings a 2D RoPE model takes; "dype" is DyPE on YaRN, "dype-pi" and "dype-ntk" on PI and NTK
ROPE_SCALINGS = ("none", "pi", "ntk", "yarn", "riflex", "dype", "dype-pi", "dype-ntk")
# scalings a sin/cos table takes; "dype-interpolate" is DyPE on position interpolation
SINCOS_SCALINGS = ("extrapolate", "interpolate", "ntk", "dype-interpolate")
DYNAMIC_SCALINGS = ("dype", "dype-pi", "dype-ntk", "dype-interpolate")
ROPE_BASE = 10000.0  # FiT's VisionRoPE base (theta), as in RoFormer
SINCOS_BASE = 10000.0  # MAE/DiT's table
YARN_ALPHA, YARN_BETA = 1.0, 32.0  # YaRN's ramp ends in rotations per training length (its LLaMA values, FiT's too)
RIFLEX_MARGIN = 0.9  # RIFLEx keeps the new length within 90% of one period of the lowered frequency
DYPE_LAMBDA_S, DYPE_LAMBDA_T = 2.0, 2.0  # DyPE's kappa(t) = lambda_s * t ** lambda_t, its defaults
NUM_TIMESTEPS = 1000  # a model's timestep divided by this is DyPE's t in [0, 1] (1 = pure noise), every family


def axis_ratio(length: int, train_length: int) -> float:
    """s = length / train_length for one grid axis, at least 1: a smaller grid is never rescaled (FiT's clamp)."""
    return max(1.0, length / train_length)


def dype_kappa(t: float, lambda_s: float = DYPE_LAMBDA_S, lambda_t: float = DYPE_LAMBDA_T) -> float:
    """DyPE's exponent kappa(t) = lambda_s * t^lambda_t for diffusion time t in [0, 1]: the scale s becomes s^kappa,
    full (and more) at high noise where layout forms, none at t = 0 where detail forms."""
    t = min(1.0, max(0.0, float(t)))
    return lambda_s * t ** lambda_t


def diffusion_time(timestep) -> float:
    """A model's timestep (DDPM index 0..999, or flow sigma x 1000) as DyPE's t in [0, 1]."""
    return min(1.0, max(0.0, float(timestep) / NUM_TIMESTEPS))


def rope_frequencies(dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """RoPE's dim/2 angular frequencies theta_j = base^(-2j/dim) for `dim` rotated channels (float64)."""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def ntk_base(base: float, ratio: float, dim: int) -> float:
    """The NTK-aware base b * s^(dim/(dim-2)): the lowest frequency is divided by s, the highest kept."""
    return base * ratio ** (dim / (dim - 2))


def yarn_ramp(freqs: torch.Tensor, train_length: int, alpha: float = YARN_ALPHA,
              beta: float = YARN_BETA) -> torch.Tensor:
    """YaRN's gamma per frequency: 0 (interpolate) below alpha rotations over the training length, 1 (keep) above
    beta, linear in between."""
    rotations = train_length * freqs / (2 * math.pi)  # r = L / lambda
    return ((rotations - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_frequencies(freqs: torch.Tensor, ratio: float, train_length: int) -> torch.Tensor:
    """NTK-by-parts: theta' = (1 - gamma) theta / s + gamma theta."""
    if ratio == 1.0:  # the formula's value, without the rounding of its two terms: the plain model, bit for bit
        return freqs.clone()
    gamma = yarn_ramp(freqs, train_length)
    return (1 - gamma) * freqs / ratio + gamma * freqs


def yarn_temperature(ratio: float) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln s + 1, applied to q and to k, so logits are multiplied by its square."""
    return 1.0 if ratio <= 1.0 else 0.1 * math.log(ratio) + 1.0


def riflex_index(freqs: torch.Tensor, train_length: int) -> int:
    """RIFLEx's intrinsic frequency: the one whose period 2 pi / theta is closest to the training length (the
    repetition a model shows when extrapolated; RIFLEx measures it, an image model repeats at its training size)."""
    periods = 2 * math.pi / freqs
    return int((periods - train_length).abs().argmin())


def riflex_frequencies(freqs: torch.Tensor, length: int, train_length: int) -> torch.Tensor:
    """Lower the intrinsic frequency to 0.9 * 2 pi / length, so it completes under one period over the new length;
    a frequency already that low, or an axis that does not grow, is left as it is."""
    out = freqs.clone()
    if length <= train_length:
        return out
    k = riflex_index(freqs, train_length)
    out[k] = min(float(freqs[k]), RIFLEX_MARGIN * 2 * math.pi / length)
    return out


def _require_time(method: str, t: Optional[float]) -> float:
    """t for a DyPE variant, which cannot run without it."""
    if t is None:
        raise ValueError(f"position scaling {method!r} follows the diffusion time; the call has no timestep")
    return t


def scaling_ratio(method: str, ratio: float, t: Optional[float]) -> float:
    """The ratio a method scales by: s, or for DyPE's variants s^kappa(t)."""
    return ratio ** dype_kappa(_require_time(method, t)) if method in DYNAMIC_SCALINGS else ratio


def rope_axis(method: str, dim: int, length: int, train_length: int, base: float = ROPE_BASE,
              t: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Positions (length,), frequencies (dim/2,) and YaRN's q/k factor for one axis of `dim` rotated channels."""
    if method not in ROPE_SCALINGS:
        raise ValueError(f"position scaling {method!r} is not one of {ROPE_SCALINGS} (2D RoPE)")
    positions = torch.arange(length, dtype=torch.float64)
    freqs = rope_frequencies(dim, base)
    ratio = scaling_ratio(method, axis_ratio(length, train_length), t)
    if method in ("pi", "dype-pi"):
        freqs = freqs / ratio
    elif method in ("ntk", "dype-ntk"):
        freqs = rope_frequencies(dim, ntk_base(base, ratio, dim))
    elif method in ("yarn", "dype"):
        freqs = yarn_frequencies(freqs, ratio, train_length)
    elif method == "riflex":
        freqs = riflex_frequencies(freqs, length, train_length)
    return positions, freqs, ratio


def rope_table(head_dim: int, grid: Sequence[int], train_grid: Sequence[int], method: str = "none",
               base: float = ROPE_BASE, t: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (H*W, head_dim), float64, of axial 2D RoPE on an H x W grid (raster order).

    Layout (FiT's VisionRoPE): channels [0, head_dim/2) rotate by the row, [head_dim/2, head_dim) by the column;
    within each half, channels 2j and 2j+1 form a pair turned by position x theta_j. YaRN's temperature (of the
    larger axis ratio, as FiT) is folded into both tables, so rotated q and k each carry it."""
    if head_dim % 4:
        raise ValueError(f"head_dim {head_dim} must be divisible by 4 for 2D RoPE (two axes of channel pairs)")
    (height, width), (train_h, train_w) = grid, train_grid
    rows, row_freqs, row_ratio = rope_axis(method, head_dim // 2, height, train_h, base, t)
    cols, col_freqs, col_ratio = rope_axis(method, head_dim // 2, width, train_w, base, t)
    row_angles = (rows[:, None] * row_freqs[None]).repeat_interleave(2, dim=1)  # (H, head_dim/2)
    col_angles = (cols[:, None] * col_freqs[None]).repeat_interleave(2, dim=1)  # (W, head_dim/2)
    angles = torch.cat([row_angles[:, None].expand(height, width, -1),
                        col_angles[None].expand(height, width, -1)], dim=-1).reshape(height * width, head_dim)
    factor = yarn_temperature(max(row_ratio, col_ratio)) if method in ("yarn", "dype") else 1.0
    return angles.cos() * factor, angles.sin() * factor


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the pairwise quarter turn of RoPE."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, N, head_dim) by tables broadcastable to it; computed in x's dtype."""
    return x * cos + rotate_pairs(x) * sin


def rope_turn(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tables as one complex factor per channel pair (..., head_dim/2): cos + i sin of each pair's angle."""
    return torch.complex(cos[..., 0::2], sin[..., 0::2])


def apply_turn(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """`apply_rope` as one complex multiplication (pairs as complex numbers), in float32 or wider whatever x's
    dtype: a third of the real form's time forward and backward in eager mode."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs every pair to start on an even element
    return torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2).to(x.dtype)


def squeeze(method: str, length: int, train_length: int, t: Optional[float] = None) -> float:
    """How much a sin/cos scaling multiplies position steps: 1 (extrapolate, ntk), L_train / L (interpolate, as
    diffusers' PatchEmbed, unclamped) or (L_train / L)^kappa(t) (DyPE's interpolation)."""
    if method not in SINCOS_SCALINGS:
        raise ValueError(f"position scaling {method!r} is not one of {SINCOS_SCALINGS} (sin/cos table)")
    if method == "interpolate":
        return train_length / length
    if method == "dype-interpolate":
        return (train_length / length) ** dype_kappa(_require_time(method, t))
    return 1.0


def sincos_features(positions: torch.Tensor, dim: int, base: float = SINCOS_BASE) -> torch.Tensor:
    """(len, dim) [sin, cos] features of positions, dim/2 frequencies 1 / base^(i/(dim/2)) (MAE/DiT)."""
    n = dim // 2
    omega = 1.0 / base ** (torch.arange(n, dtype=torch.float64) / n)  # DiT's and diffusers' own expression
    angles = positions[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_base(method: str, dim: int, length: int, train_length: int) -> float:
    """The table's base for one axis of `dim` features: NTK-aware for "ntk" (its lowest frequency divided by s; n
    frequencies count as 2n rotary dims), else 10000."""
    return ntk_base(SINCOS_BASE, axis_ratio(length, train_length), dim) if method == "ntk" else SINCOS_BASE


def sincos_axis(method: str, dim: int, length: int, train_length: int, position_scale: float = 1.0,
                t: Optional[float] = None) -> torch.Tensor:
    """(length, dim) features of one axis of a sin/cos table whose positions start at 0 (DiT, PixArt)."""
    step = squeeze(method, length, train_length, t)
    positions = torch.arange(length, dtype=torch.float64) * position_scale * step
    return sincos_features(positions, dim, sincos_base(method, dim, length, train_length))


def cropped_sincos_axis(method: str, dim: int, length: int, train_length: int, table_length: int,
                        position_scale: float, t: Optional[float] = None) -> torch.Tensor:
    """(length, dim) features of one axis of SD3's stored table: `table_length` positions (index x position_scale)
    of which a grid takes the centred crop. Squeezing scalings shrink the steps about the crop's centre, so they
    stay inside the stored positions."""
    if length > table_length:
        raise ValueError(f"a grid axis of {length} tokens is past the stored table's {table_length}; a stock SD3 "
                         "cannot run there")
    step = squeeze(method, length, train_length, t)
    centre = (table_length - length) // 2 + (length - 1) / 2  # the stock crop's centre, in table rows
    index = centre + (torch.arange(length, dtype=torch.float64) - (length - 1) / 2) * step
    return sincos_features(index * position_scale, dim, sincos_base(method, dim, length, train_length))


def sincos_table(dim: int, grid: Sequence[int], train_grid: Sequence[int], method: str = "extrapolate",
                 position_scale: float = 1.0, t: Optional[float] = None,
                 table_grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """MAE/DiT 2D sin/cos table (H*W, dim), float64: the first half of the channels encodes the column, the second
    the row; positions are multiplied by `position_scale` (PixArt's 1 / interpolation_scale). With `table_grid`
    (SD3's stored table) the grid is a centred crop of it."""
    if dim % 4:
        raise ValueError(f"dim {dim} must be divisible by 4 for a 2D sin/cos table")
    (height, width), (train_h, train_w) = grid, train_grid
    if table_grid is None:
        cols = sincos_axis(method, dim // 2, width, train_w, position_scale, t)
        rows = sincos_axis(method, dim // 2, height, train_h, position_scale, t)
    else:
        cols = cropped_sincos_axis(method, dim // 2, width, train_w, table_grid[1], position_scale, t)
        rows = cropped_sincos_axis(method, dim // 2, height, train_h, table_grid[0], position_scale, t)
    return torch.cat([cols[None].expand(height, width, -1), rows[:, None].expand(height, width, -1)],
                     dim=-1).reshape(height * width, dim)
