"""Fine-tuning: the loop learns, resumes exactly, survives a crash mid-checkpoint, runs on 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import ledit_convert.training.runstate as runstate
from ledit_convert.cli import app
from ledit_convert.errors import ConfigError, DataError
from ledit_convert.training.finetune import finetune, validation_grids, setup
from ledit_convert.models.dit import LEDiTTransformer2DModel
from ledit_convert.training.recipe import Recipe, load_recipe
from ledit_convert.training.runstate import ResumableSampler, update_ema
from torch._dynamo.exc import TorchDynamoException

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASE = dict(resolution=8, vae="none", global_batch_size=4, num_workers=0, log_every=1, checkpoint_every=3,
            validate_every=0, trackers=[], ema_decay=0.9)


def make_images(root: Path, classes=3, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        colour = rng.integers(0, 255, 3)
        for i in range(per_class):
            img = np.zeros((12, 12, 3), np.uint8) + colour.astype(np.uint8)
            img[2 + i:6 + i, 3:9] = 255 - colour  # a class-coloured square at an image-dependent place
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def make_model(folder: Path, classes=3, dilation_prob=0.5, lr_layers=2):
    model = LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32,
                                    num_layers=lr_layers, num_attention_heads=2, num_classes=classes,
                                    attention_layout=["self", "causal"] * (lr_layers // 2),
                                    locality_dilation_prob=dilation_prob)
    model.save_pretrained(folder)
    return folder


@pytest.fixture()
def setup_dirs(tmp_path):
    return make_model(tmp_path / "model"), make_images(tmp_path / "imgs"), tmp_path


def test_tiny_model_overfits(setup_dirs):
    model, imgs, tmp = setup_dirs
    recipe = load_recipe(None, dict(BASE, steps=120, learning_rate=3e-3, checkpoint_every=1000, log_every=10))
    summary = finetune(str(model), str(imgs), recipe, str(tmp / "run"))
    first, last = summary["losses"][0], summary["losses"][-1]
    assert last < 0.5 * first, summary["losses"]


def test_resume_continues_exactly(setup_dirs):
    model, imgs, tmp = setup_dirs
    straight = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=7, num_workers=2)), str(tmp / "a"))
    part = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=4, num_workers=2)), str(tmp / "b"))
    rest = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=7, num_workers=2)), str(tmp / "b"),
                    resume="latest")
    assert part["losses"] + rest["losses"] == straight["losses"]
    a = load_file(str(tmp / "a/model/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp / "b/model/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_checkpoint_write_resumes_from_previous(setup_dirs, monkeypatch):
    model, imgs, tmp = setup_dirs
    real = runstate.finish_checkpoint
    calls = {"n": 0}

    def crash_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after writing files, before the rename
        return real(*args, **kwargs)

    import ledit_convert.training.finetune as ft
    monkeypatch.setattr(ft, "finish_checkpoint", crash_second)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=9)), str(tmp / "run"))
    names = sorted(os.listdir(tmp / "run" / "checkpoints"))
    assert names == [".partial_step_00000006", "step_00000003"]
    monkeypatch.setattr(ft, "finish_checkpoint", real)
    resumed = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=9)), str(tmp / "run"),
                       resume="latest")
    straight = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=9)), str(tmp / "ref"))
    assert resumed["losses"] == straight["losses"][3:]
    assert sorted(os.listdir(tmp / "run" / "checkpoints")) == ["step_00000003", "step_00000006", "step_00000009"]


def test_rotation_and_export(setup_dirs):
    model, imgs, tmp = setup_dirs
    finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=6, checkpoint_every=1, keep_checkpoints=2)),
             str(tmp / "run"))
    assert sorted(os.listdir(tmp / "run" / "checkpoints")) == ["step_00000005", "step_00000006"]
    exported = LEDiTTransformer2DModel.from_pretrained(tmp / "run" / "model")
    ema = load_file(str(tmp / "run/checkpoints/step_00000006/ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())
    assert (tmp / "run" / "recipe.resolved.yaml").exists() and (tmp / "run" / "model" / "recipe.yaml").exists()
    prov = json.loads((tmp / "run" / "model" / "provenance.json").read_text())
    assert prov["training"]["steps"] == 6


def test_existing_run_needs_resume(setup_dirs):
    model, imgs, tmp = setup_dirs
    finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=3)), str(tmp / "run"))
    with pytest.raises(ConfigError, match="--resume latest"):
        finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=3)), str(tmp / "run"))


def test_lora_trains_adapters_and_merges(setup_dirs):
    model, imgs, tmp = setup_dirs
    summary = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=4, lora_rank=2, learning_rate=1e-2)),
                       str(tmp / "run"))
    exported = LEDiTTransformer2DModel.from_pretrained(tmp / "run" / "model")
    names = set(exported.state_dict())
    assert not any("lora" in n for n in names)
    base = LEDiTTransformer2DModel.from_pretrained(model)
    moved = [k for k, v in exported.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("attn.qkv.weight" in k for k in moved)  # merged adapters changed the linears
    assert any("locality_conv" in k for k in moved)  # trained fully
    assert not any(k.startswith("t_embedder") for k in moved)  # frozen
    assert summary["steps"] == 4
    # beside it, the adapter in diffusers' format and the fully trained modules: onto the starting folder they give
    # the merged model
    lora = tmp / "run" / "model-lora"
    base.load_state_dict(load_file(str(lora / "trained_modules.safetensors")), strict=False)
    base.load_lora_adapter(str(lora), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 800]), torch.tensor([0, 2])
    with torch.no_grad():
        merged = exported.eval()(x, t, y, attention_kwargs={"locality_dilation": 1}).sample
        adapted = base.eval()(x, t, y, attention_kwargs={"locality_dilation": 1}).sample
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


def test_validation_grids(setup_dirs):
    model, imgs, tmp = setup_dirs
    run = setup(str(model), str(imgs), load_recipe(None, dict(BASE, steps=1, validation_steps=3,
                                                                validation_classes=[0, 2, 7])), str(tmp / "run"))
    paths = validation_grids(run)
    assert [p.name for p in paths] == ["step_00000000_1x.png", "step_00000000_2x.png"]
    assert Image.open(paths[0]).size == (16, 8) and Image.open(paths[1]).size == (32, 16)


def test_ema_math():
    ema = [torch.tensor([1.0, 2.0])]
    update_ema(ema, [torch.tensor([3.0, -2.0])], 0.9)
    assert torch.allclose(ema[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]))


def test_sampler_shards_and_resumes():
    full = ResumableSampler(10, seed=1, rank=0, world_size=2)
    keys = [k for _, k in zip(range(12), iter(full))]
    other = [k for _, k in zip(range(12), iter(ResumableSampler(10, 1, rank=1, world_size=2)))]
    assert not set(k for _, k in keys[:5]) & set(k for _, k in other[:5])  # an epoch splits across ranks
    later = [k for _, k in zip(range(5), iter(ResumableSampler(10, 1, 0, 2, consumed=7)))]
    assert later == keys[7:12]


def test_bad_data_stops_before_the_first_step(setup_dirs):
    model, imgs, tmp = setup_dirs
    with pytest.raises(DataError, match="outside the model's 2 classes"):
        finetune(str(make_model(tmp / "two", classes=2)), str(imgs), load_recipe(None, dict(BASE, steps=2)),
                 str(tmp / "r1"))
    with pytest.raises(DataError, match="not a positive multiple"):
        finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=2, resolution=9)), str(tmp / "r2"))
    (tmp / "empty").mkdir()
    with pytest.raises(DataError):
        finetune(str(model), str(tmp / "empty"), load_recipe(None, dict(BASE, steps=2)), str(tmp / "r3"))
    assert not (tmp / "r1" / "checkpoints").exists() and not (tmp / "r2" / "checkpoints").exists()


def test_corrupt_images_are_skipped_and_counted(setup_dirs):
    model, imgs, tmp = setup_dirs
    (imgs / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    summary = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=12)), str(tmp / "run"))
    assert summary["skipped_images"] >= 1


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "ledit-convert" in path.read_text()
    assert set(yaml.safe_load(path.read_text())) <= set(Recipe().to_dict())


def test_paper_recipe_values():
    r = load_recipe(str(RECIPES / "ledit-xl2-256.yaml"))
    assert (r.steps, r.global_batch_size, r.learning_rate, r.ema_decay, r.class_dropout) == (100000, 256, 1e-4,
                                                                                              0.9999, 0.1)


def test_flex_training_on_cpu_is_refused_up_front(setup_dirs):
    model, imgs, tmp = setup_dirs
    with pytest.raises(ConfigError, match="FlexAttention has no backward on cpu"):
        finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=1, attention_backend="flex")),
                 str(tmp / "run"))
    assert not (tmp / "run" / "checkpoints").exists()


def test_recipe_errors_are_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: -3\nlearning_rat: 0.1\nmixed_precision: fp8\ncompile_mode: fast\nseed: x\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(str(bad))
    msg = str(e.value)
    for part in ("unknown key 'learning_rat'", "steps must be positive", "mixed_precision 'fp8'",
                 "compile_mode 'fast'", "seed: expected int", str(bad)):
        assert part in msg, part
    with pytest.raises(ConfigError) as e:
        load_recipe(None, {"steps": -3, "mixed_precision": "fp8"})
    assert "steps must be positive" in str(e.value) and "mixed_precision 'fp8'" in str(e.value)


def test_cli_finetune_and_overrides(setup_dirs):
    model, imgs, tmp = setup_dirs
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(BASE, steps=50)))
    result = CliRunner().invoke(app, ["finetune", str(model), "--data", str(imgs), "--recipe", str(recipe),
                                      "--steps", "3", "--output-dir", str(tmp / "run"), "--set", "ema_decay=0.5"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((tmp / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["steps"] == 3 and resolved["ema_decay"] == 0.5
    bad = CliRunner().invoke(app, ["finetune", str(model), "--data", str(imgs), "--set", "nonsense=1",
                                   "--output-dir", str(tmp / "x")])
    assert bad.exit_code == 3 and "unknown key 'nonsense'" in bad.stderr


def finetune_two_processes(model, imgs, recipe: dict, tmp, port: int):
    """`finetune` in 2 CPU processes: accelerate launch --cpu starts one, torchrun starts N, and ACCELERATE_USE_CPU
    makes them use gloo; the run folder is tmp/run."""
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "ledit_convert.cli", "finetune", str(model), "--data", str(imgs), "--recipe", str(path),
           "--output-dir", str(tmp / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_cpu_run(setup_dirs):
    model, imgs, tmp = setup_dirs
    finetune_two_processes(model, imgs, dict(BASE, steps=3), tmp, 29531)
    state = json.loads((tmp / "run/checkpoints/step_00000003/state.json").read_text())
    assert state["num_processes"] == 2 and state["consumed_per_process"] == 3 * 2
    assert sorted(p.name for p in (tmp / "run/checkpoints/step_00000003").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    assert (tmp / "run" / "model" / "config.json").exists()


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise TorchDynamoException("no compiler here (backward graph)")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_compile_failure_falls_back_to_eager_exactly(setup_dirs, monkeypatch, caplog, where):
    """A compile error in the first step's forward or backward: eager from then on, and the same losses as a
    run that was eager all along (the failed attempt's random draws are rolled back)."""
    model, imgs, tmp = setup_dirs
    recipe = dict(BASE, steps=8, checkpoint_every=100, learning_rate=3e-2)
    eager = finetune(str(model), str(imgs), load_recipe(None, recipe), str(tmp / "eager"))

    def fake_compile(fn, **kwargs):  # what a compile failing at its first call does
        def compiled(*args, **kw):
            if where == "forward":
                raise TorchDynamoException("no compiler here")
            return _FailingBackward.apply(fn(*args, **kw))
        return compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    with caplog.at_level("WARNING"):
        fallback = finetune(str(model), str(imgs), load_recipe(None, dict(recipe, compile=True)), str(tmp / "fb"))
    assert "training continues in eager mode" in caplog.text
    assert fallback["losses"] == eager["losses"]


def test_other_errors_in_a_compiled_step_are_not_swallowed(setup_dirs, monkeypatch):
    model, imgs, tmp = setup_dirs

    def fake_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("out of memory")
        return compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=2, compile=True)), str(tmp / "run"))


