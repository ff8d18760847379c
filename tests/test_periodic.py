"""Evaluation during fine-tuning and the step schedules: EMA half-life, LR warm-up, held-out loss, best weights."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ledit_convert.data.images import ArrayImageDataset
from ledit_convert.training.diffusion import DiffusionSchedule
from ledit_convert.errors import ConfigError
from ledit_convert.training.finetune import finetune
from ledit_convert.training.periodic import EvalPlan, PeriodicEvaluator, better, heldout_loss, metric_key
from ledit_convert.training.recipe import load_recipe
from ledit_convert.training.trainstep import diffusion_loss, ema_decay, ema_weight_tensor, learning_rate
from test_finetune import BASE, make_images, make_model


def test_ema_half_life_and_rampup_match_their_formulas():
    assert ema_decay(5, 128, 0.999) == 0.999  # no half-life: the fixed decay, as DiT
    # half-life in images: after half_life / batch updates the old weights keep exactly half their weight
    d = ema_decay(10_000, 128, 0.999, half_life_images=128 * 50)
    assert math.isclose(d ** 50, 0.5, rel_tol=1e-12)
    # EDM ramp-up: early on the half-life is ramp x images seen, so step 0 forgets (almost) everything
    assert ema_decay(0, 128, 0.999, 1e6, 0.05) == pytest.approx(0.5 ** (1 / 0.05))
    assert ema_decay(10 ** 6, 128, 0.999, 1e6, 0.05) == pytest.approx(0.5 ** (128 / 1e6))
    steps = torch.tensor([0, 7, 100, 10 ** 6])
    on_device = ema_weight_tensor(steps, 128, 0.999, 1e6, 0.05)  # 1 - decay, relative to the small weight itself
    expected = torch.tensor([1 - ema_decay(int(s), 128, 0.999, 1e6, 0.05) for s in steps], dtype=torch.float64)
    assert torch.allclose(on_device.double(), expected, rtol=1e-5)
    assert torch.allclose(ema_weight_tensor(steps, 128, 0.999).double(), torch.full((4,), 0.001, dtype=torch.float64))


def test_learning_rate_warmup_is_linear_then_constant():
    assert [learning_rate(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(0, 3e-4) == 3e-4


def test_finetune_uses_the_warmup_and_half_life(setup_dirs_local):
    model, imgs, tmp = setup_dirs_local
    logged = []
    recipe = load_recipe(None, dict(BASE, steps=3, lr_warmup_steps=2, ema_half_life_images=8.0, ema_rampup_ratio=0.5))
    finetune(str(model), str(imgs), recipe, str(tmp / "run"), progress=logged.append)
    assert [r["lr"] for r in logged] == [recipe.learning_rate / 2, recipe.learning_rate, recipe.learning_rate]
    prov = json.loads((tmp / "run/model/provenance.json").read_text())
    assert any("half-life 8 images, ramp-up 0.5" in c for c in prov["changes"])


def test_bad_schedule_and_eval_keys_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_recipe(None, dict(ema_half_life_images=-1, ema_rampup_ratio=2.0, lr_warmup_steps=-3,
                               eval_metrics=["fid", "ssim"], eval_weights=["best"], best_metric="fdi@512",
                               eval_resolutions=["abc"]))
    msg = str(e.value)
    for part in ("ema_half_life_images -1", "ema_rampup_ratio 2.0", "lr_warmup_steps -3"):
        assert part in msg
    with pytest.raises(ConfigError) as e:
        load_recipe(None, dict(eval_metrics=["fid", "ssim"], eval_weights=["best"], best_metric="fdi@512"))
    msg = str(e.value)
    assert "'ssim'" in msg and "'best'" in msg and "fdi@512" in msg


def test_best_metric_must_be_one_the_plan_produces():
    with pytest.raises(ConfigError) as e:
        load_recipe(None, dict(resolution=32, eval_metrics=["structure"], best_metric="fid@64"))
    assert "needs eval metric fid" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_recipe(None, dict(resolution=32, eval_metrics=["structure"], best_metric="object_rate@128"))
    assert "128 is not one of the evaluated sizes 32, 64" in str(e.value)
    assert load_recipe(None, dict(resolution=32, eval_metrics=["structure"], best_metric="object_rate@64"))


def test_metric_direction_and_keys():
    assert metric_key("fid", (64, 64)) == "fid@64" and metric_key("fid", (48, 64)) == "fid@48x64"
    assert better("fid@64", 10.0, 12.0) and not better("fid@64", 13.0, 12.0)
    assert better("object_rate@64", 0.5, 0.4) and better("heldout_loss", 0.1, 0.2)


def _tiny_model(seed=0):
    from _tiny import randomize_
    from ledit_convert.models.dit import LEDiTTransformer2DModel
    model = LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32,
                                    num_layers=2, num_attention_heads=2, num_classes=3,
                                    attention_layout=["self", "causal"])
    return randomize_(model, seed)


def test_heldout_loss_is_the_training_loss_with_fixed_draws_in_eval_mode():
    model = _tiny_model().train()
    schedule = DiffusionSchedule()
    x0 = torch.randn(10, 3, 8, 8)
    labels = torch.arange(10) % 3
    a = heldout_loss(model, schedule, x0, labels, seed=3, batch_size=4)
    b = heldout_loss(model, schedule, x0, labels, seed=3, batch_size=4)
    assert a == b and model.training  # same draws every call; the model's mode is restored
    model.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        terms = [diffusion_loss(model, schedule, x0[i:i + 4], labels[i:i + 4], g, 0.0, 3, True, per_sample=True)
                 for i in range(0, 10, 4)]
    loss, t = torch.cat([x["loss"] for x in terms]), torch.cat([x["t"] for x in terms])
    assert a["heldout_loss"] == pytest.approx(float(loss.mean()), rel=1e-6)
    low = t < 300
    if low.any():
        assert a["heldout_loss_t_lt_300"] == pytest.approx(float(loss[low].mean()), rel=1e-6)
    if (~low).any():
        assert a["heldout_loss_t_ge_300"] == pytest.approx(float(loss[~low].mean()), rel=1e-6)


def test_evaluator_needs_what_its_metrics_need(tmp_path):
    with pytest.raises(ConfigError, match="heldout_loss needs held-out data"):
        PeriodicEvaluator(EvalPlan(every=1, resolutions=[(8, 8)], metrics=["heldout_loss"]), tmp_path)
    with pytest.raises(ConfigError, match="fid needs a reference for 8, 16"):
        PeriodicEvaluator(EvalPlan(every=1, resolutions=[(8, 8), (16, 16)], metrics=["fid"]), tmp_path,
                          extractor=object())


def _shape_images(n, res, seed):
    from ledit_convert.replication.shapes import ShapesDataset
    ds = ShapesDataset(n, res, num_classes=3, seed=seed)
    return ds.images(), ds.labels


@pytest.fixture()
def setup_dirs_local(tmp_path):
    return make_model(tmp_path / "model"), make_images(tmp_path / "imgs"), tmp_path


def test_finetune_evaluates_along_the_way_keeps_the_best_and_resumes(tmp_path):
    images, labels = _shape_images(24, 8, 0)
    held_images, held_labels = _shape_images(6, 8, 1)
    model = make_model(tmp_path / "model")
    settings = dict(BASE, learning_rate=3e-3, eval_every=2, eval_samples=4, eval_steps=3, eval_batch_size=4,
                    eval_metrics=["structure", "heldout_loss"], eval_weights=["ema", "raw"],
                    eval_resolutions=["8", "16"], best_metric="heldout_loss", checkpoint_every=2)
    data, held = ArrayImageDataset(images, labels), ArrayImageDataset(held_images, held_labels)
    first = finetune(str(model), data, load_recipe(None, dict(settings, steps=4)), str(tmp_path / "run"), heldout=held)
    rows = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["weights"]) for r in rows] == [(2, "ema"), (2, "raw"), (4, "ema"), (4, "raw")]
    for r in rows:
        assert {"single_object_rate@8", "object_rate@16", "heldout_loss", "images_seen"} <= set(r)
        assert 0.0 <= r["object_rate@16"] <= 1.0 and r["images_seen"] == r["step"] * 4
    ema_rows = [r for r in rows if r["weights"] == "ema"]
    best_row = min(ema_rows, key=lambda r: r["heldout_loss"])
    best = json.loads((tmp_path / "run/best.json").read_text())
    assert best["step"] == best_row["step"] and best["value"] == best_row["heldout_loss"]
    assert first["best"]["step"] == best_row["step"] and first["evaluations"] == 4
    # best/ is a model folder holding the EMA weights of that step, with the row in its provenance
    prov = json.loads((tmp_path / "run/best/provenance.json").read_text())
    assert prov["evaluation"]["step"] == best_row["step"]
    if best_row["step"] == 4:
        a = load_file(str(tmp_path / "run/best/diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "run/model/diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming to 6 steps evaluates only the new step and keeps the earlier rows
    finetune(str(model), data, load_recipe(None, dict(settings, steps=6)), str(tmp_path / "run"), resume="latest",
             heldout=held)
    rows = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 4, 4, 6, 6]


def test_finetune_fid_during_training_against_an_image_folder(tmp_path):
    from PIL import Image
    ref = tmp_path / "ref"
    ref.mkdir()
    images, labels = _shape_images(8, 8, 5)
    for i, im in enumerate(images):
        Image.fromarray(im).save(ref / f"{i}.png")
    model = make_model(tmp_path / "model")
    recipe = load_recipe(None, dict(BASE, steps=2, eval_every=2, eval_samples=6, eval_steps=2, eval_batch_size=6,
                                    eval_resolutions=["8"], eval_references=[str(ref)], best_metric="fid@8"))
    summary = finetune(str(model), ArrayImageDataset(images, labels), recipe, str(tmp_path / "run"))
    row = json.loads((tmp_path / "run/eval.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["fid@8"]) and row["fid@8"] > 0 and 0 <= row["precision@8"] <= 1
    assert summary["best"]["value"] == row["fid@8"] and (tmp_path / "run/best/config.json").exists()


def test_cli_finetune_evaluates_held_out_images_from_a_folder_and_names_the_best(setup_dirs_local):
    from typer.testing import CliRunner

    from ledit_convert.cli import app
    model, imgs, tmp = setup_dirs_local
    args = ["finetune", str(model), "--data", str(imgs), "--output-dir", str(tmp / "run"), "--steps", "4",
            "--batch-size", "4"]
    for key, value in dict(BASE, eval_every=2, eval_metrics="heldout_loss", eval_heldout=str(imgs),
                           eval_heldout_items=5, best_metric="heldout_loss", checkpoint_every=4).items():
        if key not in ("global_batch_size",):
            args += ["--set", f"{key}={'' if value == [] else value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp / "run/eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["heldout_loss"] > 0 for r in rows)
    best = min(rows, key=lambda r: r["heldout_loss"])
    assert f"best heldout_loss {best['heldout_loss']:.4g} at step {best['step']}" in result.output


def test_shards_of_the_samples_are_the_unsplit_samples():
    from ledit_convert.training.periodic import sample_images, shard_bounds
    model = _tiny_model()
    plan = EvalPlan(every=1, resolutions=[(8, 8)], samples=5, steps=2, batch_size=2)
    whole = sample_images(model, (16, 8), 5, plan)
    parts = [sample_images(model, (16, 8), 5, plan, rank=r, world=3) for r in range(3)]
    assert [len(p) for p in parts] == [hi - lo for lo, hi in (shard_bounds(5, r, 3) for r in range(3))] == [1, 2, 2]
    assert np.array_equal(np.concatenate(parts), whole)
    assert sample_images(model, (8, 8), 1, plan, rank=0, world=2).shape == (0, 8, 8, 3)  # an empty shard


def test_two_processes_evaluate_their_shards_and_the_main_one_writes(tmp_path):
    from test_finetune import finetune_two_processes
    model, imgs = make_model(tmp_path / "model"), make_images(tmp_path / "imgs")
    finetune_two_processes(model, imgs, dict(BASE, steps=4, eval_every=2, eval_samples=5, eval_steps=2,
                                             eval_batch_size=2, eval_metrics=["structure", "heldout_loss"],
                                             eval_heldout=str(imgs), eval_heldout_items=4, eval_resolutions=["8"],
                                             best_metric="heldout_loss", checkpoint_every=2), tmp_path, 29533)
    rows = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # one row per step: only the main process writes
    assert all(0 <= r["object_rate@8"] <= 1 and r["heldout_loss"] > 0 for r in rows)
    assert (tmp_path / "run/best/config.json").exists()


def test_a_resumed_run_drops_rows_written_after_its_checkpoint(tmp_path):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"step": s, "weights": "ema", "heldout_loss": 1.0 / s})
                                                 + "\n" for s in (2, 4, 6)))
    plan = EvalPlan(every=2, resolutions=[(8, 8)], metrics=["heldout_loss"], best_metric="heldout_loss")
    ev = PeriodicEvaluator(plan, tmp_path, heldout=(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long)),
                           start_step=4)
    assert [r["step"] for r in ev.rows] == [2, 4] and ev.best["step"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2, 4]
    assert not ev.due(4) and ev.due(6) and not ev.due(5)


def test_held_out_images_through_a_vae_leave_the_training_draws_alone(tmp_path):
    from _tiny import tiny_vae
    from ledit_convert.models.dit import LEDiTTransformer2DModel
    tiny_vae().save_pretrained(tmp_path / "vae")
    imgs = make_images(tmp_path / "imgs")
    LEDiTTransformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, num_layers=2,
                            num_attention_heads=2, num_classes=3,
                            attention_layout=["self", "causal"]).save_pretrained(tmp_path / "model")
    settings = dict(BASE, resolution=16, vae=str(tmp_path / "vae"), steps=4, checkpoint_every=4)
    plain = finetune(str(tmp_path / "model"), str(imgs), load_recipe(None, settings), str(tmp_path / "a"))
    evaluated = finetune(str(tmp_path / "model"), str(imgs), load_recipe(None, dict(
        settings, eval_every=2, eval_metrics=["heldout_loss"], eval_heldout=str(imgs), eval_heldout_items=3)),
        str(tmp_path / "b"))
    assert evaluated["losses"] == plain["losses"]
