"""Surgery: each step, the written folder, atomicity, and reload in plain diffusers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import ledit_convert.conversion.export as export
import ledit_convert.models.dit as dit_model
from factories import facebook_state_dict, inputs
from ledit_convert.conversion.checkpoints import build_model, read_checkpoint
from ledit_convert.errors import ConfigError, OutputExistsError
from ledit_convert.models.dit import LEDiTTransformer2DModel
from ledit_convert.conversion.surgery import SurgeryOptions, parse_causal_layers, surgery_to_folder


@pytest.fixture()
def dit_file(tmp_path):
    sd = facebook_state_dict(seed=11)
    torch.save(sd, tmp_path / "dit.pt")
    return tmp_path / "dit.pt", sd


def test_parse_causal_layers():
    assert parse_causal_layers("alternate", 4) == ["self", "causal", "self", "causal"]
    assert parse_causal_layers("all", 3) == ["causal"] * 3
    assert parse_causal_layers("none", 2) == ["self"] * 2
    assert parse_causal_layers("0,2", 4) == ["causal", "self", "causal", "self"]
    with pytest.raises(ConfigError, match="0..3"):
        parse_causal_layers("1,7", 4)
    with pytest.raises(ConfigError, match="comma list"):
        parse_causal_layers("every-other", 4)


def test_xl_layout_has_fourteen_causal_blocks():
    layout = parse_causal_layers("alternate", 28)
    assert layout.count("causal") == 14 and layout[0] == "self"


def test_surgery_writes_a_self_describing_folder(dit_file, tmp_path):
    src, sd = dit_file
    out = tmp_path / "ledit"
    result = surgery_to_folder(str(src), out, SurgeryOptions(), num_heads=4)
    files = sorted(os.listdir(out))
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "modeling_ledit.py",
                     "modeling_ledit_attention.py", "modeling_ledit_positions.py", "provenance.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "LEDiTTransformer2DModel"
    assert cfg["auto_map"] == {"AutoModel": "modeling_ledit.LEDiTTransformer2DModel"}
    assert cfg["attention_layout"] == ["self", "causal", "self", "causal"]
    assert cfg["causal_scan"] == "mask_lower_right_corner" and cfg["position_encoding"] == "none"
    assert cfg["attention_scaling"] == "log" and cfg["locality"] == "full"
    assert cfg["locality_dilation_prob"] == 0.1 and cfg["locality_dilation_rates"] == [2]
    written = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    for k, v in sd.items():  # every source tensor but the table, bit-exact
        if k != "pos_embed":
            assert torch.equal(written[k], v), k
    assert "pos_embed" not in written
    assert torch.count_nonzero(written["locality_conv.conv.weight"]) == 0
    assert torch.count_nonzero(written["locality_conv.conv.bias"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    import hashlib
    assert prov["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() == result.sha256
    assert prov["options"]["scan"] == "mask_lower_right_corner" and prov["tool_version"]
    assert (out / "modeling_ledit.py").read_text() == dit_model.remote_code_text(dit_model.__file__)
    code = (out / "modeling_ledit.py").read_text()
    assert "\nfrom .modeling_ledit_positions import " in code and "\nfrom .modeling_ledit_attention import " in code
    assert "\nfrom .modeling_ledit_positions import " in (out / "modeling_ledit_attention.py").read_text()


def test_converted_model_differs_from_dit_only_by_pe_and_causality(dit_file, tmp_path):
    src, _ = dit_file
    surgery_to_folder(str(src), tmp_path / "ledit", SurgeryOptions(), num_heads=4)
    ledit = LEDiTTransformer2DModel.from_pretrained(tmp_path / "ledit").eval()
    dit = build_model(read_checkpoint(str(src), num_heads=4))
    dit.register_to_config(position_encoding="none", attention_layout=ledit.config.attention_layout)
    for block, kind in zip(dit.blocks, ledit.config.attention_layout):
        block.causal = kind == "causal"
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(ledit(x, t, y).sample, dit(x, t, y).sample, atol=1e-6)


@pytest.mark.parametrize("opts,shape", [
    (SurgeryOptions(locality="depthwise"), (64, 1, 3, 3)),
    (SurgeryOptions(locality="full", kernel_size=5, post_norm=True), (64, 64, 5, 5)),
    (SurgeryOptions(locality="none", causal_layers="all", scan="one_dimension"), None),
])
def test_ablation_options(dit_file, tmp_path, opts, shape):
    src, _ = dit_file
    surgery_to_folder(str(src), tmp_path / "o", opts, num_heads=4)
    model = LEDiTTransformer2DModel.from_pretrained(tmp_path / "o")
    if shape is None:
        assert model.locality_conv is None
        assert model.config.attention_layout == ["causal"] * 4
    else:
        assert tuple(model.locality_conv.conv.weight.shape) == shape
        assert (model.locality_conv.norm is not None) == opts.post_norm


def test_bad_options_reported_together(dit_file, tmp_path):
    src, _ = dit_file
    with pytest.raises(ConfigError) as e:
        surgery_to_folder(str(src), tmp_path / "o", SurgeryOptions(scan="zigzag", dilation_prob=1.5), num_heads=4)
    assert "--scan 'zigzag'" in str(e.value) and "--dilation-prob 1.5" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_ledit_source_is_refused(dit_file, tmp_path):
    src, _ = dit_file
    surgery_to_folder(str(src), tmp_path / "once", SurgeryOptions(), num_heads=4)
    with pytest.raises(ConfigError, match="already an LEDiT"):
        surgery_to_folder(str(tmp_path / "once"), tmp_path / "twice", SurgeryOptions())


def test_existing_output_needs_overwrite(dit_file, tmp_path):
    src, _ = dit_file
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        surgery_to_folder(str(src), out, SurgeryOptions(), num_heads=4)
    assert (out / "keep.txt").read_text() == "mine"
    surgery_to_folder(str(src), out, SurgeryOptions(), num_heads=4, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_write_leaves_nothing(dit_file, tmp_path, monkeypatch):
    src, _ = dit_file

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        surgery_to_folder(str(src), tmp_path / "o", SurgeryOptions(), num_heads=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.pt"]


# the head of a script that must run where ledit_convert cannot be imported (plain diffusers + remote code)
BLOCK_LEDIT_CONVERT = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ledit_convert":
                raise ImportError("ledit_convert is blocked in this process")
    sys.meta_path.insert(0, _Block())
""")
RELOAD = BLOCK_LEDIT_CONVERT + textwrap.dedent("""
    try:
        import ledit_convert
        raise SystemExit("ledit_convert was importable")
    except ImportError:
        pass
    import torch
    from diffusers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    data = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(data["x"], timestep=data["t"], class_labels=data["y"]).sample
    torch.save({"out": out, "cls": type(model).__module__}, sys.argv[3])
""")


