"""SD3 / SD3.5 (MMDiT) as an LEDiT: exact against diffusers with the changes off (its table on, or switched off),
against a float64 oracle with them on, past the table's size cap; surgery and a reload in plain diffusers."""
import json
import math
import os

import pytest
import torch
from diffusers import SD3Transformer2DModel
from typer.testing import CliRunner

from _tiny import randomize_
from factories import rel_err
from reference import _conv2d, _gelu_tanh, _ln, _silu, visible
from test_pixart import _lin, _mlp, _sinusoid
from test_surgery import BLOCK_LEDIT_CONVERT, run_without_ledit_convert
from ledit_convert.cli import app
from ledit_convert.models.sd3 import LEDiTSD3Transformer2DModel

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=12)
# SD3: no q/k norms; SD3.5: RMS-normalised q/k and the image-only attn2 in its first blocks
CONFIGS = {"sd3": TINY, "sd35": dict(TINY, dual_attention_layers=(0, 1), qk_norm="rms_norm")}
LEDIT_ON = dict(position_encoding="none", attention_layout=["self", "causal", "causal"], attention_scaling="log",
                locality="full", locality_dilation_prob=0.1)


def stock(name, seed=0):
    """diffusers' SD3 with seeded non-zero weights everywhere (its zero inits would hide most of the math)."""
    return randomize_(SD3Transformer2DModel(**CONFIGS[name]), seed, std=0.2)


def sd3_inputs(height=8, width=8, seed=1, text_tokens=5):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(encoder_hidden_states=torch.randn(2, text_tokens, 12, generator=g),
                  pooled_projections=torch.randn(2, 10, generator=g), timestep=torch.tensor([10.0, 700.0]))
    return torch.randn(2, 4, height, width, generator=g), kwargs


