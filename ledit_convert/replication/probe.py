"""Where position lives in the residual stream, and how large the tokens are.

A linear probe (the LEDiT paper's Table 5 uses one) asks how much of each token's row and column index a
linear map can recover from the tokens after a block: R^2 near 1 for a DiT, whose sin/cos table carries
position in, and near 0 where nothing carries it. `token_norms` measures what removing the table does to the
scale of the block-0 input, and `norm_matching_factor` + `rescale_patch_embedding` are a surgery-time option
(not the paper's recipe) that scales the patch embedding back to the DiT's input norm.
"""
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..training.diffusion import DiffusionSchedule
from ..models.dit import LEDiTTransformer2DModel

State = Tuple[Dict, Dict[str, torch.Tensor]]  # (config, state_dict), as in surgery.py
Layer = Union[int, str]
INPUT = -1  # layer index of the tokens entering block 0 (after patchify, table and locality conv)


def _layer_indices(model: LEDiTTransformer2DModel, layers: Optional[Iterable[Layer]]) -> List[int]:
    """Normalise a layer selection: None is every layer and the input, "input" is -1."""
    depth = len(model.blocks)
    if layers is None:
        return [INPUT] + list(range(depth))
    picked = [INPUT if layer == "input" else layer for layer in layers]
    bad = [layer for layer in picked if not (isinstance(layer, int) and INPUT <= layer < depth)]
    if bad:
        raise ValueError(f"layers {bad} are not block indices in -1..{depth - 1} or 'input'")
    return picked


def residual_stream(model: LEDiTTransformer2DModel, x: torch.Tensor, t, labels,
                    layers: Optional[Iterable[Layer]] = None) -> Dict[int, torch.Tensor]:
    """Tokens (B, N, D) after each chosen block (-1 or "input": entering block 0), from one eval, no-grad forward."""
    picked = _layer_indices(model, layers)
    captured: Dict[int, torch.Tensor] = {}
    handles = []

    def keep_input(module, args):
        captured[INPUT] = args[0].detach()

    def keep_output(index):
        def hook(module, args, output):
            captured[index] = output.detach()
        return hook

    was_training = model.training
    try:
        if INPUT in picked:
            handles.append(model.blocks[0].register_forward_pre_hook(keep_input))
        for index in sorted(set(picked) - {INPUT}):
            handles.append(model.blocks[index].register_forward_hook(keep_output(index)))
        model.eval()  # no dilation draw in the locality conv, no dropout of any kind
        with torch.no_grad():
            model(x, t, labels)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {index: captured[index] for index in picked}