def test_cache_latents_then_finetune_on_them(tmp_path):
    from _tiny import tiny_vae
    tiny_vae().save_pretrained(tmp_path / "vae")  # 4x downsampling, 4 latent channels
    imgs = make_images(tmp_path / "imgs")
    runner = CliRunner()
    result = runner.invoke(app, ["cache-latents", str(imgs), "--vae", str(tmp_path / "vae"), "--resolution", "16",
                                 "-o", str(tmp_path / "latents"), "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    assert "12 latents" in result.output
    LEDiTTransformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, num_layers=2,
                            num_attention_heads=2, num_classes=3,
                            attention_layout=["self", "causal"]).save_pretrained(tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(BASE, resolution=16, vae=str(tmp_path / "vae"), steps=2)))
    result = runner.invoke(app, ["finetune", str(tmp_path / "model"), "--data", str(tmp_path / "latents"),
                                 "--recipe", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    # validation decodes with the VAE, and later steps still train on the cached latents as they are
    result = runner.invoke(app, ["finetune", str(tmp_path / "model"), "--data", str(tmp_path / "latents"),
                                 "--recipe", str(recipe), "--steps", "3", "--set", "validate_every=1",
                                 "--set", "validation_steps=2", "--output-dir", str(tmp_path / "run-val")])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    assert len(list((tmp_path / "run-val" / "validation").glob("*.png"))) == 6
    # the same images through the VAE on the fly also train, with the VAE's own downsampling factor
    result = runner.invoke(app, ["finetune", str(tmp_path / "model"), "--data", str(imgs), "--recipe", str(recipe),
                                 "--output-dir", str(tmp_path / "run2")])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    bad = runner.invoke(app, ["finetune", str(tmp_path / "model"), "--data", str(imgs), "--recipe", str(recipe),
                              "--vae", "none", "--output-dir", str(tmp_path / "run3")])
    assert bad.exit_code == 4 and "input channels" in bad.stderr
