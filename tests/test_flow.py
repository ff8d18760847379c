"""SD3's rectified-flow loss against an independent float64 re-derivation: the shifted schedule, the timestep
densities, the loss weightings and the order of the generator's draws."""
import math
import re

import numpy as np
import pytest
import torch

from ledit_convert.training import flow
from ledit_convert.training.flow import FlowSchedule, flow_loss

N = 1000
SHIFT = 3.0
SCHEMES = ("logit_normal", "mode", "uniform")


def reference_sigmas(shift=SHIFT, n=N):
    """float64 (n,) sigmas: the unshifted s = (n, n - 1, ..., 1) / n, shifted to shift s / (1 + (shift - 1) s)."""
    s = np.linspace(1, n, n, dtype=np.float64)[::-1] / n
    return shift * s / (1 + (shift - 1) * s)


def replay_u(g, scheme, batch, mean=0.0, std=1.0, scale=1.29):
    """The density's u in float64 from the generator's next draw of `batch` values (SD3 paper, section 3.1)."""
    if scheme == "logit_normal":
        z = mean + std * torch.randn(batch, generator=g).double().numpy()
        return 1.0 / (1.0 + np.exp(-z))
    r = torch.rand(batch, generator=g).double().numpy()
    if scheme == "mode":
        return 1.0 - r - scale * (np.cos(math.pi * r / 2) ** 2 - 1.0 + r)
    return r


def reference_indices(u, n=N):
    return np.clip(np.floor(u * n).astype(np.int64), 0, n - 1)


def reference_weight(sigma, loss_weighting):
    if loss_weighting == "sigma_sqrt":
        return sigma ** -2.0
    if loss_weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
    return np.ones_like(sigma)


def toy_model(x_t, t):
    """A linear velocity model that also reads the timestep (t / N is sigma)."""
    return 0.7 * x_t - 0.2 + 0.3 * (t / N).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("shift,n", [(3.0, 1000), (1.0, 1000), (2.5, 50)])
def test_tables_match_the_shifted_schedule(shift, n):
    sched = FlowSchedule(shift=shift, num_train_timesteps=n)
    ref = reference_sigmas(shift, n)
    assert sched.sigmas.dtype == torch.float32 and sched.timesteps.dtype == torch.float32
    assert sched.sigmas.shape == (n,) and sched.timesteps.shape == (n,)
    assert np.abs(sched.sigmas.double().numpy() - ref).max() <= 1e-6
    assert np.abs(sched.timesteps.double().numpy() / n - ref).max() <= 1e-6
    assert ref[0] == 1.0 and abs(ref[-1] - shift / n / (1 + (shift - 1) / n)) < 1e-15


def test_fixed_u_maps_to_floor_u_times_n(monkeypatch):
    u = torch.tensor([0.0, 0.0004, 0.001, 0.25, 0.5, 0.7513, 0.999, 0.9999999, 1.0])
    seen = {}

    def fake_density(**kwargs):
        seen.update(kwargs)
        return u.to(kwargs["device"])

    monkeypatch.setattr(flow, "compute_density_for_timestep_sampling", fake_density)
    sched = FlowSchedule(weighting_scheme="mode", logit_mean=0.1, logit_std=0.9, mode_scale=1.1)
    g = torch.Generator().manual_seed(0)
    t, sigma = sched.sample(len(u), "cpu", g)
    assert seen == dict(weighting_scheme="mode", batch_size=len(u), logit_mean=0.1, logit_std=0.9, mode_scale=1.1,
                        device=torch.device("cpu"), generator=g)
    idx = reference_indices(u.double().numpy())
    assert idx.tolist() == [0, 0, 1, 250, 500, 751, 999, 999, 999]  # u = 1 is clamped to the last entry
    ref = reference_sigmas()[idx]
    assert t.shape == sigma.shape == (len(u),) and t.dtype == sigma.dtype == torch.float32
    assert np.abs(sigma.double().numpy() - ref).max() <= 1e-6
    assert np.abs(t.double().numpy() / N - ref).max() <= 1e-6


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded_draws_are_the_sd3_densities(scheme):
    kw = dict(logit_mean=0.3, logit_std=1.4, mode_scale=1.29)
    sched = FlowSchedule(weighting_scheme=scheme, **kw)
    t, sigma = sched.sample(512, "cpu", torch.Generator().manual_seed(7))
    u = replay_u(torch.Generator().manual_seed(7), scheme, 512, kw["logit_mean"], kw["logit_std"], kw["mode_scale"])
    ref = reference_sigmas()[reference_indices(u)]
    assert np.abs(sigma.double().numpy() - ref).max() <= 1e-6
    assert np.abs(t.double().numpy() / N - ref).max() <= 1e-6
    assert len(np.unique(ref)) > 100  # the draws really vary


def test_noisy_and_weighting_formulas():
    sched = FlowSchedule(loss_weighting="cosmap")
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.0, 0.3, 1.0])
    ref = (1 - s.double().view(-1, 1, 1, 1)) * x0.double() + s.double().view(-1, 1, 1, 1) * noise.double()
    assert torch.allclose(sched.noisy(x0, noise, s).double(), ref, atol=1e-6)
    s = torch.tensor([0.01, 0.3, 0.9])
    for lw in ("none", "sigma_sqrt", "cosmap"):
        got = FlowSchedule(loss_weighting=lw).weighting(s).double().numpy()
        assert np.allclose(got, reference_weight(s.double().numpy(), lw), rtol=1e-6)