def position_probe_r2(features: torch.Tensor, grid: Tuple[int, int], holdout: float = 0.25, ridge: float = 1e-3,
                      seed: int = 0) -> Dict[str, float]:
    """Held-out R^2 of a ridge linear probe from tokens (B, N, D) to their row and column index on an h x w grid.

    Images (not tokens) are split: a seeded `holdout` fraction is scored, the rest fits the probe, so a probe
    cannot memorise one image's content. The fit is closed form in float64 with an intercept and penalty
    `ridge * trace(X^T X) / D` (scale-free). R^2 = 1 - SSE/SST on the held-out tokens; NaN for an axis of
    length 1, where SST is 0.
    """
    b, n, d = features.shape
    height, width = grid
    if n != height * width:
        raise ValueError(f"features hold {n} tokens per image, grid {height}x{width} has {height * width}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout {holdout} is not in (0, 1)")
    n_test = max(1, round(b * holdout))
    if b - n_test < 1:
        raise ValueError(f"{b} image(s) cannot be split into fitting and held-out images (holdout {holdout})")
    order = torch.randperm(b, generator=torch.Generator().manual_seed(seed)).to(features.device)
    feats = features.detach().to(torch.float64)
    train = feats[order[n_test:]].reshape(-1, d)  # ((B - n_test) * N, D)
    test = feats[order[:n_test]].reshape(-1, d)

    idx = torch.arange(n, device=features.device)
    targets = torch.stack([idx // width, idx % width], dim=1).to(torch.float64)  # (N, 2): row, col
    y_train = targets.repeat(b - n_test, 1)
    y_test = targets.repeat(n_test, 1)

    x_mean, y_mean = train.mean(0), y_train.mean(0)
    xc = train - x_mean
    gram = xc.T @ xc  # (D, D)
    penalty = ridge * gram.trace() / d
    if penalty <= 0:  # constant features: the probe can only predict the mean
        penalty = torch.ones((), dtype=torch.float64, device=features.device)
    weights = torch.linalg.solve(gram + penalty * torch.eye(d, dtype=torch.float64, device=features.device),
                                 xc.T @ (y_train - y_mean))  # (D, 2)
    pred = (test - x_mean) @ weights + y_mean
    sse = ((y_test - pred) ** 2).sum(0)
    sst = ((y_test - y_test.mean(0)) ** 2).sum(0)
    r2 = [float(1 - e / s) if s > 0 else math.nan for e, s in zip(sse.tolist(), sst.tolist())]
    return {"row": r2[0], "col": r2[1]}


def probe_model(model: LEDiTTransformer2DModel, x0: torch.Tensor, timesteps: Sequence[int] = (100, 500, 900),
                labels=None, seed: int = 0, layers: Optional[Iterable[Layer]] = None, holdout: float = 0.25,
                batch_size: int = 64) -> List[Dict]:
    """Probe R^2 (row, col) and mean token norm per (t, layer) on clean model inputs x0 (B, C, H, W) noised by
    DiT's schedule; labels default to the null class. One seeded noise draw serves every t."""
    device = next(model.parameters()).device
    x0 = x0.to(device)
    p = model.config.patch_size
    grid = (x0.shape[-2] // p, x0.shape[-1] // p)
    if labels is None:
        labels = model.config.num_classes
    labels = torch.as_tensor(labels, device=device).reshape(-1).expand(x0.shape[0])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device, x0.dtype)
    schedule = DiffusionSchedule()
    picked = _layer_indices(model, layers)
    rows = []
    for t in timesteps:
        t_batch = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
        x_t = schedule.q_sample(x0, t_batch, noise).to(x0.dtype)
        chunks = [residual_stream(model, x_t[i:i + batch_size], t_batch[i:i + batch_size],
                                  labels[i:i + batch_size], picked)
                  for i in range(0, x0.shape[0], batch_size)]
        for layer in picked:
            feats = torch.cat([chunk[layer] for chunk in chunks])  # (B, N, D)
            r2 = position_probe_r2(feats, grid, holdout=holdout, seed=seed)
            rows.append({"t": int(t), "layer": layer, "row": r2["row"], "col": r2["col"],
                         "norm": mean_token_norm(feats)})
    return rows


def mean_token_norm(tokens: torch.Tensor) -> float:
    """Mean over tokens of the L2 norm along the last axis, in float64."""
    return float(tokens.detach().to(torch.float64).norm(dim=-1).mean())


def block_input(model: LEDiTTransformer2DModel, x: torch.Tensor, with_table: bool) -> torch.Tensor:
    """The tokens (B, N, D) entering block 0, with or without the sin/cos table whatever the config says; the
    locality conv (if any) runs at dilation 1, as at inference."""
    p = model.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    with torch.no_grad():
        tokens = model.x_embedder(x)  # (B, N, D)
        if with_table:
            tokens = tokens + model.position_table(grid[0], grid[1], model.config.position_mode, tokens.device,
                                                   tokens.dtype)
        if model.locality_conv is not None:
            tokens = model.locality_conv(tokens, grid, 1)
    return tokens


def token_norms(model: LEDiTTransformer2DModel, x: torch.Tensor) -> Dict[str, float]:
    """Mean per-token L2 norm of the block-0 input for inputs x, with and without the model's sin/cos table."""
    return {"with_table": mean_token_norm(block_input(model, x, True)),
            "without_table": mean_token_norm(block_input(model, x, False))}


def _as_model(base: Union[LEDiTTransformer2DModel, State]) -> LEDiTTransformer2DModel:
    """A model as is, or one built around a (config, state_dict) pair without copying its tensors."""
    if isinstance(base, LEDiTTransformer2DModel):
        return base
    config, sd = base
    with torch.device("meta"):
        model = LEDiTTransformer2DModel(**config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def norm_matching_factor(base: Union[LEDiTTransformer2DModel, State], calibration_inputs: torch.Tensor) -> float:
    """The factor s for `rescale_patch_embedding` that gives a converted LEDiT (no table, zero conv) the stock DiT's
    mean block-0 token norm on `calibration_inputs` (B, C, H, W): norm with the table / norm without it.

    The blocks see noised inputs; DiT's schedule is variance-preserving, so unit-variance latents (SD-VAE latents
    x 0.18215 are close) calibrate every t alike."""
    model = _as_model(base)
    if model.config.position_encoding != "sincos" or model.config.locality != "none":
        raise ValueError("norm_matching_factor takes a stock DiT (sin/cos table, no locality conv); got "
                         f"position_encoding={model.config.position_encoding!r}, locality={model.config.locality!r}")
    inputs = calibration_inputs.to(device=model.x_embedder.proj.weight.device,
                                   dtype=model.x_embedder.proj.weight.dtype)
    norms = token_norms(model, inputs)
    if not norms["without_table"] > 0:
        raise ValueError("the patch embedding is zero on the calibration inputs; no factor matches the norms")
    return norms["with_table"] / norms["without_table"]


def rescale_patch_embedding(state: State, factor: float) -> Tuple[State, str]:
    """Multiply the patch embedding's weight and bias by `factor`, so its output scales by exactly that factor;
    every other tensor is passed through untouched."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"patch-embedding factor {factor} must be finite and positive")
    config, sd = state
    sd = dict(sd)
    for key in ("x_embedder.proj.weight", "x_embedder.proj.bias"):
        sd[key] = sd[key] * factor
    return (config, sd), f"scaled the patch embedding (x_embedder.proj weight and bias) by {factor:.6g}"
