"""The command line: exit codes, one-line errors without tracebacks, no partial output."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from factories import facebook_state_dict
from ledit_convert.cli import app
from test_checkpoints import _bad_files

runner = CliRunner()


@pytest.fixture()
def dit(tmp_path):
    torch.save(facebook_state_dict(seed=21), tmp_path / "dit.pt")
    return tmp_path / "dit.pt"


def test_help_lists_commands():
    result = runner.invoke(app, [])
    assert "surgery" in result.output and "inspect" in result.output


def test_surgery_then_inspect(dit, tmp_path):
    out = tmp_path / "ledit"
    result = runner.invoke(app, ["surgery", str(dit), "-o", str(out), "--num-heads", "4", "--causal-layers", "0,1"])
    assert result.exit_code == 0, result.output
    assert "removed the 2D sin/cos positional encoding" in result.output
    assert "CA CA SA SA" in result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "ledit" and info["causal_blocks"] == [0, 1] and info["locality_conv_zero"] is True


def test_bad_inputs_exit_nonzero_with_one_line(tmp_path):
    for name in _bad_files(tmp_path):
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["surgery", str(tmp_path / name), "-o", str(out), "--num-heads", "4"])
        assert result.exit_code == 2, (name, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], (name, result.stderr)
        assert "Traceback" not in result.output + result.stderr
        assert not out.exists()
    assert not (tmp_path / "PWNED").exists()


def test_existing_output_and_bad_option(dit, tmp_path):
    out = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(dit), "-o", str(out), "--num-heads", "4"]).exit_code == 0
    again = runner.invoke(app, ["surgery", str(dit), "-o", str(out), "--num-heads", "4"])
    assert again.exit_code == 5 and "--overwrite" in again.stderr
    bad = runner.invoke(app, ["surgery", str(dit), "-o", str(tmp_path / "x"), "--num-heads", "4", "--scan", "zig"])
    assert bad.exit_code == 3 and "--scan 'zig'" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "text.pt").write_text("nope")
    result = runner.invoke(app, ["--debug", "surgery", str(tmp_path / "text.pt"), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and result.exception is not None


def test_sample_command(tmp_path):
    from _tiny import tiny_ledit, tiny_vae
    model = tiny_ledit()
    model.save_pretrained(tmp_path / "model")
    tiny_vae().save_pretrained(tmp_path / "vae")
    args = ["sample", str(tmp_path / "model"), "--vae", str(tmp_path / "vae"), "--steps", "2", "--class-labels",
            "1,2,3", "--num-samples", "4", "-o", str(tmp_path / "s"), "--npz", "--device", "cpu"]
    result = runner.invoke(app, args + ["--height", "16", "--width", "32"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "grid.png" in files and any(f.endswith(".npz") for f in files)
    assert len([f for f in files if f.endswith("png") and f != "grid.png"]) == 4
    bad = runner.invoke(app, args + ["--height", "17", "--overwrite"])
    assert bad.exit_code == 3 and "17" in bad.stderr and "Traceback" not in bad.stderr
    bad = runner.invoke(app, ["sample", str(tmp_path / "model"), "--vae", str(tmp_path / "vae"), "--class-labels",
                              "99", "-o", str(tmp_path / "t")])
    assert bad.exit_code == 3 and "99" in bad.stderr
    assert not (tmp_path / "t").exists()


def one_line_error(result, code, text):
    """The command failed with `code` and a single stderr line naming `text`, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_sample_pixel_space_model_needs_no_vae(tmp_path):
    from _tiny import tiny_ledit, tiny_vae
    tiny_ledit(in_channels=3, out_channels=6).save_pretrained(tmp_path / "pixels")
    tiny_ledit().save_pretrained(tmp_path / "latents")
    tiny_vae().save_pretrained(tmp_path / "vae")
    args = ["--steps", "2", "--num-samples", "2", "--height", "16", "--width", "24", "--device", "cpu"]
    for i, vae in enumerate([[], ["--vae", "none"]]):  # no download of DiT's VAE for a pixel-space model
        result = runner.invoke(app, ["sample", str(tmp_path / "pixels"), "-o", str(tmp_path / f"s{i}")] + vae + args)
        assert result.exit_code == 0, result.output
        assert Image.open(tmp_path / f"s{i}" / "000001_class1.png").size == (24, 16)
    refused = runner.invoke(app, ["sample", str(tmp_path / "pixels"), "--vae", str(tmp_path / "vae"),
                                  "-o", str(tmp_path / "x")] + args)
    one_line_error(refused, 3, "is a pixel-space model")
    refused = runner.invoke(app, ["sample", str(tmp_path / "latents"), "--vae", "none", "-o", str(tmp_path / "x")]
                            + args)
    one_line_error(refused, 3, "--vae none means pixel space")
    assert not (tmp_path / "x").exists()


def test_sample_a_dit_checkpoint_file_in_both_position_modes(tmp_path):
    torch.save(facebook_state_dict(seed=3, in_ch=3, depth=2), tmp_path / "dit.pt")  # pixel space, 8 px training size
    base = ["sample", str(tmp_path / "dit.pt"), "--num-heads", "4", "--steps", "2", "--num-samples", "2", "--npz",
            "--no-png", "--device", "cpu"]
    batches = {}
    for size in ("8", "16"):
        for mode in ("extrapolate", "interpolate"):
            out = tmp_path / f"{mode}{size}"
            result = runner.invoke(app, base + ["--height", size, "--width", size, "--position-mode", mode,
                                                "-o", str(out)])
            assert result.exit_code == 0, result.output
            with np.load(out / f"samples_2x{size}x{size}x3.npz") as npz:
                batches[mode, size] = npz["arr_0"]
    # The two modes share the table at the training grid and differ beyond it.
    assert np.array_equal(batches["extrapolate", "8"], batches["interpolate", "8"])
    assert not np.array_equal(batches["extrapolate", "16"], batches["interpolate", "16"])
    refused = runner.invoke(app, base[:2] + ["-o", str(tmp_path / "x")])
    one_line_error(refused, 2, "pass --num-heads")
    assert not (tmp_path / "x").exists()
