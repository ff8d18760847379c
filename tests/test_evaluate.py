"""evaluate: spec parsing, the report files, and the command end to end on tiny models."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _tiny import tiny_ledit, tiny_vae
from factories import facebook_state_dict
from ledit_convert.cli import app
from ledit_convert.errors import ConfigError
from ledit_convert.evaluation.evaluate import (markdown_table, parse_model_spec, parse_references, parse_resolution,
                                    plot_metric, tick_labels)


def test_parse_specs_and_resolutions():
    spec = parse_model_spec("base=runs/dit.pt@interpolate")
    assert (spec.name, spec.path, spec.position_mode) == ("base", "runs/dit.pt", "interpolate")
    assert parse_model_spec("runs/model").name == "model"
    assert parse_resolution("512") == (512, 512) and parse_resolution("384x512") == (384, 512)
    with pytest.raises(ConfigError):
        parse_model_spec("x@sideways")
    with pytest.raises(ConfigError):
        parse_resolution("big")
    refs = parse_references(["ref/", "512=r512.npz"], [(256, 256), (512, 512)])
    assert refs == {(256, 256): "ref/", (512, 512): "r512.npz"}
    with pytest.raises(ConfigError, match="384x512"):
        parse_references(["256=a"], [(256, 256), (384, 512)])


def test_markdown_and_plot(tmp_path):
    rows = [{"model": m, "resolution": r, "fid": f} for m, r, f in
            [("a", "32", 10.0), ("a", "64", 50.0), ("b", "32", 12.0), ("b", "64", 20.0)]]
    md = markdown_table(rows)
    assert "| a | 10.00 | 50.00 |" in md and "| model | 32 | 64 |" in md
    path = plot_metric(rows, str(tmp_path / "p.png"))
    assert Image.open(path).size == (720, 420)


def test_evaluate_command_end_to_end(tmp_path):
    tiny_ledit().save_pretrained(tmp_path / "ledit")
    tiny_vae().save_pretrained(tmp_path / "vae")
    sd = facebook_state_dict(seed=2, hidden=384, depth=1, classes=10, grid=4, std=0.02)  # a DiT-S-wide file
    torch.save(sd, tmp_path / "dit.pt")
    rng = np.random.default_rng(0)
    (tmp_path / "ref").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    result = CliRunner().invoke(app, [
        "evaluate", "--model", f"ledit={tmp_path / 'ledit'}", "--model", f"dit={tmp_path / 'dit.pt'}@extrapolate",
        "--resolutions", "16,16x32", "--reference", str(tmp_path / "ref"), "--num-samples", "5", "--steps", "2",
        "--vae", str(tmp_path / "vae"), "--device", "cpu", "--batch-size", "5", "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    got = {(r["model"], r["resolution"]) for r in data["rows"]}
    assert got == {("ledit", "16"), ("ledit", "16x32"), ("dit", "16"), ("dit", "16x32")}
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["precision"] is not None for r in data["rows"])
    assert (tmp_path / "eval" / "fid.png").exists() and "| ledit |" in (tmp_path / "eval" / "results.md").read_text()


def test_evaluate_compiles_per_model_and_falls_back(tmp_path, monkeypatch, caplog):
    """--compile reaches the sampler; a compile failure at a resolution's first batch goes on eagerly."""
    from torch._dynamo.exc import TorchDynamoException

    from ledit_convert.evaluation.evaluate import pipeline_generator
    tiny_ledit().save_pretrained(tmp_path / "ledit")
    tiny_vae().save_pretrained(tmp_path / "vae")
    settings = dict(num_samples=3, steps=1, cfg_scale=1.5, guidance_channels=3, scheduler="ddim", seed=0,
                    batch_size=2, device="cpu", dtype="fp32")
    spec = parse_model_spec(f"ledit={tmp_path / 'ledit'}")
    eager = pipeline_generator(settings, str(tmp_path / "vae"))(spec, (16, 32))
    calls = []

    def fake_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise TorchDynamoException("no compiler here")
        return compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    with caplog.at_level("WARNING"):
        fallback = pipeline_generator(dict(settings, compile=True), str(tmp_path / "vae"))(spec, (16, 32))
    assert calls and "sampling continues in eager mode" in caplog.text
    assert np.array_equal(fallback, eager)


def test_plot_ticks_read_apart_at_every_scale():
    for top in (0.0110, 0.275, 2.7, 330.0):
        labels = tick_labels(top)
        assert len(set(labels)) == 6 and float(labels[-1]) == pytest.approx(top, rel=0.02)
    assert tick_labels(300.0)[1] == "60.0"
