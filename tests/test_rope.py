"""2D RoPE and the resolution scalings (positions.py): each against a float64 re-derivation of its formula written
here from the papers, the RoPE DiT against the float64 oracle, and every method against the plain model at the
training size in every family."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed

from _tiny import randomize_, tiny_ledit
from factories import rel_err
from reference import reference_forward, sincos_table_np
from test_surgery import RELOAD, run_without_ledit_convert
from ledit_convert.models.dit import LEDiTTransformer2DModel
from ledit_convert.models.pixart import LEDiTPixArtTransformer2DModel
from ledit_convert.models.positions import (DYNAMIC_SCALINGS, ROPE_SCALINGS, SINCOS_SCALINGS, apply_rope,
                                            dype_kappa, rope_axis, rope_frequencies, rope_table,
                                            rope_turn, sincos_table)
from ledit_convert.models.sd3 import LEDiTSD3Transformer2DModel

TWO_PI = 2 * math.pi
T_MID = 0.6  # a diffusion time where DyPE's kappa = 2 * 0.36 = 0.72


# ---------------------------------------------------------------------------------------------------------------
# float64 re-derivations, one formula at a time, from the papers (no code shared with positions.py)
# ---------------------------------------------------------------------------------------------------------------

def ref_axis(method, d, length, train_length, base=10000.0, t=None):
    """(frequencies, ratio) of one RoPE axis with d rotated channels: FiT's VisionRoPE per axis, PI (Chen et al.),
    NTK-aware (b' = b s^(d/(d-2))), YaRN's ramp on r = L / lambda (alpha 1, beta 32), RIFLEx (the frequency whose
    period is nearest the training length set to 0.9 * 2 pi / L), DyPE (s -> s^(2 t^2))."""
    theta = np.array([base ** (-2.0 * j / d) for j in range(d // 2)])
    s = max(1.0, length / train_length)
    if method.startswith("dype"):
        s = s ** (2.0 * t ** 2)
    if method in ("pi", "dype-pi"):
        theta = theta / s
    elif method in ("ntk", "dype-ntk"):
        b = base * s ** (d / (d - 2))
        theta = np.array([b ** (-2.0 * j / d) for j in range(d // 2)])
    elif method in ("yarn", "dype"):
        out = []
        for th in theta:
            r = train_length / (TWO_PI / th)
            gamma = 0.0 if r < 1 else 1.0 if r > 32 else (r - 1) / 31
            out.append((1 - gamma) * th / s + gamma * th)
        theta = np.array(out)
    elif method == "riflex" and length > train_length:
        k = int(np.argmin(np.abs(TWO_PI / theta - train_length)))
        theta[k] = min(theta[k], 0.9 * TWO_PI / length)
    return theta, s


def ref_rope(head_dim, grid, train_grid, method, t=None):
    """cos and sin (N, head_dim) by loops: channel c < head_dim/2 turns by row * theta_row[c // 2], the rest by
    column * theta_col[(c - head_dim/2) // 2]; YaRN's temperature 0.1 ln s + 1 of the larger axis ratio."""
    (h, w), (h0, w0) = grid, train_grid
    row, s_row = ref_axis(method, head_dim // 2, h, h0, t=t)
    col, s_col = ref_axis(method, head_dim // 2, w, w0, t=t)
    s = max(s_row, s_col)
    temp = (1 + 0.1 * math.log(s)) if method in ("yarn", "dype") and s > 1 else 1.0
    angles = np.zeros((h * w, head_dim))
    for r in range(h):
        for c in range(w):
            for ch in range(head_dim):
                half = head_dim // 2
                angles[r * w + c, ch] = r * row[ch // 2] if ch < half else c * col[(ch - half) // 2]
    return np.cos(angles) * temp, np.sin(angles) * temp


def ref_sincos(dim, grid, train_grid, method, t=None, position_scale=1.0):
    """MAE's table by loops: [sin, cos](p * omega_i) of the column then of the row, omega_i = 1 / b^(i / (dim/4));
    interpolate multiplies positions by L0 / L, DyPE's by (L0 / L)^(2 t^2), ntk changes b to 10000 s^(n/(n-1))."""
    (h, w), (h0, w0) = grid, train_grid
    n = dim // 4

    def axis(length, train_length):
        step = {"interpolate": train_length / length,
                "dype-interpolate": (train_length / length) ** (2.0 * (t or 0) ** 2)}.get(method, 1.0)
        b = 10000.0 * max(1.0, length / train_length) ** (n / (n - 1)) if method == "ntk" else 10000.0
        omega = np.array([1.0 / b ** (i / n) for i in range(n)])
        pos = np.arange(length) * position_scale * step
        return np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], axis=1)

    cols, rows = axis(w, w0), axis(h, h0)
    return np.stack([np.concatenate([cols[c], rows[r]]) for r in range(h) for c in range(w)])


# ---------------------------------------------------------------------------------------------------------------
# the formulas
# ---------------------------------------------------------------------------------------------------------------

GRIDS = [((8, 8), (4, 4)), ((6, 10), (4, 4)), ((3, 5), (4, 4)), ((32, 32), (16, 16))]


@pytest.mark.parametrize("method", ROPE_SCALINGS)
@pytest.mark.parametrize("grid,train", GRIDS)
def test_rope_table_matches_its_float64_derivation(method, grid, train):
    t = T_MID if method in DYNAMIC_SCALINGS else None
    cos, sin = rope_table(16, grid, train, method, t=t)
    ref_cos, ref_sin = ref_rope(16, grid, train, method, t)
    assert cos.dtype == torch.float64
    np.testing.assert_allclose(cos.numpy(), ref_cos, atol=1e-12)
    np.testing.assert_allclose(sin.numpy(), ref_sin, atol=1e-12)


@pytest.mark.parametrize("method", SINCOS_SCALINGS)
@pytest.mark.parametrize("grid,train", GRIDS)
def test_sincos_table_matches_its_float64_derivation(method, grid, train):
    t = T_MID if method in DYNAMIC_SCALINGS else None
    for scale in (1.0, 0.5):
        got = sincos_table(32, grid, train, method, position_scale=scale, t=t)
        np.testing.assert_allclose(got.numpy(), ref_sincos(32, grid, train, method, t, scale), atol=1e-12)
    if method in ("extrapolate", "interpolate"):  # and the oracle's own MAE table
        expected = sincos_table_np(32, *grid, base=train[0], interpolate=method == "interpolate")
        if grid[0] / train[0] == grid[1] / train[1]:
            np.testing.assert_allclose(sincos_table(32, grid, train, method).numpy(), expected, atol=1e-12)


def test_rotation_is_complex_multiplication_and_sees_offsets_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 16, generator=g, dtype=torch.float64)
    cos, sin = rope_table(16, (4, 5), (4, 5))
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.complex(cos[:, 0::2], sin[:, 0::2])
    expected = torch.stack([z.real, z.imag], -1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-12)
    # the same q and k at every token: logits depend on the (row, column) offset only
    q = apply_rope(x[0, 0, :1].expand(20, 16), cos, sin)
    k = apply_rope(x[0, 1, :1].expand(20, 16), cos, sin)
    logits = (q @ k.T).reshape(4, 5, 4, 5)
    torch.testing.assert_close(logits[1, 1, 0, 0], logits[3, 4, 2, 3], rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[0, 2, 1, 0], logits[2, 4, 3, 2], rtol=0, atol=1e-12)


def test_complex_turn_equals_the_real_rotation_for_strided_and_bf16_inputs(monkeypatch):
    from ledit_convert.models.attention import rotate_qk
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 20, 3, 3, 16, generator=g).permute(2, 0, 3, 1, 4)  # DiT's strided q, k, v
    cos, sin = (t.float() for t in rope_table(16, (4, 5), (2, 2), "yarn"))
    rope = (cos, sin, rope_turn(cos, sin))
    eager = rotate_qk(qkv[0], qkv[1], rope)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the real form compiled blocks use
    compiled = rotate_qk(qkv[0], qkv[1], rope)
    for a, b, x in zip(eager, compiled, qkv):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, apply_rope(x, cos, sin), rtol=0, atol=1e-6)
    bf16 = rotate_qk(qkv[0].bfloat16(), qkv[1].bfloat16(), rope)
    assert bf16[0].dtype == torch.bfloat16
    torch.testing.assert_close(bf16[0].float(), apply_rope(qkv[0].bfloat16().float(), cos, sin), rtol=1e-2, atol=1e-2)


def test_ntk_divides_the_lowest_frequency_by_s_and_keeps_the_highest():
    plain = rope_frequencies(16)
    _, freqs, ratio = rope_axis("ntk", 16, 12, 4)
    assert ratio == 3.0 and freqs[0] == plain[0]
    torch.testing.assert_close(freqs[-1], plain[-1] / 3, rtol=1e-12, atol=0)
    assert bool((freqs[1:-1] < plain[1:-1]).all() and (freqs[1:-1] > plain[1:-1] / 3).all())


def test_yarn_keeps_fast_frequencies_interpolates_slow_ones_and_sets_the_temperature():
    d, train, s = 32, 16, 2.0
    theta, _ = ref_axis("none", d, 32, train)
    yarn, _ = ref_axis("yarn", d, 32, train)
    rotations = train * theta / TWO_PI
    assert np.allclose(yarn[rotations > 32], theta[rotations > 32])
    assert np.allclose(yarn[rotations < 1], theta[rotations < 1] / s)
    cos, sin = rope_table(d, (32, 16), (train, train), "yarn")
    magnitude = (cos ** 2 + sin ** 2).sqrt()
    torch.testing.assert_close(magnitude, torch.full_like(magnitude, 1 + 0.1 * math.log(s)), rtol=0, atol=1e-12)
    # logits between turned q and k carry the temperature squared: YaRN's 1/t
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 32 * 16, d, generator=g, dtype=torch.float64)
    plain_cos, plain_sin = rope_table(d, (32, 16), (train, train), "none")
    same = (apply_rope(q, cos, sin) * apply_rope(k, cos, sin)).sum(-1)
    base = (apply_rope(q, plain_cos, plain_sin) * apply_rope(k, plain_cos, plain_sin)).sum(-1)
    torch.testing.assert_close(same, base * (1 + 0.1 * math.log(s)) ** 2)  # same token: the angle cancels


