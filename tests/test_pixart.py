"""PixArt as an LEDiT: exact against diffusers with the changes off, against a float64 oracle with them on;
surgery on PixArt folders; reload in plain diffusers."""
import json
import math
import os

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from _tiny import randomize_
from factories import rel_err
from reference import _conv2d, _gelu_tanh, _ln, _silu, visible
from test_surgery import RELOAD, run_without_ledit_convert
from ledit_convert.conversion.checkpoints import read_checkpoint
from ledit_convert.cli import app
from ledit_convert.errors import CheckpointError, ConfigError
from ledit_convert.models.pixart import LEDiTPixArtTransformer2DModel
from ledit_convert.conversion.surgery import SurgeryOptions, surgery_to_folder

TINY = dict(sample_size=8, num_layers=2, patch_size=2, num_attention_heads=2, caption_channels=16, in_channels=4,
            out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=8,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
# Sigma: no micro-conditions, the 1024 model's interpolation_scale 2; alpha: resolution and aspect-ratio
# micro-conditions (their embedders take D // 3 each, so D is a multiple of 3)
SIGMA = dict(TINY, attention_head_dim=8, cross_attention_dim=16, use_additional_conditions=False, interpolation_scale=2)
ALPHA = dict(TINY, attention_head_dim=12, cross_attention_dim=24, use_additional_conditions=True)
CONFIGS = {"sigma": SIGMA, "alpha": ALPHA}
LEDIT_ON = dict(position_encoding="none", attention_layout=["self", "causal"], attention_scaling="log",
                locality="full", locality_dilation_prob=0.1)


def stock(name, seed=0):
    """diffusers' PixArt with seeded non-zero weights everywhere (its zero-ish inits would hide most of the math)."""
    return randomize_(PixArtTransformer2DModel(**CONFIGS[name]), seed, std=0.2)


def pixart_inputs(name, height=8, width=8, seed=1):
    """Latents, timesteps, text tokens, a text mask hiding the last two tokens of the first prompt, micro-conditions."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 5, 16, generator=g), timestep=torch.tensor([10, 700]),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    if CONFIGS[name]["use_additional_conditions"]:
        kwargs["added_cond_kwargs"] = {"resolution": torch.tensor([[64.0, 64.0], [96.0, 48.0]]),
                                       "aspect_ratio": torch.tensor([[1.0], [2.0]])}
    return torch.randn(2, 4, height, width, generator=g), kwargs


def run(model, x, kwargs, **extra):
    with torch.no_grad():
        return model(x, **kwargs, **extra).sample


@pytest.mark.parametrize("name", ["sigma", "alpha"])
def test_changes_off_equals_diffusers(name):
    ref = stock(name)
    ours = LEDiTPixArtTransformer2DModel(**CONFIGS[name]).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    for height, width in ((8, 8), (12, 8), (6, 10)):  # the training size, then new (non-square) grids
        x, kwargs = pixart_inputs(name, height, width)
        want = run(ref, x, kwargs)
        assert want.shape == (2, 8, height, width)
        assert rel_err(run(ours, x, kwargs), want) <= 1e-6, (height, width)


#################################################################################
#                    Independent float64 reference (diffusers names)            #
#################################################################################

def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _mlp(sd, name, x, act):
    return _lin(sd, name + ".linear_2", act(_lin(sd, name + ".linear_1", x)))


def _sinusoid(values):
    """diffusers' Timesteps(256, flip_sin_to_cos=True, shift 0): [cos, sin] of value * exp(-ln(1e4) k / 128).

    Frequencies and phase are float32 as in diffusers (the source's own numerics: at t = 700 float32 phases alone
    move the output by ~4e-6 relative from exact ones); cos and sin are then taken in float64."""
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)  # float32 throughout
    args = (values.float()[:, None] * freqs[None]).double()
    return torch.cat([args.cos(), args.sin()], dim=1)


def _heads(x, heads):
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _attention(sd, name, x, context, heads, bias=None, allowed=None, factor=1.0):
    q, k, v = (_heads(_lin(sd, f"{name}.to_{n}", src), heads) for n, src in (("q", x), ("k", context), ("v", context)))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) * factor
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return _lin(sd, f"{name}.to_out.0", out.transpose(1, 2).reshape(x.shape))


def reference_pixart(sd, cfg, x, text, t, text_mask, micro=None, layout=None, scan=None, factor=1.0):
    """float64 PixArt/LEDiT forward from a state dict in diffusers' names: no position table, optional conv."""
    sd = {k: v.double() for k, v in sd.items()}
    p, heads = cfg["patch_size"], cfg["num_attention_heads"]
    dim = heads * cfg["attention_head_dim"]
    b, _, hh, ww = x.shape
    h, w = hh // p, ww // p
    patches = x.double().reshape(b, -1, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    tokens = patches @ sd["pos_embed.proj.weight"].reshape(dim, -1).T + sd["pos_embed.proj.bias"]
    if "locality_conv.conv.weight" in sd:
        image = tokens.transpose(1, 2).reshape(b, dim, h, w)
        conv = _conv2d(image, sd["locality_conv.conv.weight"], sd["locality_conv.conv.bias"], 1, 1)
        tokens = tokens + conv.flatten(2).transpose(1, 2)
    cond = _mlp(sd, "adaln_single.emb.timestep_embedder", _sinusoid(t), _silu)
    if micro is not None:  # resolution (B, 2) and aspect ratio (B, 1), each value embedded to D // 3
        res = _mlp(sd, "adaln_single.emb.resolution_embedder", _sinusoid(micro["resolution"].flatten()), _silu)
        ar = _mlp(sd, "adaln_single.emb.aspect_ratio_embedder", _sinusoid(micro["aspect_ratio"].flatten()), _silu)
        cond = cond + torch.cat([res.reshape(b, -1), ar.reshape(b, -1)], dim=1)
    time_mod = _lin(sd, "adaln_single.linear", _silu(cond)).reshape(b, 6, dim)
    text = _mlp(sd, "caption_projection", text.double(), _gelu_tanh)
    bias = ((1 - text_mask.double()) * -10000.0)[:, None, None, :]  # (B, 1, 1, T)
    allowed = visible(scan, h, w) if scan else None
    for i, kind in enumerate(layout or ["self"] * cfg["num_layers"]):
        pre = f"transformer_blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = (sd[pre + "scale_shift_table"][None] + time_mod).chunk(6, dim=1)
        hidden = _ln(tokens, cfg["norm_eps"]) * (1 + scale1) + shift1
        tokens = tokens + gate1 * _attention(sd, pre + "attn1", hidden, hidden, heads, factor=factor,
                                             allowed=allowed if kind == "causal" else None)
        tokens = tokens + _attention(sd, pre + "attn2", tokens, text, heads, bias=bias)
        hidden = _ln(tokens, cfg["norm_eps"]) * (1 + scale2) + shift2
        tokens = tokens + gate2 * _lin(sd, pre + "ff.net.2", _gelu_tanh(_lin(sd, pre + "ff.net.0.proj", hidden)))
    shift, scale = (sd["scale_shift_table"][None] + cond[:, None]).chunk(2, dim=1)
    out = _lin(sd, "proj_out", _ln(tokens, 1e-6) * (1 + scale) + shift)
    c = out.shape[-1] // (p * p)
    return out.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


@pytest.mark.parametrize("name,scan", [("sigma", "mask_lower_right_corner"), ("alpha", "row_or_column_major")])
def test_ledit_changes_match_float64_reference(name, scan):
    ours = randomize_(LEDiTPixArtTransformer2DModel(**CONFIGS[name], **LEDIT_ON, causal_scan=scan), 3, std=0.2)
    assert torch.count_nonzero(ours.locality_conv.conv.weight) > 0
    x, kwargs = pixart_inputs(name, 12, 8)  # a 6 x 4 grid, not the 4 x 4 training grid: scaling is active
    factor = math.sqrt(math.log(24) / math.log(16))
    got = run(ours, x, kwargs, attention_kwargs={"locality_dilation": 1})
    want = reference_pixart(ours.state_dict(), CONFIGS[name], x, kwargs["encoder_hidden_states"], kwargs["timestep"],
                            kwargs["encoder_attention_mask"], kwargs.get("added_cond_kwargs"),
                            layout=LEDIT_ON["attention_layout"], scan=scan, factor=factor)
    assert rel_err(got, want) <= 1e-5
    # the mask, the scaling and the text mask each change the answer, so the match above checks all three
    as_self = reference_pixart(ours.state_dict(), CONFIGS[name], x, kwargs["encoder_hidden_states"],
                               kwargs["timestep"], kwargs["encoder_attention_mask"], kwargs.get("added_cond_kwargs"),
                               factor=factor)
    assert rel_err(run(ours, x, kwargs, attention_kwargs={"causal_to_self": True}), as_self) <= 1e-5
    assert rel_err(as_self, want) > 1e-3
    assert rel_err(run(ours, x, kwargs, attention_kwargs={"scaling": "none"}), want) > 1e-4
    unmasked = dict(kwargs, encoder_attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert rel_err(run(ours, x, unmasked), got) > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize_(LEDiTPixArtTransformer2DModel(**SIGMA, **LEDIT_ON), 4, std=0.2).train()
    x, kwargs = pixart_inputs("sigma", 8, 12)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        model(x, **kwargs, attention_kwargs={"locality_dilation": 2}).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.count_nonzero(grads[0]["locality_conv.conv.weight"]) > 0
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7), name


#################################################################################
#                          Surgery on diffusers PixArt folders                  #
#################################################################################

@pytest.fixture()
def pipeline_folder(tmp_path):
    ref = stock("sigma", seed=5)
    folder = tmp_path / "pixart-sigma"
    ref.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    return folder, ref


def test_surgery_copies_every_tensor_and_adds_a_zero_conv(pipeline_folder, tmp_path):
    folder, ref = pipeline_folder
    out = tmp_path / "ledit"
    result = surgery_to_folder(str(folder), out, SurgeryOptions())
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
                                       "modeling_ledit.py", "modeling_ledit_attention.py",
                                       "modeling_ledit_pixart.py", "modeling_ledit_positions.py", "provenance.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "LEDiTPixArtTransformer2DModel"
    assert cfg["auto_map"] == {"AutoModel": "modeling_ledit_pixart.LEDiTPixArtTransformer2DModel"}
    assert cfg["position_encoding"] == "none" and cfg["attention_layout"] == ["self", "causal"]
    assert cfg["locality"] == "full" and cfg["attention_scaling"] == "log" and cfg["interpolation_scale"] == 2
    written = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    source = ref.state_dict()
    assert set(written) == set(source) | {"locality_conv.conv.weight", "locality_conv.conv.bias"}
    for k, v in source.items():
        assert torch.equal(written[k], v), k
    assert torch.count_nonzero(written["locality_conv.conv.weight"]) == 0
    assert torch.count_nonzero(written["locality_conv.conv.bias"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"]["format"] == "diffusers-pixart" and prov["source"]["sha256"] == result.sha256
    assert "text-to-image" in (out / "README.md").read_text()
    with pytest.raises(ConfigError, match="already an LEDiT"):
        surgery_to_folder(str(out), tmp_path / "twice", SurgeryOptions())


def test_converted_model_is_diffusers_minus_the_table(pipeline_folder, tmp_path):
    folder, ref = pipeline_folder
    surgery_to_folder(str(folder / "transformer"), tmp_path / "plain", SurgeryOptions(causal_layers="none",
                                                                                       locality="none"))
    plain = LEDiTPixArtTransformer2DModel.from_pretrained(tmp_path / "plain").eval()
    surgery_to_folder(str(folder), tmp_path / "full", SurgeryOptions())  # zero conv: only causality differs
    full = LEDiTPixArtTransformer2DModel.from_pretrained(tmp_path / "full").eval()
    causal_only = LEDiTPixArtTransformer2DModel(**dict(plain.config, attention_layout=["self", "causal"])).eval()
    causal_only.load_state_dict(plain.state_dict())
    ref.pos_embed.pos_embed = None  # diffusers' PatchEmbed then adds no table
    for height, width, scaling in ((8, 8, "log"), (12, 8, "none")):  # log scaling is a factor 1 at 8 x 8
        x, kwargs = pixart_inputs("sigma", height, width)
        opts = {"attention_kwargs": {"scaling": scaling}}
        assert rel_err(run(plain, x, kwargs, **opts), run(ref, x, kwargs)) <= 1e-6
        assert rel_err(run(full, x, kwargs, **opts), run(causal_only, x, kwargs, **opts)) <= 1e-6


def test_legacy_transformer2d_config_reads_as_pixart(pipeline_folder):
    folder, _ = pipeline_folder
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())  # PixArt-alpha's hub folders: Transformer2DModel and its extra keys
    cfg.update(_class_name="Transformer2DModel", use_linear_projection=False, only_cross_attention=False)
    cfg_path.write_text(json.dumps(cfg))
    ckpt = read_checkpoint(str(folder))
    assert ckpt.family == "pixart" and ckpt.format == "diffusers-pixart"
    assert "use_linear_projection" not in ckpt.config and ckpt.config["interpolation_scale"] == 2


def test_reload_in_plain_diffusers_without_ledit_convert(pipeline_folder, tmp_path):
    folder, _ = pipeline_folder
    out = tmp_path / "ledit"
    surgery_to_folder(str(folder), out, SurgeryOptions(scan="row_or_column_major"))
    ours = LEDiTPixArtTransformer2DModel.from_pretrained(out).eval()
    with torch.no_grad():  # a non-zero conv so the reload proves the conv weights travel too
        ours.locality_conv.conv.weight.normal_(0, 0.05)
    ours.save_pretrained(out)  # save_pretrained writes both code files and the auto_map again
    code = (out / "modeling_ledit_pixart.py").read_text()
    assert "\nfrom .modeling_ledit import " in code and "\nfrom .modeling_ledit_attention import " in code
    assert "from .dit import" not in code and "from .attention import" not in code
    x, kwargs = pixart_inputs("sigma", 12, 8)
    reload = RELOAD.replace('model(data["x"], timestep=data["t"], class_labels=data["y"])',
                            'model(data["x"], **data["kwargs"])')
    assert reload != RELOAD
    got = run_without_ledit_convert(tmp_path, out, {"x": x, "kwargs": kwargs}, reload)
    assert "ledit_convert" not in got["cls"] and "modeling_ledit_pixart" in got["cls"]
    assert torch.equal(got["out"], run(ours, x, kwargs))


def test_cli_converts_a_pixart_pipeline_folder(pipeline_folder, tmp_path):
    folder, _ = pipeline_folder
    result = CliRunner().invoke(app, ["surgery", str(folder), "-o", str(tmp_path / "out"), "--scan",
                                      "row_or_column_major"])
    assert result.exit_code == 0, result.output
    assert "diffusers-pixart" in result.output and "SA CA" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["causal_scan"] == "row_or_column_major"


def test_folder_that_is_neither_pixart_nor_dit(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "norm_type": None}))
    with pytest.raises(CheckpointError, match="'UNet2DConditionModel', not a DiT, PixArt or SD3 transformer"):
        read_checkpoint(str(folder))
    result = CliRunner().invoke(app, ["surgery", str(folder), "-o", str(tmp_path / "out")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scan", ["mask_lower_right_corner", "row_or_column_major"])
def test_pixart_blocks_trace_as_one_graph_each_through_the_shared_compile(scan):
    """compile_blocks finds PixArt's blocks; each (self and causal, with cross-attention and a text mask) traces
    with no graph break and computes what the eager model does, at the training size and another."""
    import copy

    from ledit_convert.models.compiling import compile_blocks, repeated_blocks
    eager = randomize_(LEDiTPixArtTransformer2DModel(**SIGMA, **dict(LEDIT_ON, causal_scan=scan)), 0, std=0.2)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == SIGMA["num_layers"]
    for block in repeated_blocks(compiled):  # the cheap "eager" backend: tracing is what is tested here
        block._compiled_call_impl = torch.compile(block._call_impl, backend="eager", fullgraph=True)
    for height, width in ((8, 8), (12, 8)):
        x, kwargs = pixart_inputs("sigma", height, width)
        ref = run(eager, x, kwargs, attention_kwargs={"locality_dilation": 1})
        out = run(compiled, x, kwargs, attention_kwargs={"locality_dilation": 1})
        assert rel_err(out, ref) <= 1e-6
