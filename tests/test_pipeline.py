"""Tests for ledit_convert.inference.pipeline and ledit_convert.inference.sampling on tiny seeded models."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline
from PIL import Image

from ledit_convert.errors import CheckpointError, ConfigError, OutputExistsError
from ledit_convert.models.dit import LEDiTTransformer2DModel
from ledit_convert.inference.pipeline import LEDiTPipeline, default_scheduler, save_pipeline
from ledit_convert.inference.sampling import image_seed, load_pipeline, plan_labels, sample_images

from _tiny import NUM_CLASSES, tiny_dit, tiny_ledit, tiny_vae

TRAIN_PX = 32  # sample_size 8 x vae_scale_factor 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and with a busy second core OpenMP barriers cost 100x (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_pipe(transformer=None, kind="ddpm", vae=True):
    pipe = LEDiTPipeline(transformer or tiny_ledit(), tiny_vae() if vae else None, default_scheduler(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, labels=(1, 2), seed=0, steps=3, output_type="latent", **kwargs):
    gen = torch.Generator().manual_seed(seed)
    return pipe(list(labels), num_inference_steps=steps, generator=gen, output_type=output_type, **kwargs).images


# ----------------------------------------------------------------------------- schedulers and basics


def test_default_scheduler_is_dits_schedule():
    ddpm = default_scheduler("ddpm")
    assert ddpm.config.variance_type == "learned_range" and ddpm.config.clip_sample is False
    assert ddpm.betas[0].item() == pytest.approx(1e-4) and ddpm.betas[-1].item() == pytest.approx(0.02)
    ddpm.set_timesteps(250)
    # DiT's space_timesteps(1000, "250"): round(i * 999 / 249), accumulated as DiT does
    stride, cur, dit_steps = 999 / 249, 0.0, []
    for _ in range(250):
        dit_steps.append(round(cur))
        cur += stride
    assert sorted(ddpm.timesteps.tolist()) == dit_steps
    assert default_scheduler("ddim").config.clip_sample is False
    assert default_scheduler("dpm").config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="'euler'"):
        default_scheduler("euler")


def test_same_seed_same_images_and_seed_matters():
    pipe = make_pipe()
    a, b, c = run(pipe, seed=0), run(pipe, seed=0), run(pipe, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().mean() > 0.1  # the tiny model does something


def test_per_image_generators_make_images_batch_independent():
    pipe = make_pipe()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    together = pipe([1, 2, 3], num_inference_steps=3, generator=gens(), output_type="latent").images
    alone = pipe([3], num_inference_steps=3, generator=[torch.Generator().manual_seed(7)], output_type="latent").images
    torch.testing.assert_close(together[2:], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())


@pytest.mark.parametrize("height,width", [(None, None), (TRAIN_PX, TRAIN_PX), (48, 32), (32, 64)])
def test_output_sizes(height, width):
    pipe = make_pipe()
    images = run(pipe, output_type="np", height=height, width=width, steps=2)
    h, w = height or TRAIN_PX, width or TRAIN_PX
    assert images.shape == (2, h, w, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01
    pil = run(pipe, output_type="pil", height=height, width=width, steps=2)
    assert [im.size for im in pil] == [(w, h)] * 2
    assert run(pipe, output_type="pt", height=height, width=width, steps=2).shape == (2, 3, h, w)
    assert run(pipe, output_type="latent", height=height, width=width, steps=2).shape == (2, 4, h // 4, w // 4)


def test_latent_output_without_vae():
    pipe = make_pipe(vae=False)
    assert pipe.vae_scale_factor == 1  # sizes are in model cells without a VAE
    assert run(pipe, height=8, width=16).shape == (2, 4, 8, 16)
    with pytest.raises(ValueError, match="needs a VAE"):
        run(pipe, height=8, width=8, output_type="np")


def test_pixel_space_model_without_vae():
    torch.manual_seed(0)
    model = LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32,
                                    num_layers=2, num_attention_heads=2, num_classes=10).eval()
    pipe = LEDiTPipeline(transformer=model, vae=None, scheduler=default_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    raw = pipe([1, 2], height=8, width=12, num_inference_steps=3, generator=g, output_type="latent").images
    g = torch.Generator().manual_seed(0)
    images = pipe([1, 2], height=8, width=12, num_inference_steps=3, generator=g, output_type="np").images
    assert images.shape == (2, 8, 12, 3)
    assert np.allclose(images, ((raw / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- equivalence with DiT and diffusers


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_matches_diffusers_dit_pipeline_with_cfg(kind):
    """A stock diffusers DiT through our pipeline (guidance on all channels) gives DiTPipeline's images."""
    dit, vae = tiny_dit(), tiny_vae()
    theirs = DiTPipeline(dit, vae, default_scheduler(kind))
    ours = LEDiTPipeline(dit, vae, default_scheduler(kind))
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    expected = theirs([1, 3, 999], guidance_scale=4.0, num_inference_steps=4,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    got = run(ours, labels=(1, 3, 999), steps=4, output_type="np", guidance_scale=4.0, guidance_channels="all")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.01
    other = run(ours, labels=(1, 3, 999), seed=1, steps=4, output_type="np", guidance_scale=4.0, guidance_channels="all")
    assert np.abs(other - expected).max() > 1e-3  # the comparison is not vacuous
    dit3 = run(ours, labels=(1, 3, 999), steps=4, output_type="np", guidance_scale=4.0, guidance_channels=3)
    assert np.abs(dit3 - expected).max() > 1e-4  # DiT's 3-channel guidance is a different sampler


def test_matches_diffusers_dit_pipeline_ddpm_without_cfg():
    """DDPM draws per-step noise; DiTPipeline draws it from the global RNG, so seed that and pass no generator."""
    dit, vae = tiny_dit(), tiny_vae()
    scheduler = DDPMScheduler.from_config(default_scheduler("ddpm").config, variance_type="fixed_small")
    theirs, ours = DiTPipeline(dit, vae, scheduler), LEDiTPipeline(dit, vae, DDPMScheduler.from_config(scheduler.config))
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    torch.manual_seed(3)
    expected = theirs([4, 5], guidance_scale=1.0, num_inference_steps=4, output_type="np").images
    torch.manual_seed(3)
    got = ours([4, 5], guidance_scale=1.0, num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def dit_reference_sample(model, labels, steps, cfg, seed, size):
    """DiT's respaced p_sample_loop with forward_with_cfg (3 guided channels), written out in float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    stride, cur, use = 999 / (steps - 1), 0.0, []  # respace.space_timesteps(1000, str(steps))
    for _ in range(steps):
        use.append(round(cur))
        cur += stride
    last, new_betas = 1.0, []
    for t in use:
        new_betas.append(1 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    b = np.array(new_betas)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1 - ac_prev) / (1 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = b * np.sqrt(ac_prev) / (1 - ac), (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    x = torch.randn((n, 4, size, size), generator=gen).double()
    y = torch.tensor(list(labels) + [model.config.num_classes] * n)
    for i in reversed(range(steps)):
        with torch.no_grad():
            out = model(torch.cat([x, x]).float(), torch.full((2 * n,), use[i]), y).sample.double()
        cond, uncond = out[:, :3].chunk(2)
        half = uncond + cfg * (cond - uncond)
        out = torch.cat([torch.cat([half, half]), out[:, 3:]], dim=1)[:n]
        eps, v = out[:, :4], out[:, 4:]
        frac = (v + 1) / 2
        logvar = frac * np.log(b[i]) + (1 - frac) * post_logvar[i]
        x0 = np.sqrt(1 / ac[i]) * x - np.sqrt(1 / ac[i] - 1) * eps
        mean = coef1[i] * x0 + coef2[i] * x
        x = mean + torch.exp(0.5 * logvar) * torch.randn(x.shape, generator=gen).double() if i > 0 else mean
    return x


def test_ddpm_matches_dit_reference_sampler():
    """DDPM learned_range + 3-channel guidance reproduces DiT's own sampler (learned variance consumed)."""
    model = tiny_ledit(seed=4)
    pipe = make_pipe(model)
    got = run(pipe, labels=(2, 7), steps=5, guidance_scale=1.5, guidance_channels=3)
    expected = dit_reference_sample(model, (2, 7), steps=5, cfg=1.5, seed=0, size=8).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    fixed = LEDiTPipeline(model, None, DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small"))
    fixed.set_progress_bar_config(disable=True)
    assert not torch.allclose(run(fixed, labels=(2, 7), steps=5, guidance_scale=1.5), got, rtol=1e-3)


# ----------------------------------------------------------------------------- LEDiT inference options


def test_attention_scaling_only_matters_off_the_training_resolution():
    pipe = make_pipe(kind="ddim")
    at_train = {s: run(pipe, attention_scaling=s) for s in (None, "log", "none")}
    assert torch.equal(at_train[None], at_train["log"]) and torch.equal(at_train["log"], at_train["none"])
    big = {s: run(pipe, attention_scaling=s, height=64, width=64) for s in (None, "log", "none")}
    assert torch.equal(big[None], big["log"])  # the model's default is "log"
    assert not torch.allclose(big["log"], big["none"], rtol=1e-3)


def test_causal_to_self_below():
    pipe = make_pipe(kind="ddim")  # timesteps 750, 500, 250, 0 for 4 steps
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((int(kwargs["timestep"][0]), kwargs.get("attention_kwargs"))),
        with_kwargs=True)
    base = run(pipe, steps=4)
    assert seen == [(750, None), (500, None), (250, None), (0, None)]
    seen.clear()
    late = run(pipe, steps=4, causal_to_self_below=300)
    assert [kw for _, kw in seen] == [None, None, {"causal_to_self": True}, {"causal_to_self": True}]
    assert torch.equal(run(pipe, steps=4, causal_to_self_below=0), base)
    always = run(pipe, steps=4, causal_to_self_below=1000)
    assert not torch.equal(late, base) and not torch.allclose(always, base, rtol=1e-3)
    no_causal = make_pipe(tiny_ledit(attention_layout=["self"] * 4), kind="ddim")
    assert torch.equal(run(no_causal, steps=4, causal_to_self_below=1000), run(no_causal, steps=4))


def test_position_mode_for_sincos_models():
    sincos = tiny_ledit(position_encoding="sincos", locality="none", attention_layout=["self"] * 4)
    pipe = make_pipe(sincos, kind="ddim")
    assert torch.equal(run(pipe, position_mode="extrapolate"), run(pipe, position_mode="interpolate"))
    big = {m: run(pipe, position_mode=m, height=64, width=48) for m in ("extrapolate", "interpolate")}
    assert not torch.allclose(big["extrapolate"], big["interpolate"], rtol=1e-3)
    with pytest.raises(ValueError, match="no positional encoding"):
        run(make_pipe(), position_mode="interpolate")


def test_guidance_switches():
    pipe = make_pipe(kind="ddim")
    assert torch.equal(run(pipe, guidance_scale=1.0, guidance_channels=3),
                       run(pipe, guidance_scale=1.0, guidance_channels="all"))
    assert not torch.allclose(run(pipe, guidance_scale=4.0, guidance_channels=3),
                              run(pipe, guidance_scale=4.0, guidance_channels=None), rtol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=(1, NUM_CLASSES)), "class label 10"),
    (dict(labels=(-1,)), "class label -1"),
    (dict(height=36), "height 36"),
    (dict(width=0), "width 0"),
    (dict(output_type="jpg"), "'jpg'"),
    (dict(guidance_channels=5), "guidance_channels 5"),
    (dict(attention_scaling="ntk"), "'ntk'"),
    (dict(causal_to_self_below=-3), "causal_to_self_below -3"),
])
def test_pipeline_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(make_pipe(), **kwargs)


