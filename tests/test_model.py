"""The model against the float64 reference: DiT mode, each LEDiT part, and the config contract."""
import math

import pytest
import torch

from factories import facebook_state_dict, inputs, random_ledit_conv, rel_err
from ledit_convert.models.attention import CAUSAL_SCANS, causal_visibility
from ledit_convert.models.dit import LEDiTTransformer2DModel
from reference import reference_forward, sincos_table_np, visible

CFG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=64, num_layers=4,
           num_attention_heads=4, num_classes=10)


def make(sd, **overrides):
    cfg = dict(CFG, position_encoding="sincos", locality="none", attention_scaling="none")
    cfg.update(overrides)
    if cfg["position_encoding"] == "none" and "attention_scaling" not in overrides:
        cfg["attention_scaling"] = "log"  # LEDiT's default; stock DiT runs unscaled
    model = LEDiTTransformer2DModel(**cfg)
    sd = {k: v for k, v in sd.items() if k != "pos_embed"}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("locality_conv") for k in missing)
    return model.eval()


@pytest.fixture(scope="module")
def sd():
    return facebook_state_dict(seed=0)


def test_dit_mode_matches_reference_at_training_resolution(sd):
    model = make(sd)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y).sample
    ref = reference_forward(sd, CFG, x, t, y, pos_table=sd["pos_embed"][0].double().numpy())
    assert ours.shape == (2, 8, 8, 8)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("mode", ["extrapolate", "interpolate"])
def test_dit_mode_non_square_position_modes(sd, mode):
    model = make(sd, position_mode=mode)
    x, t, y = inputs(height=8, width=12)
    with torch.no_grad():
        ours = model(x, t, y).sample
    table = sincos_table_np(64, 4, 6, base=4, interpolate=(mode == "interpolate"))
    ref = reference_forward(sd, CFG, x, t, y, pos_table=table)
    assert ours.shape == (2, 8, 8, 12)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("scan", CAUSAL_SCANS)
def test_scan_masks_match_their_definitions(scan):
    for h, w in [(4, 4), (3, 5), (5, 2)]:
        assert torch.equal(causal_visibility(scan, h, w), visible(scan, h, w))


def test_corner_scan_visible_count_formula():
    h, w = 4, 6
    m = causal_visibility("mask_lower_right_corner", h, w)
    for i in range(h * w):
        r, c = divmod(i, w)
        assert m[i].sum().item() == h * w - (h - 1 - r) * (w - 1 - c)


def test_row_or_column_major_scan_properties():
    """Scan (d), second reading: the union of the row-major and column-major causal scans."""
    for h, w in [(4, 6), (5, 3), (1, 4)]:
        m = causal_visibility("row_or_column_major", h, w)
        idx = torch.arange(h * w)
        r, c = idx // w, idx % w
        column_major = c * h + r  # each token's index when the grid is scanned column by column
        row_causal = idx[None, :] <= idx[:, None]
        column_causal = column_major[None, :] <= column_major[:, None]
        assert torch.equal(m, row_causal | column_causal)
        assert torch.equal(row_causal & column_causal, causal_visibility("mask_lower_right", h, w))
        assert m[0].nonzero().flatten().tolist() == [0]  # the top-left token sees only itself
        counts = m.sum(dim=1)
        assert torch.equal(counts, h * w - (h - r) * (w - c) + 1)
        assert counts.min().item() == 1 and counts.max().item() == h * w
        corner = causal_visibility("mask_lower_right_corner", h, w)
        assert not (m & ~corner).any()  # every key it shows, the first reading shows too ...
        assert torch.equal(corner.sum(dim=1) - counts, (h - 1 - r) + (w - 1 - c))  # ... which shows more
        assert (corner & ~m).any() == (h * w > 1)


def test_unknown_scan_is_refused_by_every_mask_builder():
    from ledit_convert.models.attention import _flex_mask_mod
    q, k = torch.tensor(3), torch.tensor(1)
    with pytest.raises(ValueError, match="'zigzag'"):
        causal_visibility("zigzag", 2, 2)
    with pytest.raises(ValueError, match="'zigzag'"):
        _flex_mask_mod("zigzag", 2)(0, 0, q, k)


def ledit_error_against_reference(sd, scan, backend):
    """Relative error of a LEDiT (SA/CA layout, random conv) on a non-square grid against the float64 reference."""
    layout = ["self", "causal"] * 2
    model = make(sd, position_encoding="none", attention_layout=layout, causal_scan=scan, locality="full")
    model.set_attention_backend(backend)
    random_ledit_conv(model)
    x, t, y = inputs(height=8, width=12)
    with torch.no_grad():
        ours = model(x, t, y).sample
    conv = (model.locality_conv.conv.weight, model.locality_conv.conv.bias, 1)
    factor = math.sqrt(math.log(24) / math.log(16))
    ref = reference_forward(sd, CFG, x, t, y, pos="none", layout=layout, scan=scan, conv=conv, logit_factor=factor)
    return rel_err(ours, ref)


