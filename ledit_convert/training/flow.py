"""Stable Diffusion 3's training objective, rectified flow, for fine-tuning an MMDiT: the peer of
`trainstep.diffusion_loss` for flow models. The timestep density, the loss weightings and the sigma/timestep tables
are diffusers' own (`compute_density_for_timestep_sampling`, `compute_loss_weighting_for_sd3`,
`FlowMatchEulerDiscreteScheduler`), combined the way diffusers' `examples/dreambooth/train_dreambooth_sd3.py` does:

    u       = compute_density_for_timestep_sampling(weighting_scheme, B, logit_mean, logit_std, mode_scale)
    indices = (u * num_train_timesteps).long()
    t       = scheduler.timesteps[indices]          # what the transformer gets as `timestep`, sigma * N
    sigma   = scheduler.sigmas[indices]             # the script looks t up again in scheduler.timesteps; the
                                                    # table is strictly decreasing, so that is the same index
    x_t     = (1 - sigma) * x0 + sigma * noise
    loss    = mean_B( mean_flat( weighting(sigma) * (model(x_t, t) - (noise - x0)) ** 2 ) )

The script's single `--weighting_scheme` is split in two here: "logit_normal" and "mode" are densities with no
loss weighting, "sigma_sqrt" and "cosmap" are loss weightings with uniform timesteps, so the script's choices are
(logit_normal, none), (mode, none), (uniform, sigma_sqrt) and (uniform, cosmap). The target is the velocity
noise - x0, the script's `--precondition_outputs 0` branch (its default 1 regresses the EDM-preconditioned output
x_t - sigma * pred onto x0, which is this loss weighted by sigma ** 2). Two deliberate differences: the draws come
from one generator in the order timesteps, then noise (as in `diffusion_loss`; the script draws the noise first),
and indices are clamped to [0, N - 1], since u = 1 (the "mode" density at rand = 0, or a saturated sigmoid) would
index one past the table."""
import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .diffusion import mean_flat

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) is a monotone map of [0, 1] onto itself only for s in this range
# (SD3 paper, section 3.1); outside it u leaves [0, 1] and the indices would wrap around the table
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


class FlowSchedule:
    """SD3's rectified-flow schedule: the shifted sigma and timestep tables of diffusers'
    `FlowMatchEulerDiscreteScheduler`, the timestep density and the loss weighting."""

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 loss_weighting: str = "none"):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}; "
                             f"got {weighting_scheme!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}; got {loss_weighting!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer; got {num_train_timesteps!r}")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0; got {shift!r}")
        if not math.isfinite(logit_mean):
            raise ValueError(f"logit_mean must be finite; got {logit_mean!r}")
        if not (math.isfinite(logit_std) and logit_std > 0):
            raise ValueError(f"logit_std must be a finite number > 0; got {logit_std!r}")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= mode_scale <= hi:
            raise ValueError(f"mode_scale must lie in [{lo}, {hi:.4f}] for the mode density to map [0, 1] onto "
                             f"itself; got {mode_scale!r}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self.weighting_scheme = weighting_scheme
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.mode_scale = float(mode_scale)
        self.loss_weighting = loss_weighting
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        # both (N,) and decreasing, index 0 at sigma 1 (pure noise); timesteps = sigmas * N
        self.timesteps = scheduler.timesteps.to(dtype=torch.float32, device="cpu")
        self.sigmas = scheduler.sigmas.to(dtype=torch.float32, device="cpu")
        self._cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    def _table(self, name: str, device) -> torch.Tensor:
        """The timestep or sigma table on `device`, copied there once."""
        key = (name, torch.device(device if device is not None else "cpu"))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(key[1])
        return self._cache[key]

    def sample(self, batch: int, device=None,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw (timesteps, sigmas), each (batch,) float32: u from diffusers' SD3 density (one draw of `batch`
        values from `generator`), mapped to table indices floor(u * N). The timesteps are what the transformer
        takes as `timestep` (sigma * N); the sigmas are what `noisy` and `weighting` take."""
        device = torch.device(device if device is not None else "cpu")
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme, batch_size=batch, logit_mean=self.logit_mean,
            logit_std=self.logit_std, mode_scale=self.mode_scale, device=device, generator=generator)
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self._table("timesteps", device)[indices], self._table("sigmas", device)[indices]

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise, the straight path from data (sigma 0) to noise (sigma 1), with the
        (B,) sigmas broadcast over the other dims; computed in at least float32."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        s = sigmas.to(dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0.to(dtype) + s * noise.to(dtype)

    def weighting(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The per-sample loss weight at `sigmas` (same shape) from diffusers' `compute_loss_weighting_for_sd3`:
        ones ("none"), sigma ** -2 ("sigma_sqrt") or 2 / (pi (1 - 2 sigma + 2 sigma ** 2)) ("cosmap")."""
        return compute_loss_weighting_for_sd3(weighting_scheme=self.loss_weighting, sigmas=sigmas)


def flow_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: FlowSchedule,
              x0: torch.Tensor, generator: Optional[torch.Generator],
              per_sample: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """SD3's rectified-flow loss on a batch of clean latents (scalar, mean over the batch); every draw comes
    from `generator`, in order: timesteps, then noise.

    `model_fn(x_t, timesteps)` returns the velocity prediction, shaped like `x0`; it is a callable so that the
    caller supplies the conditioning (and any caption dropout). The target is noise - x0, the per-sample loss
    mean_flat(weighting(sigma) * (pred - target) ** 2) in at least float32. With `per_sample`, {"loss": (B,),
    "t": timesteps, "sigma": sigmas} instead of the mean."""
    t, sigmas = schedule.sample(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device,
                        dtype=torch.promote_types(x0.dtype, torch.float32))
    x_t = schedule.noisy(x0, noise, sigmas)
    pred = model_fn(x_t, t)
    if pred.shape != x0.shape:
        raise ValueError(f"model prediction {tuple(pred.shape)} does not match x0 {tuple(x0.shape)}")
    dtype = torch.promote_types(pred.dtype, x_t.dtype)
    target = noise.to(dtype) - x0.to(dtype)
    weight = schedule.weighting(sigmas).to(dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    loss = mean_flat(weight * (pred.to(dtype) - target) ** 2)
    return {"loss": loss, "t": t, "sigma": sigmas} if per_sample else loss.mean()
