"""Text-to-image PixArt end to end, offline: captioned data, the text cache, fine-tuning with caption dropout,
prompt sampling at any size, and the converted folder in diffusers' own PixArt pipeline."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from PIL import Image
from typer.testing import CliRunner

from _tiny import TEXT_WIDTH, save_text_encoder, tiny_vae
from test_pixart import stock
from test_surgery import BLOCK_LEDIT_CONVERT
from ledit_convert.cli import app
from ledit_convert.data.images import CaptionedImageFolder, CaptionSample, EncodedSample, open_training_data
from ledit_convert.errors import DataError
from ledit_convert.data.latents import CachedLatentsDataset, cache_latents
from ledit_convert.inference.pipeline import default_scheduler
from ledit_convert.data.text import TextCondition, load_text_encoder
from ledit_convert.training.trainstep import diffusion_loss
from ledit_convert.training.diffusion import DiffusionSchedule

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RES = 32  # pixels: the tiny PixArt's sample_size 8 x the tiny VAE's factor 4
MAX_LEN = 8


@pytest.fixture(scope="module")
def pixart_pipeline(tmp_path_factory):
    """A tiny PixArt-Sigma pipeline folder: transformer, VAE, T5 + tokenizer, scheduler, model_index.json."""
    folder = tmp_path_factory.mktemp("pixart") / "pipe"
    stock("sigma", seed=3).save_pretrained(folder / "transformer")
    tiny_vae(1).save_pretrained(folder / "vae")
    save_text_encoder(folder)
    default_scheduler("dpm").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    return folder


def captioned_folder(root, n=8, missing=()):
    """n 32 px images of coloured squares with sidecar captions (some left out on purpose)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((RES, RES, 3), 255, np.uint8)
        colour = [(255, 0, 0), (0, 0, 255)][i % 2]
        y, x = rng.integers(0, RES // 2, size=2)
        img[y:y + RES // 2, x:x + RES // 2] = colour
        Image.fromarray(img).save(root / f"{i:02d}.png")
        if i not in missing:
            (root / f"{i:02d}.txt").write_text(f"a {['red', 'blue'][i % 2]} square on white background\n")
    return root


def test_captioned_folder_reads_sidecars_and_names_a_missing_one(tmp_path):
    ds = CaptionedImageFolder(captioned_folder(tmp_path / "ok"), RES)
    item = ds.load(1)
    assert isinstance(item, CaptionSample) and item.caption == "a blue square on white background"
    assert len(ds) == 8 and item.x.shape == (3, RES, RES)
    with pytest.raises(DataError, match=r"03\.txt: caption missing \(1 of 8"):
        CaptionedImageFolder(captioned_folder(tmp_path / "bad", missing=(3,)), RES)


def test_hf_dataset_with_a_caption_column(tmp_path):
    import datasets
    images = [Image.fromarray(np.full((RES, RES, 3), 40 * i, np.uint8)) for i in range(3)]
    datasets.Dataset.from_dict({"image": images, "text": ["a red fox", "a cat", "the sea"]}).save_to_disk(tmp_path / "hf")
    ds = open_training_data(tmp_path / "hf", RES, 0, vae_downsample=4, captions=True, caption_column="text")
    assert [ds.load(i).caption for i in range(3)] == ["a red fox", "a cat", "the sea"]
    with pytest.raises(DataError, match="no column 'caption'.*caption_column"):
        open_training_data(tmp_path / "hf", RES, 0, vae_downsample=4, captions=True)


def test_text_encoder_matches_the_pixart_pipelines_own_encoding(pixart_pipeline):
    """Our encoding (cache, training, sampling) is the one diffusers' PixArt pipeline computes from a prompt."""
    enc = load_text_encoder(str(pixart_pipeline), max_length=MAX_LEN)
    pipe = PixArtSigmaPipeline.from_pretrained(pixart_pipeline)
    prompts = ["A red fox in the snow ", "a lighthouse at dusk"]
    ours, mask = enc.encode(prompts).values()
    theirs, their_mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                  clean_caption=False, max_sequence_length=MAX_LEN)
    assert torch.equal(mask, their_mask.long())
    torch.testing.assert_close(ours, theirs.detach().float(), rtol=1e-6, atol=1e-6)


def test_caption_dropout_swaps_in_the_empty_prompt_only_where_drawn():
    g = torch.Generator().manual_seed(0)
    embeds, mask = torch.randn(4, 3, 5, generator=g), torch.ones(4, 3, dtype=torch.long)
    null, null_mask = torch.randn(3, 5, generator=g), torch.tensor([1, 0, 0])
    cond = TextCondition({"embeds": embeds, "mask": mask}, {"embeds": null, "mask": null_mask})
    kw = cond.model_kwargs(torch.tensor([True, False, False, True]))
    assert torch.equal(kw["encoder_hidden_states"][0], null) and torch.equal(kw["encoder_hidden_states"][1], embeds[1])
    assert kw["encoder_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, timestep=None, **kw):
            seen.append(kw)
            return type("Out", (), {"sample": torch.cat([x, torch.zeros_like(x)], 1)})()
    diffusion_loss(Spy(), DiffusionSchedule(), torch.zeros(4, 4, 2, 2), cond, torch.Generator().manual_seed(1),
                   0.5, 0, True)
    drawn = torch.Generator().manual_seed(1)  # the same draws, in diffusion_loss's order
    DiffusionSchedule().sample_timesteps(4, None, drawn)
    torch.randn((4, 4, 2, 2), generator=drawn)
    drop = torch.rand(4, generator=drawn) < 0.5
    for i in range(4):
        want = null if drop[i] else embeds[i]
        assert torch.equal(seen[0]["encoder_hidden_states"][i], want)


def test_cache_stores_text_tokens_and_the_empty_prompt(tmp_path, pixart_pipeline):
    enc = load_text_encoder(str(pixart_pipeline), max_length=MAX_LEN)
    ds = CaptionedImageFolder(captioned_folder(tmp_path / "imgs", n=5), RES, random_flip=False)
    index = cache_latents(ds, tiny_vae(1), tmp_path / "cache", batch_size=2, shard_size=3, text_encoder=enc,
                          storage_dtype=torch.float32)
    assert index["text"] == {"encoder": str(pixart_pipeline), "width": TEXT_WIDTH, "max_length": MAX_LEN,
                             "fields": ["embeds", "mask"]}
    cached = CachedLatentsDataset(tmp_path / "cache")
    item = cached.sample(4, False, torch.Generator().manual_seed(0))
    assert isinstance(item, EncodedSample)
    want, want_mask = enc.encode([ds.captions[4]]).values()
    assert torch.equal(item.text["embeds"], want[0]) and torch.equal(item.text["mask"], want_mask[0])
    null, null_mask = cached.null_text().values()
    e, m = enc.encode([""]).values()
    assert torch.equal(null, e[0]) and torch.equal(null_mask, m[0])
    with pytest.raises(DataError, match="holds encoded captions, but the model is class-conditional"):
        open_training_data(tmp_path / "cache", RES, 10)


def test_a_text_model_refuses_class_options(tmp_path, pixart_pipeline):
    runner = CliRunner()
    out = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(pixart_pipeline), "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, ["sample", str(out), "--class-labels", "1", "-o", str(tmp_path / "s")])
    assert result.exit_code != 0 and "--class-labels apply to class-conditional models only" in result.output
    result = runner.invoke(app, ["sample", str(out), "-o", str(tmp_path / "s")])
    assert result.exit_code != 0 and "pass --prompt or --prompts-file" in result.output
    result = runner.invoke(app, ["sample", str(out), "--prompt", "a cat", "--scheduler", "ddpm", "-o", str(tmp_path / "s")])
    assert result.exit_code != 0 and "does not sample PixArt models" in result.output


def test_text_encoder_width_must_match_the_model(tmp_path, pixart_pipeline):
    runner = CliRunner()
    out = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(pixart_pipeline), "-o", str(out)]).exit_code == 0
    wide = save_text_encoder(tmp_path / "wide", width=24)
    result = runner.invoke(app, ["sample", str(out), "--prompt", "a cat", "--text-encoder", str(wide),
                                 "-o", str(tmp_path / "s")])
    assert result.exit_code != 0
    assert "gives 24-wide tokens" in result.output and "caption_channels 16" in result.output


