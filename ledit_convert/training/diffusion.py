# DiT's training objective: the IDDPM "hybrid" loss with a learned-range variance.
#
# Facts taken from facebookresearch/DiT `diffusion/gaussian_diffusion.py` (itself IDDPM / ADM code);
# the code below is our own. What DiT's `create_diffusion(timestep_respacing="")` trains with:
#   - betas: linear 1e-4 .. 0.02 over 1000 steps, tables computed in float64;
#   - t ~ uniform{0..999}; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
#   - the model predicts eps (first C channels) and v (last C), log-variance
#     frac * log(beta_t) + (1 - frac) * log(beta_tilde_t clipped), frac = (v + 1) / 2 (LEARNED_RANGE);
#   - loss type MSE (not RESCALED_MSE): loss = mean_flat((eps - eps_hat)^2) + vb, where vb is
#     KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits, mean over non-batch dims, with the model
#     mean built from the DETACHED eps so that vb trains only the variance; at t = 0 vb is the
#     discretized-Gaussian decoder NLL (in bits) instead. x0 is never clipped (clip_denoised=False).
#   - IDDPM's RESCALED_MSE multiplies vb by num_timesteps / 1000; DiT uses plain MSE, which does
#     not. With DiT's 1000 steps the factor is 1 either way, so the two agree here; we apply none.
#   - the decoder NLL uses IDDPM's tanh approximation of the normal CDF and bins of width 2/255,
#     both written for uint8 pixels in [-1, 1]. DiT applies it to scaled VAE latents unchanged, and
#     so do we: the t = 0 term is 1/1000 of the draws and only shapes the variance channels there.
import math
from typing import Dict, Optional

import numpy as np
import torch

_LOG2 = math.log(2.0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Element-wise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that IDDPM (and so DiT) uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Element-wise log-probability (nats) of x under a Gaussian discretised to 256 bins on [-1, 1]."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins take all the mass beyond -1 and +1
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionSchedule:
    """Gaussian diffusion tables (float64 masters) with q_sample, DiT's training loss and t sampling."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        # IDDPM's named "linear" schedule scales the endpoints so any T covers the same range as 1000
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1]; got {betas.min()} .. {betas.max()}")
        self.num_timesteps = num_timesteps
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self._tables: Dict[str, np.ndarray] = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": posterior_variance,
            # beta_tilde_0 is 0; its log is replaced by beta_tilde_1's (as in IDDPM)
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        self._cache: Dict[tuple, torch.Tensor] = {}

    def table(self, name: str, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """One schedule table as a (T,) tensor, cast from the float64 master once per device and dtype."""
        key = (name, torch.device(device if device is not None else "cpu"), dtype)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._tables[name]).to(device=key[1], dtype=dtype)
        return self._cache[key]

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ..., 1) to broadcast against `like`; an on-device gather, no host sync."""
        # never below float32: bf16 tables would round abar_t visibly
        values = self.table(name, like.device, torch.promote_types(like.dtype, torch.float32))[t]
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, num_timesteps), shape (batch,)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) with the given standard-normal noise."""
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of the true posterior q(x_{t-1} | x_t, x0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 implied by a noise prediction."""
        return self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """LEARNED_RANGE log-variance: v = -1 gives beta_tilde_t (clipped), v = +1 gives beta_t."""
        frac = (v + 1) / 2
        return frac * self._at("log_betas", t, v) + (1 - frac) * self._at("posterior_log_variance_clipped", t, v)

    def vb_terms_bpd(self, eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits: KL(q || p_theta) for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        model_mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)  # no clipping in training
        model_log_var = self.model_log_variance(v, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LOG2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / _LOG2
        # both are computed for every sample; torch.where keeps the batch on device with no branching
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor, learn_sigma: bool = True) -> Dict[str, torch.Tensor]:
        """DiT's loss per sample: {"loss", "mse", "vb"}, each (B,); vb is zeros when not learn_sigma."""
        channels = x0.shape[1]
        expected = 2 * channels if learn_sigma else channels
        if model_output.shape[1] != expected or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(f"model output {tuple(model_output.shape)} does not fit x0 {tuple(x0.shape)} "
                             f"with learn_sigma={learn_sigma} (expected {expected} channels)")
        # the loss is computed in at least float32 even when the model ran under bf16/fp16 autocast
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        out, x0, x_t, noise = (a.to(dtype) for a in (model_output, x0, x_t, noise))
        eps = out[:, :channels]
        mse = mean_flat((noise - eps) ** 2)
        if learn_sigma:
            # the VLB trains only the variance channels: the mean is built from a detached eps
            vb = self.vb_terms_bpd(eps.detach(), out[:, channels:], x0, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