def test_diffusers_dit_rejects_ledit_options_and_non_square():
    pipe = make_pipe(tiny_dit())
    with pytest.raises(ValueError, match="attention_scaling 'log' needs a LEDiT"):
        run(pipe, attention_scaling="log")
    with pytest.raises(ValueError, match="causal_to_self_below"):
        run(pipe, causal_to_self_below=100)
    with pytest.raises(ValueError, match="only generates square images"):
        run(pipe, height=48, width=32)
    assert run(pipe, labels=(999,), height=48, width=48, attention_scaling="none").shape == (1, 4, 12, 12)
    model = tiny_ledit().train()
    with pytest.raises(ValueError, match="training mode"):
        run(make_pipe(model))


# ----------------------------------------------------------------------------- sampling command logic


@pytest.fixture()
def folders(tmp_path):
    model_dir, vae_dir = tmp_path / "model", tmp_path / "vae"
    tiny_ledit().save_pretrained(model_dir)
    tiny_vae().save_pretrained(vae_dir)
    return str(model_dir), str(vae_dir)


def sample(folders, out, **kwargs):
    args = dict(vae=folders[1], num_samples=5, steps=3, batch_size=2, seed=0, output_dir=str(out))
    args.update(kwargs)
    return sample_images(folders[0], **args)