# the converted folder in diffusers' own PixArt-Sigma pipeline, with ledit_convert unimportable
DROP_IN = BLOCK_LEDIT_CONVERT + textwrap.dedent("""
    import numpy as np, torch
    from diffusers import AutoencoderKL, AutoModel, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5EncoderModel
    model_dir, pipe_dir, seeds, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    pipe = PixArtSigmaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(pipe_dir, subfolder="tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(pipe_dir, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(pipe_dir, subfolder="vae"),
        transformer=AutoModel.from_pretrained(model_dir, trust_remote_code=True),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(pipe_dir, subfolder="scheduler"))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds.split(",")]
    images = pipe(["a red square on white background", "a blue square"], height=64, width=32,
                  num_inference_steps=4, guidance_scale=3.0, generator=gens, use_resolution_binning=False,
                  clean_caption=False, max_sequence_length=8, output_type="pt").images
    np.save(out, (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    print(type(pipe.transformer).__module__)
""")


def drop_in_images(script: str, model_dir, pipeline_dir, tmp_path, module: str) -> np.ndarray:
    """The two images `script` draws (seeds (7, 0) and (7, 1), as `sample --seed 7`) in a plain-diffusers process
    where ledit_convert cannot be imported, checking that the transformer came from the folder's `module`."""
    from ledit_convert.inference.sampling import image_seed
    seeds = ",".join(str(image_seed(7, i)) for i in range(2))
    env = dict(os.environ, PYTHONPATH="", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script, str(model_dir), str(pipeline_dir), seeds,
                           str(tmp_path / "theirs.npy")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert module in proc.stdout
    return np.load(tmp_path / "theirs.npy")


def test_end_to_end_surgery_cache_finetune_sample_at_2x_and_drop_in(tmp_path, pixart_pipeline):
    """surgery -> cache (latents + T5 tokens) -> 20 steps -> sample at 2x -> the same images from diffusers'
    PixArt pipeline loading the fine-tuned folder as remote code."""
    runner = CliRunner()
    model, cache, run = tmp_path / "ledit", tmp_path / "cache", tmp_path / "run"
    data = captioned_folder(tmp_path / "imgs")
    assert runner.invoke(app, ["surgery", str(pixart_pipeline), "-o", str(model)]).exit_code == 0
    result = runner.invoke(app, ["cache-latents", str(data), "--vae", str(pixart_pipeline), "--text-encoder",
                                 str(pixart_pipeline), "--max-length", str(MAX_LEN), "--resolution", str(RES),
                                 "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "-o", str(cache)])
    assert result.exit_code == 0, result.output
    assert "with 8-token captions" in result.output
    result = runner.invoke(app, ["finetune", str(model), "--data", str(cache), "--recipe",
                                 str(RECIPES / "ledit-pixart-sigma-512.yaml"), "--steps", "20", "--batch-size", "4",
                                 "--output-dir", str(run), "--checkpoint-every", "10",
                                 "--set", f"resolution={RES}", "--set", f"vae={pixart_pipeline}",
                                 "--set", "num_workers=0", "--set", "validate_every=0", "--set", "log_every=5",
                                 "--mixed-precision", "no", "--set", "ema_half_life_images=40",
                                 "--set", "trackers=[]"])
    assert result.exit_code == 0, result.output
    tuned = run / "model"
    assert json.loads((tuned / "config.json").read_text())["_class_name"] == "LEDiTPixArtTransformer2DModel"
    before = CachedLatentsDataset(cache)  # the exported weights moved away from the surgery's
    from safetensors.torch import load_file
    a, b = load_file(model / "diffusion_pytorch_model.safetensors"), load_file(tuned / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(a["locality_conv.conv.weight"], b["locality_conv.conv.weight"]) and len(before) == 8

    # sample at 2x the training height with our command; VAE and text encoder found through provenance
    samples = tmp_path / "samples"
    result = runner.invoke(app, ["sample", str(tuned), "--prompt", "a red square on white background", "--prompt",
                                 "a blue square", "--height", "64", "--width", "32", "--steps", "4", "--cfg-scale",
                                 "3.0", "--max-length", str(MAX_LEN), "--seed", "7", "--device", "cpu",
                                 "-o", str(samples)])
    assert result.exit_code == 0, result.output
    ours = np.stack([np.asarray(Image.open(samples / f"{i:06d}.png")) for i in range(2)])
    assert ours.shape == (2, 64, 32, 3) and ours.std() > 0
    assert (samples / "prompts.txt").read_text().splitlines() == ["a red square on white background", "a blue square"]

    theirs = drop_in_images(DROP_IN, tuned, pixart_pipeline, tmp_path, "modeling_ledit_pixart")
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_uncached_captions_train_with_the_recipes_text_encoder(tmp_path, pixart_pipeline):
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(pixart_pipeline), "-o", str(model)]).exit_code == 0
    data = captioned_folder(tmp_path / "imgs", n=4)
    common = ["finetune", str(model), "--data", str(data), "--mixed-precision", "no", "--steps", "2", "--batch-size", "2",
              "--output-dir", str(tmp_path / "run"), "--set", f"resolution={RES}", "--set", f"vae={pixart_pipeline}",
              "--set", "num_workers=0", "--set", "validate_every=0", "--set", "trackers=[]",
              "--set", "checkpoint_every=2", "--set", f"text_max_length={MAX_LEN}"]
    result = runner.invoke(app, common)
    assert result.exit_code != 0 and "uncached captions need the recipe's text_encoder" in result.output
    result = runner.invoke(app, common + ["--recipe", str(RECIPES / "ledit-pixart-alpha-256.yaml"),
                                          "--set", f"text_encoder={pixart_pipeline}", "--lora-rank", "2",
                                          "--set", "validate_every=2", "--set", "validation_steps=2",
                                          "--set", 'validation_prompts=["a red fox", "a cat"]'])
    assert result.exit_code == 0, result.output
    grids = sorted(os.listdir(tmp_path / "run" / "validation"))
    assert grids == ["step_00000002_1x.png", "step_00000002_2x.png"]
    assert Image.open(tmp_path / "run" / "validation" / grids[1]).size == (2 * 2 * RES, 2 * RES)  # 2 prompts in a row


def test_lora_on_pixart_adapts_attention_and_mlp_and_trains_conv_adaln_and_final_fully(tmp_path, pixart_pipeline):
    from ledit_convert.training.finetune import setup
    from ledit_convert.training.recipe import load_recipe
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(pixart_pipeline), "-o", str(model)]).exit_code == 0
    recipe = load_recipe(None, dict(resolution=RES, vae=str(pixart_pipeline), text_encoder=str(pixart_pipeline),
                                    text_max_length=MAX_LEN, lora_rank=2, global_batch_size=2, num_workers=0,
                                    validate_every=0, trackers=[], steps=1))
    run = setup(str(model), str(captioned_folder(tmp_path / "imgs", n=2)), recipe, str(tmp_path / "run"))
    trained = {n for n, p in run.raw_model.named_parameters() if p.requires_grad}
    full = {n.split("base_model.model.")[-1] for n in trained if "lora_" not in n}
    assert {n.split(".")[0] for n in full} == {"locality_conv", "adaln_single", "transformer_blocks", "proj_out",
                                               "scale_shift_table"}
    assert all(n.endswith("scale_shift_table") for n in full if n.startswith("transformer_blocks"))
    adapted = {n.split(".lora_")[0].split("base_model.model.")[-1] for n in trained if "lora_" in n}
    assert {a.split(".", 2)[2] for a in adapted} == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                                     "ff.net.0.proj", "ff.net.2"}