def test_riflex_lowers_only_the_intrinsic_frequency_below_one_period():
    d, train, length = 36, 16, 32  # DiT-XL/2's head (72 channels, 36 per axis) at 256 -> 512 px
    theta, _ = ref_axis("none", d, length, train)
    riflex, _ = ref_axis("riflex", d, length, train)
    changed = np.flatnonzero(theta != riflex)
    assert changed.tolist() == [2]  # periods 6.3, 10.6, 17.8, ...: the third is nearest 16 tokens
    assert TWO_PI / riflex[2] > length and np.isclose(TWO_PI / riflex[2], length / 0.9)
    cos, _ = rope_table(2 * d, (length, train), (train, train), "riflex")
    plain, _ = rope_table(2 * d, (length, train), (train, train), "none")
    assert not torch.equal(cos, plain) and torch.equal(cos[:, d:], plain[:, d:])  # columns did not grow


def test_dype_runs_from_extrapolation_at_t0_through_the_static_method_to_more():
    assert dype_kappa(0.0) == 0.0 and dype_kappa(1.0) == 2.0 and dype_kappa(math.sqrt(0.5)) == pytest.approx(1.0)
    grid, train = (12, 8), (4, 4)
    none = rope_table(16, grid, train, "none")
    for dynamic, static in (("dype", "yarn"), ("dype-pi", "pi"), ("dype-ntk", "ntk")):
        torch.testing.assert_close(rope_table(16, grid, train, dynamic, t=0.0), none, rtol=0, atol=1e-12)
        torch.testing.assert_close(rope_table(16, grid, train, dynamic, t=math.sqrt(0.5)),
                                   rope_table(16, grid, train, static), rtol=0, atol=1e-9)
    torch.testing.assert_close(sincos_table(32, grid, train, "dype-interpolate", t=math.sqrt(0.5)),
                               sincos_table(32, grid, train, "interpolate"), rtol=0, atol=1e-9)
    torch.testing.assert_close(sincos_table(32, grid, train, "dype-interpolate", t=0.0),
                               sincos_table(32, grid, train, "extrapolate"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="diffusion time"):
        rope_table(16, grid, train, "dype")


def test_sd3_scalings_stay_inside_the_stored_table():
    cap, base, dim = 12, 4, 16
    embed = PatchEmbed(height=8, width=8, patch_size=2, in_channels=4, embed_dim=dim, pos_embed_max_size=cap)
    for grid in ((4, 4), (6, 10), (12, 12)):
        stored = embed.cropped_pos_embed(grid[0] * 2, grid[1] * 2)[0].double()
        ours = sincos_table(dim, grid, (base, base), "ntk" if grid == (4, 4) else "extrapolate",
                            position_scale=base / cap, table_grid=(cap, cap))
        assert (ours - stored).abs().max() < 1e-6  # ntk at the training grid is the crop itself
    wide = sincos_table(dim, (12, 12), (base, base), "interpolate", position_scale=base / cap, table_grid=(cap, cap))
    train = sincos_table(dim, (4, 4), (base, base), "extrapolate", position_scale=base / cap, table_grid=(cap, cap))
    # the first row's column features span the training crop's columns, from its first to its last
    assert (wide[0, : dim // 2] - train[0, : dim // 2]).abs().max() < 0.5 / cap * 4
    with pytest.raises(ValueError, match="past the stored table"):
        sincos_table(dim, (14, 4), (base, base), "ntk", position_scale=base / cap, table_grid=(cap, cap))


# ---------------------------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------------------------

def rope_dit(seed=0, **overrides):
    """A 4-block, 64-wide DiT-RoPE (head size 16) with random weights."""
    config = dict(position_encoding="rope2d", locality="none", attention_scaling="none", hidden_size=64,
                  num_attention_heads=4)
    config.update(overrides)
    return tiny_ledit(seed, **config, attention_layout=None)


def dit_inputs(height, width, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, height, width, generator=g), torch.tensor([10, 700]), torch.tensor([1, 7]))


@pytest.mark.parametrize("method", ["none", "yarn", "riflex", "dype", "dype-ntk"])
def test_rope_dit_matches_the_float64_oracle(method):
    model = rope_dit().double()
    x, t, y = dit_inputs(24, 16)  # a 12 x 8 grid from the 4 x 4 one: rows 3x, columns 2x
    times = [0.01, 0.7]  # per sample: DyPE's tables differ within the batch
    angles, magnitude = [], []
    for ti in times:
        cos, sin = ref_rope(16, (12, 8), (4, 4), method, ti)
        angles.append(np.arctan2(sin, cos)[:, 0::2])
        magnitude.append(np.hypot(cos, sin)[0, 0])
    rope = (torch.from_numpy(np.stack(angles)), torch.tensor(magnitude, dtype=torch.float64))
    cfg = dict(patch_size=2, hidden_size=64, num_attention_heads=4)
    expected = reference_forward(model.state_dict(), cfg, x, t, y, pos="none", rope=rope)
    with torch.no_grad():
        got = model(x.double(), t, y, attention_kwargs={"position_scaling": method}).sample
    assert rel_err(got, expected) < 1e-6  # the tables are float32


def _stock_pixart(name):
    from test_pixart import CONFIGS
    return randomize_(LEDiTPixArtTransformer2DModel(**CONFIGS[name]), 0, std=0.2)


def test_every_method_reduces_to_the_plain_model_at_the_training_size():
    """DiT: the same tables bit for bit; PixArt and SD3: their stock tables come from diffusers' float32 positions,
    the scaled ones from ours in float64, equal to ~1e-7."""
    cases = [(rope_dit(), ROPE_SCALINGS, "attention_kwargs"),
             (tiny_ledit(0, position_encoding="sincos", locality="none", attention_layout=None), SINCOS_SCALINGS,
              "attention_kwargs")]
    for model, methods, key in cases:
        x, t, y = dit_inputs(8, 8)
        with torch.no_grad():
            plain = model(x, t, y).sample
            for method in methods:
                got = model(x, t, y, **{key: {"position_scaling": method}}).sample
                assert torch.equal(got, plain), (model.config.position_encoding, method)  # bit for bit
    from test_pixart import pixart_inputs
    from test_sd3 import CONFIGS as SD3, sd3_inputs
    for name in ("sigma", "alpha"):
        model = _stock_pixart(name)
        x, kwargs = pixart_inputs(name)
        with torch.no_grad():
            plain = model(x, **kwargs).sample
            for method in SINCOS_SCALINGS:
                got = model(x, **kwargs, attention_kwargs={"position_scaling": method}).sample
                assert rel_err(got, plain) < 1e-6, (name, method)
    for name in ("sd3", "sd35"):
        model = randomize_(LEDiTSD3Transformer2DModel(**SD3[name]), 0, std=0.2)
        x, kwargs = sd3_inputs()
        with torch.no_grad():
            plain = model(x, **kwargs).sample
            for method in SINCOS_SCALINGS:
                got = model(x, **kwargs, joint_attention_kwargs={"position_scaling": method}).sample
                assert rel_err(got, plain) < 1e-6, (name, method)


def test_scalings_change_the_model_past_the_training_size():
    model = rope_dit()
    x, t, y = dit_inputs(16, 16)
    with torch.no_grad():
        outs = {m: model(x, t, y, attention_kwargs={"position_scaling": m}).sample for m in ROPE_SCALINGS}
    for method in ROPE_SCALINGS[1:]:
        assert rel_err(outs[method], outs["none"]) > 1e-6, method


def test_sd3_scalings_match_its_own_table_and_stop_at_the_cap():
    from test_sd3 import CONFIGS as SD3, sd3_inputs
    ref = randomize_(SD3Transformer2DModel(**SD3["sd3"]), 0, std=0.2)
    ours = LEDiTSD3Transformer2DModel(**SD3["sd3"]).eval()
    ours.load_state_dict(ref.state_dict())
    x, kwargs = sd3_inputs(16, 12)
    with torch.no_grad():
        plain = ours(x, **kwargs).sample
        assert rel_err(plain, ref(x, **kwargs).sample) < 1e-6
        interp = ours(x, **kwargs, joint_attention_kwargs={"position_scaling": "interpolate"}).sample
        assert rel_err(interp, plain) > 1e-4
        with pytest.raises(ValueError, match="past the stored table"):
            ours(*sd3_inputs(26, 8)[:1], **sd3_inputs(26, 8)[1], joint_attention_kwargs={"position_scaling": "ntk"})


def test_a_method_that_does_not_apply_is_one_line_naming_it():
    x, t, y = dit_inputs(8, 8)
    cases = [(tiny_ledit(0, position_encoding="sincos", locality="none", attention_layout=None), "yarn", "sin/cos"),
             (rope_dit(), "interpolate", "2D RoPE"), (tiny_ledit(0), "ntk", "no positional encoding")]
    for model, method, words in cases:
        with pytest.raises(ValueError) as info:
            model(x, t, y, attention_kwargs={"position_scaling": method})
        message = str(info.value)
        assert "\n" not in message and repr(method) in message and words in message
    with pytest.raises(ValueError, match="divisible by 4 for 2D RoPE"):
        LEDiTTransformer2DModel(hidden_size=24, num_attention_heads=4, num_layers=1, position_encoding="rope2d")


def test_rope_dit_trains_with_gradient_checkpointing():
    model = rope_dit().train()
    model.enable_gradient_checkpointing()
    x, t, y = dit_inputs(8, 8)
    model(x, t, y).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_rope_dit_reloads_in_plain_diffusers_with_a_scaling(tmp_path):
    model = rope_dit()
    out = tmp_path / "rope"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.glob("*.py")) == ["modeling_ledit.py", "modeling_ledit_attention.py",
                                                       "modeling_ledit_positions.py"]
    x, t, y = dit_inputs(16, 12)
    reload = RELOAD.replace("class_labels=data[\"y\"])", "class_labels=data[\"y\"], "
                            "attention_kwargs={\"position_scaling\": \"dype\"})")
    assert reload != RELOAD
    got = run_without_ledit_convert(tmp_path, out, {"x": x, "t": t, "y": y}, reload)
    with torch.no_grad():
        assert torch.equal(got["out"], model(x, t, y, attention_kwargs={"position_scaling": "dype"}).sample)


def test_rope_recipe_is_the_ledit_budget():
    import yaml
    from ledit_convert.training.recipe import load_recipe
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    rope, ledit = (load_recipe(str(recipes / name)) for name in ("rope-xl2-256.yaml", "ledit-xl2-256.yaml"))
    assert rope.to_dict() == ledit.to_dict()
    assert (rope.steps, rope.global_batch_size, rope.learning_rate) == (100000, 256, 1e-4)
    text = (recipes / "rope-xl2-256.yaml").read_text()
    assert "--position rope2d" in text and "--position-scaling yarn" in text
    assert set(yaml.safe_load(text)) == set(yaml.safe_load((recipes / "ledit-xl2-256.yaml").read_text()))


# ---------------------------------------------------------------------------------------------------------------
# surgery, sample and evaluate
# ---------------------------------------------------------------------------------------------------------------

def _dit_checkpoint(tmp_path, hidden=64, depth=2):
    from factories import facebook_state_dict
    sd = facebook_state_dict(seed=2, hidden=hidden, depth=depth, classes=10, grid=4, std=0.05)
    torch.save(sd, tmp_path / "dit.pt")
    return tmp_path / "dit.pt", sd


def test_rope2d_surgery_is_the_stock_dit_with_rope_in_place_of_its_table(tmp_path):
    from safetensors.torch import load_file
    from ledit_convert.conversion.surgery import surgery_options, surgery_to_folder
    src, sd = _dit_checkpoint(tmp_path)
    result = surgery_to_folder(str(src), tmp_path / "rope", surgery_options("rope2d"), num_heads=4)
    cfg = result.config
    assert cfg["position_encoding"] == "rope2d" and cfg["rope_theta"] == 10000.0
    assert cfg["attention_layout"] == ["self", "self"] and cfg["locality"] == "none"
    assert cfg["attention_scaling"] == "none"
    written = load_file(str(tmp_path / "rope" / "diffusion_pytorch_model.safetensors"))
    assert set(written) == set(sd) - {"pos_embed"} and all(torch.equal(written[k], sd[k]) for k in written)
    assert "converted to DiT-RoPE" in (tmp_path / "rope" / "README.md").read_text()
    asked = surgery_options("rope2d", causal_layers="alternate", locality="full")  # "unless asked"
    assert (asked.causal_layers, asked.locality, asked.attention_scaling) == ("alternate", "full", "none")
    model = LEDiTTransformer2DModel.from_pretrained(tmp_path / "rope").eval()
    x, t, y = dit_inputs(16, 16)
    with torch.no_grad():
        assert torch.isfinite(model(x, t, y, attention_kwargs={"position_scaling": "yarn"}).sample).all()


def test_rope2d_surgery_on_a_pixart_is_one_line(tmp_path):
    from diffusers import PixArtTransformer2DModel
    from test_pixart import SIGMA
    from typer.testing import CliRunner
    from ledit_convert.cli import app
    PixArtTransformer2DModel(**SIGMA).save_pretrained(tmp_path / "pixart")
    result = CliRunner().invoke(app, ["surgery", str(tmp_path / "pixart"), "--position", "rope2d", "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 3
    message = result.stderr.strip()
    assert "\n" not in message and "--position rope2d" in message and "pixart" in message
    assert not (tmp_path / "out").exists()


def test_sample_and_evaluate_with_methods_end_to_end(tmp_path):
    import json
    from PIL import Image
    from typer.testing import CliRunner
    from _tiny import tiny_vae
    from ledit_convert.cli import app
    runner = CliRunner()
    tiny_ledit().save_pretrained(tmp_path / "ledit")
    rope_dit().save_pretrained(tmp_path / "rope")
    tiny_vae().save_pretrained(tmp_path / "vae")
    src, _ = _dit_checkpoint(tmp_path, hidden=384, depth=1)  # DiT-S's width: its heads need no --num-heads
    common = ["--vae", str(tmp_path / "vae"), "--device", "cpu", "--steps", "2"]
    ok = runner.invoke(app, ["sample", str(tmp_path / "rope"), "--height", "64", "--width", "48",
                             "--position-scaling", "dype", "--num-samples", "2", "-o", str(tmp_path / "s")] + common)
    assert ok.exit_code == 0, ok.output + (ok.stderr or "")
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    bad = runner.invoke(app, ["sample", str(src), "--position-scaling", "yarn", "-o",
                              str(tmp_path / "b")] + common)
    assert bad.exit_code == 3 and "\n" not in bad.stderr.strip() and "'yarn' does not apply" in bad.stderr
    rng = np.random.default_rng(0)
    (tmp_path / "ref").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    models = [f"ledit={tmp_path / 'ledit'}", f"rope={tmp_path / 'rope'}@none", f"rope-yarn={tmp_path / 'rope'}@yarn",
              f"dit-ntk={src}@ntk"]
    args = ["evaluate", "--resolutions", "32,64", "--reference", str(tmp_path / "ref"), "--num-samples", "4",
            "--batch-size", "4", "-o", str(tmp_path / "eval")] + common
    result = runner.invoke(app, args + [a for m in models for a in ("--model", m)])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert {(r["model"], r["resolution"]) for r in rows} == {(m.split("=")[0], r) for m in models
                                                              for r in ("32", "64")}
    by = {(r["model"], r["resolution"]): r["fid"] for r in rows}
    assert by[("rope", "32")] == pytest.approx(by[("rope-yarn", "32")], rel=1e-4)  # the same model at training size
    assert by[("rope", "64")] != by[("rope-yarn", "64")]
    assert "| rope-yarn |" in (tmp_path / "eval" / "results.md").read_text()
    wrong = runner.invoke(app, args[:-len(common)] + common + ["--model", f"{tmp_path / 'rope'}@interpolate",
                                                               "-o", str(tmp_path / "eval2")])
    assert wrong.exit_code == 3 and "\n" not in wrong.stderr.strip() and "'interpolate' does not apply" in wrong.stderr


def test_a_rope_model_fine_tunes_and_reloads_as_dit_rope(tmp_path):
    from test_finetune import BASE, make_images
    from ledit_convert.training.finetune import finetune
    from ledit_convert.training.recipe import load_recipe
    LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32, num_layers=2,
                            num_attention_heads=2, num_classes=3, position_encoding="rope2d", locality="none",
                            attention_scaling="none").save_pretrained(tmp_path / "model")
    summary = finetune(str(tmp_path / "model"), str(make_images(tmp_path / "imgs")),
                       load_recipe(None, dict(BASE, steps=3)), str(tmp_path / "run"))
    assert all(np.isfinite(summary["losses"]))
    tuned = LEDiTTransformer2DModel.from_pretrained(summary["model"])
    assert tuned.config.position_encoding == "rope2d" and not any(b.causal for b in tuned.blocks)


def test_a_model_wide_scaling_serves_pipelines_that_pass_no_kwargs():
    from test_sd3 import CONFIGS as SD3, sd3_inputs
    model = randomize_(LEDiTSD3Transformer2DModel(**SD3["sd3"]), 0, std=0.2)
    x, kwargs = sd3_inputs(16, 12)
    with torch.no_grad():
        asked = model(x, **kwargs, joint_attention_kwargs={"position_scaling": "dype-interpolate"}).sample
        model.set_position_scaling("dype-interpolate")
        assert torch.equal(model(x, **kwargs).sample, asked)
        model.set_position_scaling(None)
        assert not torch.equal(model(x, **kwargs).sample, asked)
    with pytest.raises(ValueError, match="'riflex' does not apply to a model with a sin/cos table"):
        model.set_position_scaling("riflex")


def test_compiled_rope_blocks_and_whole_model_match_eager():
    from ledit_convert.models.compiling import compile_blocks
    x, t, y = dit_inputs(16, 12)
    opts = {"position_scaling": "yarn"}
    eager, regional, whole = rope_dit(), rope_dit(), rope_dit()
    compile_blocks(regional)  # blocks compiled, the prelude (tables, complex factors) eager
    compiled = torch.compile(whole, fullgraph=True)  # everything traced: the real rotation throughout
    with torch.no_grad():
        expected = eager(x, t, y, attention_kwargs=opts).sample
        assert rel_err(regional(x, t, y, attention_kwargs=opts).sample, expected) < 1e-5
        assert rel_err(compiled(x, t, y, attention_kwargs=opts).sample, expected) < 1e-5