@pytest.mark.parametrize("scan", CAUSAL_SCANS)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_ledit_mode_matches_reference(sd, scan, backend):
    assert ledit_error_against_reference(sd, scan, backend) <= 1e-5


@pytest.mark.parametrize("scan", ["mask_lower_right_corner", "row_or_column_major"])
def test_flex_backend_on_cpu_matches_reference(sd, scan):
    """FlexAttention (compiled, block mask) is the CUDA default for 2D scans; it runs on the CPU too."""
    assert ledit_error_against_reference(sd, scan, "flex") <= 1e-5


def test_zero_conv_is_an_exact_no_op(sd):
    with_conv = make(sd, position_encoding="none", locality="full", attention_layout=["self", "causal"] * 2)
    without = make(sd, position_encoding="none", locality="none", attention_layout=["self", "causal"] * 2)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(with_conv(x, t, y).sample, without(x, t, y).sample)


def test_depthwise_conv_matches_reference(sd):
    model = make(sd, position_encoding="none", locality="depthwise")
    random_ledit_conv(model)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y).sample
    conv = (model.locality_conv.conv.weight, model.locality_conv.conv.bias, 64)
    ref = reference_forward(sd, CFG, x, t, y, pos="none", conv=conv)
    assert rel_err(ours, ref) <= 1e-5


def test_dilation_switches_only_in_training(sd):
    model = make(sd, position_encoding="none", locality="full", locality_dilation_prob=1.0,
                 locality_dilation_rates=[2])
    random_ledit_conv(model)
    x, t, y = inputs()
    conv = (model.locality_conv.conv.weight, model.locality_conv.conv.bias, 1)
    ref_d1 = reference_forward(sd, CFG, x, t, y, pos="none", conv=conv, dilation=1)
    ref_d2 = reference_forward(sd, CFG, x, t, y, pos="none", conv=conv, dilation=2)
    with torch.no_grad():
        assert rel_err(model.eval()(x, t, y).sample, ref_d1) <= 1e-5
        assert rel_err(model.train()(x, t, y).sample, ref_d2) <= 1e-5
    assert rel_err(ref_d1, ref_d2) > 1e-3  # the two dilations really differ


def test_dilation_probability_is_respected(sd):
    model = make(sd, position_encoding="none", locality="full", locality_dilation_prob=0.1,
                 locality_dilation_rates=[2, 3]).train()
    torch.manual_seed(0)
    draws = [model.locality_conv.sample_dilation() for _ in range(4000)]
    frac = sum(d != 1 for d in draws) / len(draws)
    assert 0.08 < frac < 0.12
    assert set(draws) == {1, 2, 3}
    assert model.eval().locality_conv.sample_dilation() == 1


def test_attention_scaling(sd):
    model = make(sd, position_encoding="none", attention_layout=["causal"] * 4)
    assert model.logit_factor(16, "log") == 1.0
    assert model.logit_factor(64, "log") == pytest.approx(math.sqrt(math.log(64) / math.log(16)))
    assert model.logit_factor(64, "none") == 1.0
    x, t, y = inputs(height=16, width=16)
    with torch.no_grad():
        scaled = model(x, t, y).sample
        plain = model(x, t, y, attention_kwargs={"scaling": "none"}).sample
    ref = reference_forward(sd, CFG, x, t, y, pos="none", layout=["causal"] * 4, scan="mask_lower_right_corner",
                            logit_factor=math.sqrt(math.log(64) / math.log(16)))
    assert rel_err(scaled, ref) <= 1e-5
    assert rel_err(scaled, plain) > 1e-4


def test_causal_to_self_switch(sd):
    model = make(sd, position_encoding="none", attention_layout=["causal"] * 4)
    selfish = make(sd, position_encoding="none")
    x, t, y = inputs()
    with torch.no_grad():
        switched = model(x, t, y, attention_kwargs={"causal_to_self": True}).sample
        assert torch.allclose(switched, selfish(x, t, y).sample, atol=1e-6)
        assert not torch.allclose(model(x, t, y).sample, switched, atol=1e-4)


def test_gradient_checkpointing_gives_same_gradients(sd):
    model = make(sd, position_encoding="none", attention_layout=["self", "causal"] * 2, locality="full")
    random_ledit_conv(model)
    x, t, y = inputs()

    def grads():
        model.zero_grad()
        model(x, t, y).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads()))


def test_invalid_config_reports_every_problem():
    with pytest.raises(ValueError) as e:
        LEDiTTransformer2DModel(**dict(CFG, attention_layout=["self"] * 3, causal_scan="zigzag",
                                       locality_dilation_prob=2.0))
    msg = str(e.value)
    assert "3 entries for 4 layers" in msg and "'zigzag'" in msg and "locality_dilation_prob 2.0" in msg


def test_bad_latent_size_is_rejected(sd):
    model = make(sd)
    with pytest.raises(ValueError, match="not divisible by patch size 2"):
        model(torch.randn(1, 4, 8, 7), torch.tensor([1]), torch.tensor([1]))