def test_a_cache_of_another_text_width_is_refused(tmp_path, pixart_pipeline):
    from ledit_convert.training.finetune import setup
    from ledit_convert.training.recipe import load_recipe
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(pixart_pipeline), "-o", str(model)]).exit_code == 0
    wide = load_text_encoder(str(save_text_encoder(tmp_path / "wide", width=24)), max_length=MAX_LEN)
    ds = CaptionedImageFolder(captioned_folder(tmp_path / "imgs", n=2), RES, random_flip=False)
    cache_latents(ds, tiny_vae(1), tmp_path / "cache", text_encoder=wide)
    recipe = load_recipe(None, dict(resolution=RES, vae=str(pixart_pipeline), global_batch_size=2, num_workers=0,
                                    validate_every=0, trackers=[], steps=1))
    with pytest.raises(DataError, match="holds 24-wide text tokens .* caption_channels 16"):
        setup(str(model), str(tmp_path / "cache"), recipe, str(tmp_path / "run"))


@pytest.mark.parametrize("name, train, tokens", [("ledit-pixart-sigma-512", 512, 300), ("ledit-pixart-alpha-256", 256, 120)])
def test_pixart_recipes_train_at_their_size_with_their_token_count(name, train, tokens):
    from ledit_convert.training.recipe import load_recipe
    recipe = load_recipe(str(RECIPES / f"{name}.yaml"))
    assert (recipe.resolution, recipe.text_max_length) == (train, tokens)
    assert recipe.class_dropout == 0.1 and recipe.text_encoder and recipe.validate_every > 0  # grids at 1x and 2x