def run(model, x, kwargs, **extra):
    with torch.no_grad():
        return model(x, **kwargs, **extra).sample


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_stock_mode_equals_diffusers_with_its_table(name):
    ref = stock(name)
    ours = LEDiTSD3Transformer2DModel(**CONFIGS[name]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for height, width in ((8, 8), (12, 8), (24, 24)):  # 24 latent cells = the table's 12 patches: its cap
        x, kwargs = sd3_inputs(height, width)
        assert rel_err(run(ours, x, kwargs), run(ref, x, kwargs)) <= 1e-6


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_without_the_table_it_equals_diffusers_with_its_table_switched_off_at_any_size(name):
    ref = stock(name)
    sd = {k: v for k, v in ref.state_dict().items() if k != "pos_embed.pos_embed"}
    ours = LEDiTSD3Transformer2DModel(**CONFIGS[name], position_encoding="none").eval()
    ours.load_state_dict(sd, strict=True)
    with torch.no_grad():
        ref.pos_embed.pos_embed.zero_()  # the table switched off
    for height, width in ((8, 8), (12, 20)):
        x, kwargs = sd3_inputs(height, width)
        assert rel_err(run(ours, x, kwargs), run(ref, x, kwargs)) <= 1e-6
    x, kwargs = sd3_inputs(32, 28)  # past pos_embed_max_size (12 patches = 24 cells): diffusers refuses
    with pytest.raises(ValueError):
        run(ref, x, kwargs)
    assert run(ours, x, kwargs).shape == (2, 4, 32, 28)


#################################################################################
#                  An independent float64 SD3 / LEDiT forward                   #
#################################################################################

def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _split_heads(x, heads):
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _qkv(sd, name, x, heads, q, k, v, qn, kn):
    out = [_split_heads(_lin(sd, f"{name}.{p}", x), heads) for p in (q, k, v)]
    if f"{name}.{qn}.weight" in sd:
        out[0], out[1] = _rms(out[0], sd[f"{name}.{qn}.weight"]), _rms(out[1], sd[f"{name}.{kn}.weight"])
    return out


def _softmax_attention(q, k, v, allowed, factor):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) * factor
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def reference_sd3(sd, cfg, x, text, pooled, t, layout=None, scan=None, factor=1.0, text_view="all"):
    """float64 SD3 / LEDiT MMDiT forward from a state dict in diffusers' names: no table, optional conv."""
    sd = {k: v.double() for k, v in sd.items()}
    p, heads = cfg["patch_size"], cfg["num_attention_heads"]
    dim = heads * cfg["attention_head_dim"]
    b, _, hh, ww = x.shape
    h, w = hh // p, ww // p
    n = h * w
    patches = x.double().reshape(b, -1, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, n, -1)
    img = patches @ sd["pos_embed.proj.weight"].reshape(dim, -1).T + sd["pos_embed.proj.bias"]
    if "locality_conv.conv.weight" in sd:
        grid = img.transpose(1, 2).reshape(b, dim, h, w)
        img = img + _conv2d(grid, sd["locality_conv.conv.weight"], sd["locality_conv.conv.bias"], 1, 1).flatten(2).transpose(1, 2)
    temb = _mlp(sd, "time_text_embed.timestep_embedder", _sinusoid(t), _silu)
    temb = temb + _mlp(sd, "time_text_embed.text_embedder", pooled.double(), _silu)
    ctx = _lin(sd, "context_embedder", text.double())
    tt = ctx.shape[1]
    for i, kind in enumerate(layout or ["self"] * cfg["num_layers"]):
        pre = f"transformer_blocks.{i}."
        last = i == cfg["num_layers"] - 1
        dual = i in cfg.get("dual_attention_layers", ())
        mods = _lin(sd, pre + "norm1.linear", _silu(temb)).chunk(9 if dual else 6, dim=1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        norm_in = _ln(img, 1e-6)  # the block input, normalised: both image attentions start from it
        norm_img = norm_in * (1 + scale[:, None]) + shift[:, None]
        if last:  # AdaLayerNormContinuous: scale first, then shift
            c_scale, c_shift = _lin(sd, pre + "norm1_context.linear", _silu(temb)).chunk(2, dim=1)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
                _lin(sd, pre + "norm1_context.linear", _silu(temb)).chunk(6, dim=1)
        norm_ctx = _ln(ctx, 1e-6) * (1 + c_scale[:, None]) + c_shift[:, None]
        qi, ki, vi = _qkv(sd, pre + "attn", norm_img, heads, "to_q", "to_k", "to_v", "norm_q", "norm_k")
        qc, kc, vc = _qkv(sd, pre + "attn", norm_ctx, heads, "add_q_proj", "add_k_proj", "add_v_proj",
                          "norm_added_q", "norm_added_k")
        allowed = None
        if kind == "causal":  # image queries: their scan over images, every text key; text queries: text_view
            allowed = torch.ones(n + tt, n + tt, dtype=torch.bool)
            allowed[:n, :n] = visible(scan, h, w)
            if text_view == "text":
                allowed[n:, :n] = False
        joint = _softmax_attention(torch.cat([qi, qc], 2), torch.cat([ki, kc], 2), torch.cat([vi, vc], 2), allowed,
                                   factor)
        img = img + gate[:, None] * _lin(sd, pre + "attn.to_out.0", joint[:, :n])
        if dual:  # SD3.5: image-only attention on its own modulation, masked with the scan in causal blocks
            shift2, scale2, gate2 = mods[6:]
            q2, k2, v2 = _qkv(sd, pre + "attn2", norm_in * (1 + scale2[:, None]) + shift2[:, None], heads,
                              "to_q", "to_k", "to_v", "norm_q", "norm_k")
            own = _softmax_attention(q2, k2, v2, visible(scan, h, w) if kind == "causal" else None, factor)
            img = img + gate2[:, None] * _lin(sd, pre + "attn2.to_out.0", own)
        norm_img = _ln(img, 1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        img = img + gate_mlp[:, None] * _lin(sd, pre + "ff.net.2", _gelu_tanh(_lin(sd, pre + "ff.net.0.proj", norm_img)))
        if not last:
            ctx = ctx + c_gate[:, None] * _lin(sd, pre + "attn.to_add_out", joint[:, n:])
            norm_ctx = _ln(ctx, 1e-6) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            ctx = ctx + c_gate_mlp[:, None] * _lin(sd, pre + "ff_context.net.2",
                                                    _gelu_tanh(_lin(sd, pre + "ff_context.net.0.proj", norm_ctx)))
    scale, shift = _lin(sd, "norm_out.linear", _silu(temb)).chunk(2, dim=1)
    out = _lin(sd, "proj_out", _ln(img, 1e-6) * (1 + scale[:, None]) + shift[:, None])
    c = out.shape[-1] // (p * p)
    return out.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


@pytest.mark.parametrize("name,scan,text_view", [("sd3", "mask_lower_right_corner", "all"),
                                                 ("sd35", "row_or_column_major", "text")])
def test_ledit_changes_match_float64_reference(name, scan, text_view):
    cfg = CONFIGS[name]
    ours = randomize_(LEDiTSD3Transformer2DModel(**cfg, **LEDIT_ON, causal_scan=scan, causal_text=text_view), 3,
                      std=0.2)
    x, kwargs = sd3_inputs(12, 8)  # a 6 x 4 grid, not the 4 x 4 training grid: scaling is active
    factor = math.sqrt(math.log(24) / math.log(16))
    args = (ours.state_dict(), cfg, x, kwargs["encoder_hidden_states"], kwargs["pooled_projections"],
            kwargs["timestep"])
    got = run(ours, x, kwargs, joint_attention_kwargs={"locality_dilation": 1})
    want = reference_sd3(*args, layout=LEDIT_ON["attention_layout"], scan=scan, factor=factor, text_view=text_view)
    assert rel_err(got, want) <= 1e-5
    # the masks and the scaling each change the answer, so the match above checks them
    as_self = reference_sd3(*args, factor=factor)
    assert rel_err(run(ours, x, kwargs, joint_attention_kwargs={"causal_to_self": True}), as_self) <= 1e-5
    assert rel_err(as_self, want) > 1e-3
    assert rel_err(run(ours, x, kwargs, joint_attention_kwargs={"scaling": "none"}), want) > 1e-4
    xb, kb = sd3_inputs(32, 28)  # 16 x 14 patches: past the stock table's 12 x 12 cap
    big = reference_sd3(ours.state_dict(), cfg, xb, kb["encoder_hidden_states"], kb["pooled_projections"],
                        kb["timestep"], layout=LEDIT_ON["attention_layout"], scan=scan, text_view=text_view,
                        factor=math.sqrt(math.log(224) / math.log(16)))
    assert rel_err(run(ours, xb, kb, joint_attention_kwargs={"locality_dilation": 1}), big) <= 1e-5
    other = "text" if text_view == "all" else "all"
    assert rel_err(reference_sd3(*args, layout=LEDIT_ON["attention_layout"], scan=scan, factor=factor,
                                 text_view=other), want) > 1e-4


#################################################################################
#                             Surgery and reload                                #
#################################################################################

@pytest.fixture(params=["sd3", "sd35"])
def pipeline_folder(tmp_path, request):
    ref = stock(request.param, seed=5)
    folder = tmp_path / request.param
    ref.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder, ref, request.param


def test_surgery_copies_every_tensor_but_the_table_and_adds_a_zero_conv(pipeline_folder, tmp_path):
    from safetensors.torch import load_file

    from ledit_convert.conversion.surgery import SurgeryOptions, surgery_to_folder
    folder, ref, name = pipeline_folder
    out = tmp_path / "ledit"
    result = surgery_to_folder(str(folder), out, SurgeryOptions())
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
                                       "modeling_ledit.py", "modeling_ledit_attention.py",
                                       "modeling_ledit_positions.py", "modeling_ledit_sd3.py", "provenance.json"]
    written = load_file(out / "diffusion_pytorch_model.safetensors")
    source = ref.state_dict()
    assert set(written) == (set(source) - {"pos_embed.pos_embed"}) | {"locality_conv.conv.weight",
                                                                     "locality_conv.conv.bias"}
    for k, v in source.items():
        if k in written:
            assert torch.equal(written[k], v), k
    assert torch.count_nonzero(written["locality_conv.conv.weight"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "LEDiTSD3Transformer2DModel" and cfg["position_encoding"] == "none"
    assert cfg["attention_layout"] == ["self", "causal", "self"] and cfg["causal_text"] == "all"
    assert cfg["auto_map"] == {"AutoModel": "modeling_ledit_sd3.LEDiTSD3Transformer2DModel"}
    assert list(cfg["dual_attention_layers"]) == list(CONFIGS[name].get("dual_attention_layers", ()))
    assert result.source["format"] == "diffusers-sd3"
    assert any("size cap" in c for c in result.changes)


def test_converted_model_is_diffusers_minus_the_table_and_passes_its_size_cap(pipeline_folder, tmp_path):
    from ledit_convert.conversion.surgery import SurgeryOptions, surgery_to_folder
    folder, ref, _ = pipeline_folder
    surgery_to_folder(str(folder), tmp_path / "ledit", SurgeryOptions(attention_scaling="none"))
    ours = LEDiTSD3Transformer2DModel.from_pretrained(tmp_path / "ledit").eval()
    with torch.no_grad():
        ref.pos_embed.pos_embed.zero_()
    x, kwargs = sd3_inputs(12, 8)
    assert rel_err(run(ours, x, kwargs, joint_attention_kwargs={"causal_to_self": True}), run(ref, x, kwargs)) <= 1e-6
    assert rel_err(run(ours, x, kwargs), run(ref, x, kwargs)) > 1e-4  # the causal block changes the answer
    x, kwargs = sd3_inputs(40, 16)
    assert torch.isfinite(run(ours, x, kwargs)).all()


def test_reload_in_plain_diffusers_without_ledit_convert(pipeline_folder, tmp_path):
    from ledit_convert.conversion.surgery import SurgeryOptions, surgery_to_folder
    folder, _, _ = pipeline_folder
    out = tmp_path / "ledit"
    surgery_to_folder(str(folder), out, SurgeryOptions(scan="row_or_column_major"))
    ours = LEDiTSD3Transformer2DModel.from_pretrained(out).eval()
    with torch.no_grad():  # a non-zero conv so the reload proves the conv weights travel too
        ours.locality_conv.conv.weight.normal_(0, 0.05)
    ours.save_pretrained(out)
    code = (out / "modeling_ledit_sd3.py").read_text()
    assert "\nfrom .modeling_ledit import " in code and "\nfrom .modeling_ledit_attention import (" in code
    assert "from .dit import" not in code and "from .attention import" not in code
    x, kwargs = sd3_inputs(12, 8)
    script = BLOCK_LEDIT_CONVERT + "\n".join([
        "import torch", "from diffusers import AutoModel",
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()",
        "data = torch.load(sys.argv[2])",
        "with torch.no_grad():", "    out = model(data['x'], **data['kwargs']).sample",
        "torch.save({'out': out, 'cls': type(model).__module__}, sys.argv[3])", ""])
    got = run_without_ledit_convert(tmp_path, out, {"x": x, "kwargs": kwargs}, script)
    assert "ledit_convert" not in got["cls"] and "modeling_ledit_sd3" in got["cls"]
    assert torch.equal(got["out"], run(ours, x, kwargs))


def test_cli_converts_an_sd3_pipeline_folder_and_inspects_it(pipeline_folder, tmp_path):
    folder, _, name = pipeline_folder
    runner = CliRunner()
    result = runner.invoke(app, ["surgery", str(folder), "-o", str(tmp_path / "out"), "--causal-layers", "all"])
    assert result.exit_code == 0, result.output
    assert "diffusers-sd3" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["causal_blocks"] == [0, 1, 2] and summary["position_encoding"] == "none"
    assert summary["dual_attention_layers"] == list(CONFIGS[name].get("dual_attention_layers", ()))


def test_an_ledit_sd3_config_with_bad_values_names_them():
    with pytest.raises(ValueError, match="causal_text 'image' is not one of .* dual_attention_layers \\[7\\]"):
        LEDiTSD3Transformer2DModel(**dict(TINY, causal_text="image", dual_attention_layers=(7,)))
    with pytest.raises(ValueError, match="joint_attention_kwargs \\['ip_adapter_image_embeds'\\] are not supported"):
        x, kwargs = sd3_inputs()
        LEDiTSD3Transformer2DModel(**TINY)(x, **kwargs, joint_attention_kwargs={"ip_adapter_image_embeds": 1})
