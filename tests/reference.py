"""An independent float64 DiT/LEDiT forward written from the math, used as the oracle in tests.

It reads a facebookresearch-format state dict and computes everything with explicit float64 ops:
no torch.nn modules, no SDPA, its own sin/cos table and masks written as loops.
"""
import math

import numpy as np
import torch


def sincos_table_np(dim, height, width, base=None, interpolate=False):
    """MAE's 2D table in numpy float64; meshgrid(w, h) puts the column coordinate in the first half."""
    gh = np.arange(height, dtype=np.float64)
    gw = np.arange(width, dtype=np.float64)
    if interpolate:
        gh = gh / (height / base)
        gw = gw / (width / base)
    grid = np.meshgrid(gw, gh)  # w goes first, as in MAE/DiT

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def visible(scan, height, width):
    """Visibility matrix from the spec's definitions, as explicit loops."""
    n = height * width
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        r, c = divmod(i, width)
        for j in range(n):
            r2, c2 = divmod(j, width)
            if scan == "one_dimension":
                m[i, j] = j <= i
            elif scan == "mask_lower_right":
                m[i, j] = r2 <= r and c2 <= c
            elif scan == "unmask_neighborhood":
                m[i, j] = j <= i or (abs(r2 - r) <= 1 and abs(c2 - c) <= 1)
            elif scan == "mask_lower_right_corner":
                m[i, j] = not (r2 > r and c2 > c)
            elif scan == "row_or_column_major":  # at or before the query in row-major or in column-major order
                m[i, j] = j <= i or c2 * height + r2 <= c * height + r
            else:
                raise ValueError(scan)
    return torch.from_numpy(m)


def _ln(x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1 + torch.exp(-x))


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _conv2d(image, weight, bias, dilation, groups):
    """Zero-padded 'same' convolution by explicit shifts (B, D, H, W)."""
    b, d, h, w = image.shape
    k = weight.shape[-1]
    pad = dilation * (k - 1) // 2
    padded = torch.zeros(b, d, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = image
    out = torch.zeros(b, weight.shape[0], h, w, dtype=image.dtype) + bias[None, :, None, None]
    for a in range(k):
        for c in range(k):
            patch = padded[:, :, a * dilation:a * dilation + h, c * dilation:c * dilation + w]
            if groups == 1:
                out += torch.einsum("oi,bihw->bohw", weight[:, :, a, c], patch)
            else:
                out += weight[:, 0, a, c][None, :, None, None] * patch
    return out


def rotate_complex(x, angles, magnitude):
    """RoPE as complex multiplication: channel pairs (2j, 2j+1) as x_2j + i x_2j+1, times magnitude * e^(i angle_j);
    `angles` is (B or 1, N, head_dim/2), `magnitude` (B or 1,)."""
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    turn = torch.polar(magnitude[:, None, None] * torch.ones_like(angles), angles)[:, None]  # (B, 1, N, hd/2)
    out = z * turn
    return torch.stack([out.real, out.imag], dim=-1).flatten(-2)


def reference_forward(sd, cfg, x, t, y, *, pos="sincos", pos_table=None, layout=None, scan=None,
                      logit_factor=1.0, freq_shift=0, mlp_eps=1e-6, conv=None, dilation=1, rope=None):
    """float64 forward of a DiT/LEDiT from a facebookresearch-format state dict; `rope` = (angles, magnitude) turns
    q and k of every block (a 2D RoPE DiT)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    p, dim, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_attention_heads"]
    b, _, hh, ww = x.shape
    h, w = hh // p, ww // p
    # patchify as a matrix product over flattened patches
    patches = x.reshape(b, -1, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(dim, -1).T + sd["x_embedder.proj.bias"]
    if pos == "sincos":
        tokens = tokens + torch.from_numpy(pos_table if pos_table is not None else sincos_table_np(dim, h, w))
    if conv is not None:
        weight, bias, groups = conv
        image = tokens.transpose(1, 2).reshape(b, dim, h, w)
        tokens = tokens + _conv2d(image, weight.double(), bias.double(), dilation, groups).flatten(2).transpose(1, 2)
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - freq_shift))
    args = t.double().numpy()[:, None] * freqs[None]
    tfeat = torch.from_numpy(np.concatenate([np.cos(args), np.sin(args)], axis=1))
    temb = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", tfeat)))
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    layout = layout or ["self"] * depth
    dh = dim // heads
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = _linear(sd, pre + "adaLN_modulation.1", _silu(c)).chunk(6, dim=1)
        s1, sc1, g1, s2, sc2, g2 = [m[:, None] for m in mod]
        hidden = _ln(tokens, 1e-6) * (1 + sc1) + s1
        qkv = _linear(sd, pre + "attn.qkv", hidden).reshape(b, h * w, 3, heads, dh)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if rope is not None:
            q, k = rotate_complex(q, *rope), rotate_complex(k, *rope)
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh) * logit_factor
        if layout[i] == "causal":
            logits = logits.masked_fill(~visible(scan, h, w), float("-inf"))
        attn = torch.softmax(logits, dim=-1) @ v
        attn = _linear(sd, pre + "attn.proj", attn.transpose(1, 2).reshape(b, h * w, dim))
        tokens = tokens + g1 * attn
        hidden = _ln(tokens, mlp_eps) * (1 + sc2) + s2
        mlp = _linear(sd, pre + "mlp.fc2", _gelu_tanh(_linear(sd, pre + "mlp.fc1", hidden)))
        tokens = tokens + g2 * mlp
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", _silu(c)).chunk(2, dim=1)
    out = _linear(sd, "final_layer.linear", _ln(tokens, 1e-6) * (1 + scale[:, None]) + shift[:, None])
    oc = out.shape[-1] // (p * p)
    out = out.reshape(b, h, w, p, p, oc).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, oc, h * p, w * p)
