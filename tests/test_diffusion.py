"""DiT's hybrid loss against an independent float64 re-derivation from the DDPM/IDDPM formulas."""
import math

import pytest
import torch

from ledit_convert.training.diffusion import DiffusionSchedule

T = 1000


def reference_tables():
    """Plain-Python float64 schedule: betas, alphas, alpha-bars, posterior variances (beta_tilde)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    alphas = [1.0 - b for b in betas]
    abar, prod = [], 1.0
    for a in alphas:
        prod *= a
        abar.append(prod)
    abar_prev = [1.0] + abar[:-1]
    beta_tilde = [(1 - abar_prev[i]) / (1 - abar[i]) * betas[i] for i in range(T)]
    return betas, alphas, abar, abar_prev, beta_tilde


BETAS, ALPHAS, ABAR, ABAR_PREV, BETA_TILDE = reference_tables()


def tanh_cdf(x):
    # IDDPM's approximation (what DiT trains with), written out independently of the module
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def erf_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def reference_vb(eps, v, x0, x_t, t, cdf=tanh_cdf):
    """VLB term of one sample in bits, element by element in Python floats (DDPM eq. 7 and 11)."""
    b, a, ab, abp = BETAS[t], ALPHAS[t], ABAR[t], ABAR_PREV[t]
    log_bt = math.log(BETA_TILDE[1] if t == 0 else BETA_TILDE[t])  # beta_tilde_0 = 0 is clipped
    total = 0.0
    flat = list(zip(eps.flatten().tolist(), v.flatten().tolist(), x0.flatten().tolist(), x_t.flatten().tolist()))
    for e, vv, x, xt in flat:
        # DDPM eq. 11: the model mean written from eps directly (not through an x0 prediction)
        mu_model = (xt - b / math.sqrt(1 - ab) * e) / math.sqrt(a)
        frac = (vv + 1) / 2
        log_var = frac * math.log(b) + (1 - frac) * log_bt
        if t == 0:
            sd = math.exp(0.5 * log_var)
            hi, lo = cdf((x - mu_model + 1 / 255) / sd), cdf((x - mu_model - 1 / 255) / sd)
            if x < -0.999:
                p = hi
            elif x > 0.999:
                p = 1 - lo
            else:
                p = hi - lo
            total += -math.log(max(p, 1e-12))
        else:
            # DDPM eq. 7: posterior mean; KL of two 1-D Gaussians
            mu_true = math.sqrt(abp) * b / (1 - ab) * x + math.sqrt(a) * (1 - abp) / (1 - ab) * xt
            var_true, var_model = math.exp(log_bt), math.exp(log_var)
            total += 0.5 * math.log(var_model / var_true) + (var_true + (mu_true - mu_model) ** 2) / (2 * var_model) - 0.5
    return total / len(flat) / math.log(2)


def make_batch(dtype=torch.float64, ts=(0, 1, 10, 500, 998, 999), seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C = len(ts), 4
    x0 = (torch.rand(B, C, 3, 3, generator=g, dtype=dtype) * 2.2 - 1.1)
    x0[:, 0, 0, 0] = 1.0   # exercise the two edge bins of the decoder likelihood
    x0[:, 0, 0, 1] = -1.0
    noise = torch.randn(B, C, 3, 3, generator=g, dtype=dtype)
    eps = noise + 0.3 * torch.randn(B, C, 3, 3, generator=g, dtype=dtype)
    v = torch.rand(B, C, 3, 3, generator=g, dtype=dtype) * 2.4 - 1.2
    t = torch.tensor(ts)
    return x0, noise, eps, v, t


def test_schedule_tables_match_float64():
    sched = DiffusionSchedule()
    for name, ref in [("betas", BETAS), ("alphas_cumprod", ABAR), ("alphas_cumprod_prev", ABAR_PREV),
                      ("posterior_variance", BETA_TILDE)]:
        table = sched.table(name)
        assert table.dtype == torch.float64 and table.shape == (T,)
        torch.testing.assert_close(table, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
        # the float32 table is the float64 master rounded once, not recomputed in float32
        assert torch.equal(sched.table(name, dtype=torch.float32), torch.tensor(ref, dtype=torch.float64).float())
    assert sched.table("betas")[0].item() == pytest.approx(1e-4) and sched.table("betas")[-1].item() == pytest.approx(0.02)
    clipped = sched.table("posterior_log_variance_clipped")
    assert clipped[0].item() == pytest.approx(math.log(BETA_TILDE[1]), rel=1e-12)
    assert clipped[5].item() == pytest.approx(math.log(BETA_TILDE[5]), rel=1e-12)
    assert ABAR[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # the well-known DDPM endpoint


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_vb_term_matches_reference(dtype, rtol):
    sched = DiffusionSchedule()
    x0, noise, eps, v, t = make_batch(dtype)
    x_t = sched.q_sample(x0, t, noise)
    out = sched.training_losses(torch.cat([eps, v], 1), x0, x_t, t, noise, learn_sigma=True)
    assert out["vb"].dtype == dtype and out["vb"].shape == (len(t),)
    for i, ti in enumerate(t.tolist()):
        ref = reference_vb(eps[i].double(), v[i].double(), x0[i].double(), x_t[i].double(), ti)
        assert out["vb"][i].item() == pytest.approx(ref, rel=rtol), f"t={ti}"
        ref_mse = ((noise[i].double() - eps[i].double()) ** 2).mean().item()
        assert out["mse"][i].item() == pytest.approx(ref_mse, rel=rtol)
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    assert (out["vb"] > 0).all()


def test_decoder_nll_uses_tanh_cdf_close_to_erf():
    sched = DiffusionSchedule()
    x0, noise, eps, v, t = make_batch(ts=(0, 0))
    x_t = sched.q_sample(x0, t, noise)
    vb = sched.training_losses(torch.cat([eps, v], 1), x0, x_t, t, noise)["vb"]
    exact = reference_vb(eps[0], v[0], x0[0], x_t[0], 0, cdf=erf_cdf)
    # the approximation is what DiT uses; it stays within a few hundredths of a bit of the erf CDF
    assert vb[0].item() == pytest.approx(reference_vb(eps[0], v[0], x0[0], x_t[0], 0), rel=1e-9)
    assert abs(vb[0].item() - exact) < 0.05


def test_perfect_model_has_zero_kl():
    sched = DiffusionSchedule()
    x0, noise, _, _, t = make_batch(ts=(1, 250, 999))
    x_t = sched.q_sample(x0, t, noise)
    v = -torch.ones_like(x0)  # v = -1 selects the posterior variance beta_tilde_t
    out = sched.training_losses(torch.cat([noise, v], 1), x0, x_t, t, noise)
    torch.testing.assert_close(out["vb"], torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(out["mse"], torch.zeros(3, dtype=torch.float64))


def test_vb_gradient_skips_eps_half():
    sched = DiffusionSchedule()
    x0, noise, eps, v, t = (a.float() if a.is_floating_point() else a for a in make_batch())
    x_t = sched.q_sample(x0, t, noise)
    output = torch.cat([eps, v], 1).requires_grad_(True)
    out = sched.training_losses(output, x0, x_t, t, noise)
    (grad_vb,) = torch.autograd.grad(out["vb"].sum(), output, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :4]) == 0  # the mean is detached
    assert (grad_vb[:, 4:].abs() > 0).float().mean() > 0.9
    (grad_mse,) = torch.autograd.grad(out["mse"].sum(), output)
    assert torch.count_nonzero(grad_mse[:, 4:]) == 0
    torch.testing.assert_close(grad_mse[:, :4], 2 * (eps - noise) / eps[0].numel())


def test_mse_only_mode():
    sched = DiffusionSchedule()
    x0, noise, eps, _, t = make_batch(torch.float32)
    x_t = sched.q_sample(x0, t, noise)
    out = sched.training_losses(eps, x0, x_t, t, noise, learn_sigma=False)
    torch.testing.assert_close(out["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(out["loss"], out["mse"]) and torch.count_nonzero(out["vb"]) == 0
    with pytest.raises(ValueError, match="expected 4 channels"):
        sched.training_losses(torch.cat([eps, eps], 1), x0, x_t, t, noise, learn_sigma=False)
    with pytest.raises(ValueError, match="expected 8 channels"):
        sched.training_losses(eps, x0, x_t, t, noise, learn_sigma=True)


def test_bf16_output_gives_float32_loss():
    sched = DiffusionSchedule()
    x0, noise, eps, v, t = (a.float() if a.is_floating_point() else a for a in make_batch())
    x_t = sched.q_sample(x0, t, noise)
    out = sched.training_losses(torch.cat([eps, v], 1).bfloat16(), x0, x_t, t, noise)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]).all()


def test_q_sample_statistics():
    sched = DiffusionSchedule()
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    for ti in (0, 500, 999):
        t = torch.full((n,), ti)
        x_t = sched.q_sample(x0, t, torch.randn_like(x0))
        assert x_t.mean().item() == pytest.approx(math.sqrt(ABAR[ti]) * 0.7, abs=5 * math.sqrt((1 - ABAR[ti]) / n) + 1e-12)
        assert x_t.var().item() == pytest.approx(1 - ABAR[ti], rel=0.02)


def test_sample_timesteps_uniform_and_seeded():
    sched = DiffusionSchedule()
    t1 = sched.sample_timesteps(100_000, generator=torch.Generator().manual_seed(3))
    t2 = sched.sample_timesteps(100_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.int64
    assert t1.min() == 0 and t1.max() == T - 1
    counts = torch.bincount(t1 // 100, minlength=10).double()
    assert ((counts - 10_000).abs() < 500).all()  # ~5 sigma
