"""Position probe, residual-stream capture, token norms and the patch-embedding rescale."""
import pytest
import torch

from _tiny import randomize_
from ledit_convert.models.dit import LEDiTTransformer2DModel, sincos_position_table
from ledit_convert.replication.probe import (block_input, norm_matching_factor, position_probe_r2, probe_model,
                                 rescale_patch_embedding, residual_stream, token_norms)
from ledit_convert.conversion.surgery import SurgeryOptions, add_locality_conv, drop_position_encoding, set_attention_layout

GRID = (8, 8)
# a 16 x 16 latent in 2 x 2 patches: an 8 x 8 token grid, hidden 32 (8 sin/cos frequencies per axis)
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, num_layers=4,
            num_attention_heads=2, num_classes=10, attention_scaling="none", locality="none")
DIT = dict(TINY, position_encoding="sincos")
NOPE = dict(TINY, position_encoding="none")  # all self-attention, no conv, no table


def build(config, seed=0, std=0.05):
    """A tiny model with seeded random weights (adaLN-Zero's init would make every block the identity)."""
    return randomize_(LEDiTTransformer2DModel(**config), seed, std)


def latents(batch=32, seed=1):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def grid_targets(batch):
    """(B, N, 2) features that are the token's row and column index themselves."""
    idx = torch.arange(GRID[0] * GRID[1])
    return torch.stack([idx // GRID[1], idx % GRID[1]], dim=1).float().expand(batch, -1, -1)


def test_probe_scores_perfect_and_empty_features():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(16, 64, 6, generator=g)
    perfect = position_probe_r2(torch.cat([grid_targets(16), noise], dim=-1), GRID)
    assert perfect["row"] > 1 - 1e-6 and perfect["col"] > 1 - 1e-6  # only the small ridge keeps it below 1
    empty = position_probe_r2(noise, GRID)
    assert abs(empty["row"]) < 0.05 and abs(empty["col"]) < 0.05
    assert position_probe_r2(noise, GRID) == empty  # deterministic
    assert position_probe_r2(noise, GRID, seed=1) != empty  # the seed picks the held-out images
    constant = position_probe_r2(torch.ones(4, 64, 3), GRID)
    assert constant == {"row": 0.0, "col": 0.0}


def test_probe_rejects_bad_shapes():
    with pytest.raises(ValueError, match="grid 8x4"):
        position_probe_r2(torch.zeros(4, 64, 3), (8, 4))
    with pytest.raises(ValueError, match="cannot be split"):
        position_probe_r2(torch.zeros(1, 64, 3), GRID)
    with pytest.raises(ValueError, match="holdout 1.5"):
        position_probe_r2(torch.zeros(4, 64, 3), GRID, holdout=1.5)


def test_sincos_table_is_linear_in_position_on_the_grid():
    # sin/cos of the index is not linear in it, but on a finite axis the table's 16 columns per axis span every
    # function of the 8 indices, the index included: an unregularised probe recovers it to rounding
    table = sincos_position_table(32, *GRID, *GRID)[None].expand(4, -1, -1)
    exact = position_probe_r2(table, GRID, ridge=1e-12)
    assert exact["row"] > 1 - 1e-9 and exact["col"] > 1 - 1e-9
    ridged = position_probe_r2(table, GRID)  # the default ridge costs about 1e-4
    assert 0.9995 < ridged["row"] < 1 and 0.9995 < ridged["col"] < 1


def test_dit_mode_carries_position_at_every_layer():
    rows = probe_model(build(DIT), latents(), timesteps=(100, 900), labels=3)
    assert [(r["t"], r["layer"]) for r in rows] == [(t, layer) for t in (100, 900) for layer in (-1, 0, 1, 2, 3)]
    for r in rows:  # measured 0.9998: patch content and the ridge take the rest
        assert r["row"] > 0.999 and r["col"] > 0.999, r
        assert 4.0 < r["norm"] < 4.5, r  # the table alone has norm sqrt(D / 2) = 4


def test_nope_self_attention_carries_no_position():
    model = build(NOPE, std=0.2)  # large enough that each block changes the stream by about its own norm
    x, t, y = latents(8), torch.full((8,), 500), torch.full((8,), 3)
    # permutation equivariance: shuffling the patches of the input shuffles the tokens of every layer alike
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    patches = x.reshape(8, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(8, 64, 4, 2, 2)
    shuffled = patches[:, perm].reshape(8, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(8, 4, 16, 16)
    plain, moved = residual_stream(model, x, t, y), residual_stream(model, shuffled, t, y)
    for layer in plain:
        torch.testing.assert_close(moved[layer], plain[layer][:, perm], atol=1e-5, rtol=1e-5)
    # so on constant latents every token of an image is the same vector: no probe can beat the mean (R^2 <= 0)
    flat = torch.randn(16, 4, 1, 1, generator=torch.Generator().manual_seed(3)).expand(16, 4, 16, 16)
    stream = residual_stream(model, flat, torch.full((16,), 500), torch.full((16,), 3))
    for layer, feats in stream.items():
        assert (feats - feats[:, :1]).abs().max() < 1e-5 * feats.abs().max(), layer
        r2 = position_probe_r2(feats, GRID)
        assert r2["row"] < 1e-6 and r2["col"] < 1e-6, (layer, r2)
    # and on noised random latents the probe finds nothing at any layer (measured -0.05 .. 0.0)
    for r in probe_model(model, latents(), timesteps=(100, 900), labels=3):
        assert -0.1 < r["row"] < 0.03 and -0.1 < r["col"] < 0.03, r


def test_residual_stream_layers_and_input():
    model = build(dict(NOPE, locality="full", attention_layout=["self", "causal"] * 2))
    model.train()
    x, t, y = latents(4), torch.full((4,), 10), torch.full((4,), 1)
    stream = residual_stream(model, x, t, y, layers=["input", 2])
    assert list(stream) == [-1, 2] and stream[2].shape == (4, 64, 32)
    assert model.training  # the caller's mode comes back
    torch.testing.assert_close(stream[-1], block_input(model, x, with_table=False), atol=0, rtol=0)
    assert torch.equal(residual_stream(model, x, t, y, layers=[-1])[-1], stream[-1])
    with pytest.raises(ValueError, match=r"\[4\]"):
        residual_stream(model, x, t, y, layers=[0, 4])


def test_hooks_are_removed_after_a_failure():
    model = build(NOPE)

    def boom(module, args, output):
        raise RuntimeError("boom")
    own = model.blocks[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        residual_stream(model, latents(2), torch.tensor([5, 5]), torch.tensor([1, 1]))
    assert list(model.blocks[2]._forward_hooks) == [own.id]
    assert all(not b._forward_pre_hooks for b in model.blocks)
    assert all(not b._forward_hooks for i, b in enumerate(model.blocks) if i != 2)


def converted(base_state):
    """A fresh LEDiT state from a DiT state, by surgery's own steps (zero locality conv)."""
    state, _ = drop_position_encoding(base_state)
    state, _ = set_attention_layout(state, ["self", "causal"] * 2, "mask_lower_right_corner", "none")
    state, _ = add_locality_conv(state, SurgeryOptions())
    return state


def as_model(state):
    model = LEDiTTransformer2DModel(**state[0])
    model.load_state_dict(state[1], strict=True)
    return model.eval()


def test_rescale_patch_embedding_scales_only_the_patch_embedding():
    model = build(NOPE)
    state = (dict(NOPE), model.state_dict())
    (config, sd), note = rescale_patch_embedding(state, 2.0)
    assert config == state[0] and note == "scaled the patch embedding (x_embedder.proj weight and bias) by 2"
    for key, value in state[1].items():
        if key.startswith("x_embedder.proj."):
            assert torch.equal(sd[key], 2.0 * value), key
        else:
            assert sd[key] is value, key  # passed through, not copied
    x = latents(2)
    scaled = as_model((config, sd))
    with torch.no_grad():  # a power of two scales every float exactly
        assert torch.equal(scaled.x_embedder(x), 2.0 * model.x_embedder(x))
        torch.testing.assert_close(as_model(rescale_patch_embedding(state, 0.37)[0]).x_embedder(x),
                                   0.37 * model.x_embedder(x), atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="-1"):
        rescale_patch_embedding(state, -1.0)


def test_norm_matching_factor_restores_the_dit_input_norm():
    base = build(DIT)
    base_state = (dict(DIT), base.state_dict())
    calib = latents(16)
    norms = token_norms(base, calib)
    assert norms["with_table"] > 3 * norms["without_table"]  # the table is most of a DiT's input (4.23 vs 1.17)
    factor = norm_matching_factor(base, calib)
    assert factor == pytest.approx(norm_matching_factor(base_state, calib), rel=1e-12)
    ledit = as_model(rescale_patch_embedding(converted(base_state), factor)[0])
    entering = residual_stream(ledit, calib, torch.full((16,), 500), torch.full((16,), 3), layers=["input"])[-1]
    assert entering.norm(dim=-1).mean().item() == pytest.approx(norms["with_table"], rel=1e-6)
    with pytest.raises(ValueError, match="stock DiT"):
        norm_matching_factor(ledit, calib)
