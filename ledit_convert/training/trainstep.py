"""The pieces of one training step that every training loop shares: DiT's loss on a batch (class ids or text),
the EMA and LR schedules. `finetune` (accelerate, any data) and `fastloop` (data on the device, CUDA graphs) both
build their step from these, so the two loops train the same objective with the same schedules."""
import math
from contextlib import nullcontext
from typing import Optional, Union

import torch

from .diffusion import DiffusionSchedule
from .flow import flow_loss
from ..data.text import TextCondition


def diffusion_loss(model, schedule: DiffusionSchedule, x0: torch.Tensor, labels: Union[torch.Tensor, TextCondition],
                   generator: Optional[torch.Generator], class_dropout: float, null_class: int, learn_sigma: bool,
                   autocast=nullcontext, per_sample: bool = False):
    """DiT's loss on a batch of clean inputs (scalar, mean over the batch); every draw comes from `generator`.

    `labels` are class ids (a DiT) or a `TextCondition` (a PixArt). The draws, in order: timesteps, noise,
    condition dropout. Labels dropped go to `null_class`, captions to the empty prompt (CFG). With `per_sample`,
    the per-sample terms {"loss", "mse", "vb"} and the timesteps "t" instead of the mean."""
    b = x0.shape[0]
    t = schedule.sample_timesteps(b, x0.device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    drop = torch.rand(b, generator=generator, device=x0.device) < class_dropout
    x_t = schedule.q_sample(x0, t, noise)
    with autocast():
        if isinstance(labels, TextCondition):
            out = model(x_t, timestep=t, **labels.model_kwargs(drop)).sample
        else:
            out = model(x_t, t, torch.where(drop, torch.full_like(labels, null_class), labels)).sample
    terms = schedule.training_losses(out, x0, x_t, t, noise, learn_sigma)
    return dict(terms, t=t) if per_sample else terms["loss"].mean()


def flow_training_loss(model, schedule, x0: torch.Tensor, cond: TextCondition, generator: Optional[torch.Generator],
                       caption_dropout: float, autocast=nullcontext, per_sample: bool = False):
    """Rectified flow (SD3's objective, `flow.flow_loss`) on a batch of clean latents given text tokens; the draws,
    in order: timesteps, noise, caption dropout (to the empty prompt, CFG), all from `generator`."""
    def predict(x_t, t):
        drop = torch.rand(x_t.shape[0], generator=generator, device=x_t.device) < caption_dropout
        with autocast():
            return model(x_t, timestep=t, **cond.model_kwargs(drop)).sample.float()
    return flow_loss(predict, schedule, x0, generator, per_sample=per_sample)


def ema_decay(step: int, batch: int, decay: float, half_life_images: Optional[float] = None,
              rampup_ratio: Optional[float] = None) -> float:
    """The EMA decay for the update after optimizer step `step` (0-based) at `batch` images per step.

    Without a half-life, `decay` is used as is (DiT: 0.9999 from a copy). With one (EDM), the EMA forgets half of
    its weight every `half_life_images` images: decay = 0.5 ** (batch / half_life); with `rampup_ratio` the
    half-life is capped at rampup_ratio x images seen so far, so early weights (a fresh surgery's, say) are
    forgotten in proportion to the run's length instead of lingering."""
    if half_life_images is None:
        return decay
    half_life = half_life_images
    if rampup_ratio is not None:
        half_life = min(half_life, (step + 1) * batch * rampup_ratio)
    return 0.5 ** (batch / max(half_life, 1e-8))


def ema_weight_tensor(step: torch.Tensor, batch: int, decay: float, half_life_images: Optional[float] = None,
                      rampup_ratio: Optional[float] = None) -> torch.Tensor:
    """1 - `ema_decay`, the weight an EMA update gives the new parameters, computed on the device from a step
    counter tensor (no host sync; safe in a CUDA graph) and without the cancellation of 1 - decay in float32."""
    if half_life_images is None:
        return torch.full_like(step, 1.0 - decay, dtype=torch.float32)
    half_life = torch.full_like(step, half_life_images, dtype=torch.float32)
    if rampup_ratio is not None:
        half_life = torch.minimum(half_life, (step.float() + 1) * (batch * rampup_ratio))
    return -torch.expm1(-math.log(2.0) * batch / half_life.clamp(min=1e-8))


def learning_rate(step: int, base_lr: float, warmup_steps: int = 0) -> float:
    """The LR for optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then constant (DiT)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)
