"""The demo runs end to end at a tiny scale, offline, and its folder reloads in plain diffusers."""
import torch
from PIL import Image
from typer.testing import CliRunner

from ledit_convert.cli import app
from ledit_convert.demo import BASE_CHECKPOINT, SHIPPED_LEDIT, DemoSettings, run_demo
from ledit_convert.models.dit import LEDiTTransformer2DModel
from test_surgery import run_without_ledit_convert


def test_shipped_base_is_a_stock_dit_in_facebook_format():
    sd = torch.load(BASE_CHECKPOINT, weights_only=True)
    assert "pos_embed" in sd and sd["x_embedder.proj.weight"].shape == (128, 3, 2, 2)
    assert BASE_CHECKPOINT.stat().st_size < 11 * 2 ** 20


def test_shipped_ledit_reloads_in_plain_diffusers(tmp_path):
    """The shipped LEDiT folder carries its own code: plain diffusers (ledit_convert blocked) gives the package's
    outputs, at the training size and at 2x."""
    ours = LEDiTTransformer2DModel.from_pretrained(SHIPPED_LEDIT).eval()
    assert ours.config.position_encoding == "none" and "pos_embed" not in ours.state_dict()
    g = torch.Generator().manual_seed(0)
    for size in (32, 64):
        data = {"x": torch.randn(2, 3, size, size, generator=g), "t": torch.tensor([10, 700]),
                "y": torch.tensor([0, 3])}
        (tmp_path / str(size)).mkdir()
        got = run_without_ledit_convert(tmp_path / str(size), SHIPPED_LEDIT, data)
        with torch.no_grad():
            want = ours(data["x"], timestep=data["t"], class_labels=data["y"]).sample
        torch.testing.assert_close(got["out"], want, rtol=1e-5, atol=1e-5)


def test_demo_tiny(tmp_path):
    settings = DemoSettings(steps=2, batch_size=4, images=16, sample_steps=2, per_class=1)
    result = run_demo(tmp_path / "demo", settings, say=lambda msg: None)
    assert [r["name"].split(",")[0] for r in result.rows] == ["DiT", "DiT", "LEDiT", "LEDiT"]
    assert Image.open(result.sheet).size[0] > 8 * 64
    assert result.reload_max_abs_diff == 0.0
    assert (result.finetuned_dir / "modeling_ledit.py").exists()


def test_demo_refuses_non_empty_output(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(tmp_path / "d"), "--steps", "1"])
    assert result.exit_code == 5 and "--overwrite" in result.stderr