@pytest.mark.parametrize("loss_weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_flow_loss_matches_float64_reference(scheme, loss_weighting):
    b, shape = 6, (6, 3, 5, 5)
    sched = FlowSchedule(weighting_scheme=scheme, loss_weighting=loss_weighting)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    out = flow_loss(toy_model, sched, x0, torch.Generator().manual_seed(5), per_sample=True)
    scalar = flow_loss(toy_model, sched, x0, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    u = replay_u(g, scheme, b)
    noise = torch.randn(shape, generator=g).double().numpy()
    sigma = reference_sigmas()[reference_indices(u)]
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0.double().numpy()
    x_t = (1 - s) * x + s * noise
    pred = 0.7 * x_t - 0.2 + 0.3 * s
    per = (reference_weight(sigma, loss_weighting).reshape(-1, 1, 1, 1) * (pred - (noise - x)) ** 2)
    per = per.reshape(b, -1).mean(axis=1)

    assert out["loss"].shape == (b,) and scalar.shape == ()
    assert np.allclose(out["sigma"].double().numpy(), sigma, atol=1e-6)
    assert np.allclose(out["t"].double().numpy() / N, sigma, atol=1e-6)
    assert np.allclose(out["loss"].double().numpy(), per, rtol=1e-5, atol=0)
    assert math.isclose(scalar.item(), per.mean(), rel_tol=1e-5)


def test_draws_are_deterministic_and_timesteps_come_before_noise():
    b, shape = 4, (4, 2, 3, 3)
    sched = FlowSchedule()
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    a = flow_loss(toy_model, sched, x0, torch.Generator().manual_seed(9))
    assert torch.equal(a, flow_loss(toy_model, sched, x0, torch.Generator().manual_seed(9)))
    assert not torch.equal(a, flow_loss(toy_model, sched, x0, torch.Generator().manual_seed(10)))

    seen = {}

    def record(x_t, t):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(9)
    out = flow_loss(record, sched, torch.zeros(shape), g, per_sample=True)
    s = out["sigma"].view(-1, 1, 1, 1)

    replay = torch.Generator().manual_seed(9)
    replay_u(replay, "logit_normal", b)
    noise_after = torch.randn(shape, generator=replay)
    noise_first = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(seen["x_t"], s * noise_after, atol=1e-6)  # x0 = 0: x_t = sigma * noise
    assert not torch.allclose(seen["x_t"], s * noise_first, atol=1e-3)
    assert torch.equal(g.get_state(), replay.get_state())  # no other draws


@pytest.mark.parametrize("kwargs,value", [
    (dict(weighting_scheme="sigma_sqrt"), "sigma_sqrt"),
    (dict(weighting_scheme="logit-normal"), "logit-normal"),
    (dict(loss_weighting="mode"), "mode"),
    (dict(loss_weighting="sigma"), "sigma"),
    (dict(shift=0.0), "0.0"),
    (dict(shift=-2.0), "-2.0"),
    (dict(num_train_timesteps=0), "0"),
    (dict(num_train_timesteps=10.5), "10.5"),
    (dict(logit_std=0.0), "0.0"),
    (dict(logit_mean=float("nan")), "nan"),
    (dict(mode_scale=2.0), "2.0"),
    (dict(mode_scale=-1.5), "-1.5"),
])
def test_bad_values_raise(kwargs, value):
    with pytest.raises(ValueError, match=re.escape(value)) as err:
        FlowSchedule(**kwargs)
    name = next(iter(kwargs))
    assert name in str(err.value)
    accepted = {"weighting_scheme": SCHEMES, "loss_weighting": ("none", "sigma_sqrt", "cosmap")}.get(name, ())
    assert all(a in str(err.value) for a in accepted)


def test_prediction_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match="does not match"):
        flow_loss(lambda x_t, t: x_t[:, :1], FlowSchedule(), torch.zeros(2, 4, 3, 3), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("loss_weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_perfect_predictor_has_zero_loss(scheme, loss_weighting):
    b, shape = 5, (5, 4, 3, 3)
    sched = FlowSchedule(weighting_scheme=scheme, loss_weighting=loss_weighting)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(21)

    def oracle(x_t, t):
        replay_u(replay, scheme, b)
        return torch.randn(shape, generator=replay) - x0

    out = flow_loss(oracle, sched, x0, torch.Generator().manual_seed(21), per_sample=True)
    assert torch.equal(out["loss"], torch.zeros(b))
    # the same oracle one draw out of step is far from perfect
    replay = torch.Generator().manual_seed(22)
    assert flow_loss(oracle, sched, x0, torch.Generator().manual_seed(21)).item() > 0.1


def test_loss_backpropagates_into_the_model():
    weight = torch.nn.Parameter(torch.tensor(0.5))
    loss = flow_loss(lambda x_t, t: weight * x_t, FlowSchedule(loss_weighting="sigma_sqrt"),
                     torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)),
                     torch.Generator().manual_seed(1))
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad) and weight.grad != 0