def test_sample_images_writes_pngs_grid_and_adm_npz(folders, tmp_path):
    calls = []
    result = sample(folders, tmp_path / "a", npz=True, progress=lambda done, total: calls.append((done, total)))
    assert result.labels == [0, 1, 2, 3, 4] and calls == [(2, 5), (4, 5), (5, 5)]
    assert [os.path.basename(p) for p in result.image_paths] == [f"{i:06d}_class{i}.png" for i in range(5)]
    assert os.path.basename(result.npz_path) == f"samples_5x{TRAIN_PX}x{TRAIN_PX}x3.npz"
    with np.load(result.npz_path) as batch:
        arr, labels = batch["arr_0"], batch["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (5, TRAIN_PX, TRAIN_PX, 3) and arr.std() > 1
    assert labels.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(np.asarray(Image.open(result.image_paths[3])), arr[3])
    assert Image.open(result.grid_path).size == (3 * (TRAIN_PX + 2) + 2, 2 * (TRAIN_PX + 2) + 2)
    assert not [n for n in os.listdir(tmp_path / "a") if n.endswith(".tmp")]
    # Same seed, another batch size: the same images (per-image generators); another seed: others.
    with np.load(sample(folders, tmp_path / "b", npz=True, batch_size=5, write_png=False).npz_path) as again:
        assert np.abs(again["arr_0"].astype(int) - arr).max() <= 1
    with np.load(sample(folders, tmp_path / "c", npz=True, seed=1, write_png=False).npz_path) as other:
        assert np.abs(other["arr_0"].astype(int) - arr).max() > 5


def test_sample_images_labels_and_non_square(folders, tmp_path):
    result = sample(folders, tmp_path / "a", class_labels=[3, 7], num_samples=3, height=48, width=32, npz=True,
                    write_grid=False)
    assert result.labels == [3, 7, 3] and result.grid_path is None
    assert os.path.basename(result.npz_path) == "samples_3x48x32x3.npz"
    assert Image.open(result.image_paths[1]).size == (32, 48)
    assert plan_labels(5, None, 3) == [0, 1, 2, 0, 1]
    assert image_seed(0, 1) != image_seed(1, 0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(class_labels=[2, NUM_CLASSES]), ConfigError, "class label 10"),
    (dict(class_labels=[-1]), ConfigError, "class label -1"),
    (dict(height=36), ConfigError, "height 36"),
    (dict(dtype="fp8"), ConfigError, "'fp8'"),
    (dict(scheduler="euler"), ConfigError, "'euler'"),
    (dict(attention_scaling="bad"), ConfigError, "'bad'"),
])
def test_sample_images_validates_before_work(folders, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        sample(folders, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_sample_images_rejects_non_model_folders(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    for path, match in ((tmp_path / "empty", "not a model folder"), (tmp_path / "missing", "does not exist"),
                        (folders[1], "AutoencoderKL, not a LEDiT")):
        with pytest.raises(CheckpointError, match=match):
            sample_images(str(path), vae=folders[1], output_dir=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.png").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="not empty"):
        sample(folders, tmp_path / "out")


def test_sample_images_reads_pipeline_and_diffusers_dit_folders(tmp_path):
    save_pipeline(make_pipe(), str(tmp_path / "ledit_pipe"))
    result = sample_images(str(tmp_path / "ledit_pipe"), num_samples=2, steps=2, output_dir=str(tmp_path / "a"))
    assert len(result.image_paths) == 2  # the VAE came from the pipeline folder
    dit_pipe = DiTPipeline(tiny_dit(), tiny_vae(), default_scheduler("ddim"))
    dit_pipe.save_pretrained(str(tmp_path / "dit_pipe"))
    result = sample_images(str(tmp_path / "dit_pipe"), num_samples=2, steps=2, class_labels=[999],
                           output_dir=str(tmp_path / "b"))
    assert os.path.basename(result.image_paths[0]) == "000000_class999.png"
    with pytest.raises(ConfigError, match="needs a LEDiT"):
        sample_images(str(tmp_path / "dit_pipe" / "transformer"), vae=str(tmp_path / "dit_pipe" / "vae"),
                      attention_scaling="log", output_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- saving and remote-code reload

REMOTE_SCRIPT = textwrap.dedent("""
    import sys

    class BlockLeditConvert:  # the editable install's finder would otherwise still find the package
        def find_spec(self, name, path=None, target=None):
            if name == "ledit_convert" or name.startswith("ledit_convert."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, BlockLeditConvert())
    try:
        import ledit_convert  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("ledit_convert is importable")
    import numpy as np
    import torch
    from diffusers import AutoModel, DiffusionPipeline

    folder, out = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "LEDiTPipeline", type(pipe)
    assert type(pipe.transformer).__name__ == "LEDiTTransformer2DModel", type(pipe.transformer)
    images = pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(out, images)
    model = AutoModel.from_pretrained(folder + "/transformer", trust_remote_code=True)
    assert type(model).__name__ == "LEDiTTransformer2DModel", type(model)
    # A pipeline loaded from remote code saves again with the save_pipeline shipped beside it.
    sys.modules[type(pipe).__module__].save_pipeline(pipe, out + ".resaved")
    again = DiffusionPipeline.from_pretrained(out + ".resaved", trust_remote_code=True)
    assert again.transformer.config.attention_layout == pipe.transformer.config.attention_layout
    assert all(torch.equal(a, b) for a, b in zip(again.transformer.state_dict().values(),
                                                  pipe.transformer.state_dict().values()))
    print("OK")
""")


def test_save_pipeline_reloads_with_and_without_ledit_convert(tmp_path):
    pipe = make_pipe()
    expected = run(pipe, output_type="np")
    folder = save_pipeline(pipe, str(tmp_path / "pipe"))
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == ["pipeline_ledit", "LEDiTPipeline"]
    assert index["transformer"] == ["modeling_ledit", "LEDiTTransformer2DModel"]
    assert os.path.isfile(os.path.join(folder, "pipeline_ledit.py"))
    assert os.path.isfile(os.path.join(folder, "transformer", "modeling_ledit.py"))

    reloaded = load_pipeline(folder)  # through ledit_convert: our classes, no remote code
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.transformer) is LEDiTTransformer2DModel
    assert isinstance(reloaded.scheduler, DDPMScheduler)
    np.testing.assert_allclose(run(reloaded, output_type="np"), expected, atol=1e-6)

    script, out = tmp_path / "remote.py", tmp_path / "remote.npy"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(script), folder, str(out)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