def run_without_ledit_convert(tmp_path, folder, data: dict, script_text: str = RELOAD) -> dict:
    """`script_text` (argv: folder, inputs, output) in a fresh interpreter with its own diffusers module cache;
    the dict it saved, after checking it ran without ledit_convert."""
    torch.save(data, tmp_path / "in.pt")
    script = tmp_path / "reload.py"
    script.write_text(script_text)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "in.pt"), str(tmp_path / "o.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "o.pt")
    assert "ledit_convert" not in got["cls"]
    return got


def test_reload_in_plain_diffusers_without_ledit_convert(dit_file, tmp_path):
    src, _ = dit_file
    out = tmp_path / "ledit"
    surgery_to_folder(str(src), out, SurgeryOptions(), num_heads=4)
    ours = LEDiTTransformer2DModel.from_pretrained(out).eval()
    with torch.no_grad():  # a non-zero conv so the reload proves the conv weights travel too
        ours.locality_conv.conv.weight.normal_(0, 0.05)
    ours.save_pretrained(out)  # safetensors only; config.json and code stay
    ours = LEDiTTransformer2DModel.from_pretrained(out).eval()
    x, t, y = inputs(height=8, width=12)
    got = run_without_ledit_convert(tmp_path, out, {"x": x, "t": t, "y": y})
    with torch.no_grad():
        assert torch.equal(got["out"], ours(x, t, y).sample)