def evaluate_with_prompts(tmp_path, pipeline_dir, stock_name: str, resolutions: str, max_length: int):
    """`evaluate --prompts-file` of a surgery of `pipeline_dir` ("ledit") and the stock pipeline; its results.json."""
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(pipeline_dir), "-o", str(model)]).exit_code == 0
    ref = captioned_folder(tmp_path / "ref", n=6)
    (tmp_path / "prompts.txt").write_text("a red square\n\na blue square on white background\n")
    result = runner.invoke(app, [
        "evaluate", "--model", f"ledit={model}", "--model", f"{stock_name}={pipeline_dir}", "--resolutions",
        resolutions, "--reference", str(ref), "--prompts-file", str(tmp_path / "prompts.txt"), "--max-length",
        str(max_length), "--num-samples", "4", "--steps", "2", "--device", "cpu", "--batch-size", "4",
        "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {(r["model"], r["resolution"]) for r in data["rows"]} == {
        (m, r) for m in ("ledit", stock_name) for r in resolutions.split(",")}
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in data["rows"])
    assert data["settings"]["prompts"] == str(tmp_path / "prompts.txt")
    return model, ref


def test_evaluate_with_a_prompts_file_scores_each_size_for_ledit_and_stock_pixart(tmp_path, pixart_pipeline):
    runner = CliRunner()
    model, ref = evaluate_with_prompts(tmp_path, pixart_pipeline, "pixart", "32,32x64", MAX_LEN)
    result = runner.invoke(app, ["evaluate", "--model", str(model), "--resolutions", "32", "--reference", str(ref),
                                 "--num-samples", "2", "--device", "cpu", "-o", str(tmp_path / "e2")])
    assert result.exit_code != 0 and "pass --prompt or --prompts-file" in result.output


def test_a_stock_pixart_samples_with_the_sin_cos_scalings(tmp_path, pixart_pipeline):
    runner = CliRunner()
    base = ["--prompt", "a red square", "--num-samples", "1", "--steps", "2", "--height", "64", "--width", "64"]
    images = {}
    for scaling in (None, "interpolate", "ntk", "dype-interpolate"):
        out = tmp_path / f"s-{scaling}"
        extra = ["--position-scaling", scaling] if scaling else []
        result = runner.invoke(app, ["sample", str(pixart_pipeline), *base, *extra, "-o", str(out)])
        assert result.exit_code == 0, result.output
        images[scaling] = np.asarray(Image.open(next(out.glob("000000*.png"))), dtype=np.int16)
    assert np.abs(images[None] - images["interpolate"]).max() <= 1  # diffusers' own table is the interpolation
    assert np.abs(images["ntk"] - images["interpolate"]).max() > 1
    result = runner.invoke(app, ["sample", str(pixart_pipeline), *base, "--position-scaling", "yarn", "-o",
                                 str(tmp_path / "bad")])
    assert result.exit_code == 3 and "'yarn' does not apply to a model with a sin/cos table" in result.output
