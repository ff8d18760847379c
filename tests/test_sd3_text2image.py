"""SD3 text-to-image end to end, offline: SD3's three text encoders, the text cache, rectified-flow fine-tuning with
caption dropout, prompt sampling past the table's size cap, and the converted folder in diffusers' own SD3 pipeline."""
import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
from typer.testing import CliRunner

from _tiny import save_sd3_text_encoders, tiny_vae
from test_sd3 import stock
from test_surgery import BLOCK_LEDIT_CONVERT
from test_text2image import captioned_folder, drop_in_images, evaluate_with_prompts
from ledit_convert.cli import app
from ledit_convert.data.latents import CachedLatentsDataset
from ledit_convert.data.text import load_sd3_text_encoders

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RES = 32  # pixels: the tiny SD3's sample_size 8 x the tiny VAE's factor 4
MAX_LEN = 7  # T5 tokens


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    """A tiny SD3 pipeline folder: transformer, VAE (with a shift factor, as SD3's), two CLIPs + T5, scheduler."""
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    stock("sd3", seed=3).save_pretrained(folder / "transformer")
    vae = tiny_vae(1)
    vae.register_to_config(shift_factor=0.1)
    vae.save_pretrained(folder / "vae")
    save_sd3_text_encoders(folder)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder


def diffusers_pipeline(folder, transformer):
    """diffusers' StableDiffusion3Pipeline from the folder's parts (its own text encoders and tokenizers)."""
    from diffusers import AutoencoderKL
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3"),
        tokenizer_3=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_3"))


def test_encoding_matches_the_sd3_pipelines_own(sd3_pipeline):
    ours = load_sd3_text_encoders(str(sd3_pipeline), max_length=MAX_LEN)
    pipe = diffusers_pipeline(sd3_pipeline, stock("sd3"))
    prompts = ["a red fox in the snow", "a lighthouse at dusk on the sea"]
    theirs = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False, device="cpu",
                                max_sequence_length=MAX_LEN)
    got = ours.encode(prompts)
    assert got["embeds"].shape == (2, 6 + MAX_LEN, 12) and got["pooled"].shape == (2, 10)
    torch.testing.assert_close(got["embeds"], theirs[0].detach().float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["pooled"], theirs[2].detach().float(), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(got["embeds"][:, :6, 8:]) == 0  # the CLIP widths 4 + 4 zero-padded to 12


# the fine-tuned folder in diffusers' own SD3 pipeline, with ledit_convert unimportable
DROP_IN = BLOCK_LEDIT_CONVERT + textwrap.dedent("""
    import numpy as np, torch
    from diffusers import AutoModel, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
""") + inspect.getsource(diffusers_pipeline) + textwrap.dedent("""
    model_dir, pipe_dir, seeds, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    pipe = diffusers_pipeline(pipe_dir, AutoModel.from_pretrained(model_dir, trust_remote_code=True))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds.split(",")]
    images = pipe(["a red square on white background", "a blue square"], height=64, width=32, num_inference_steps=3,
                  guidance_scale=3.0, generator=gens, max_sequence_length=7, output_type="pt").images
    np.save(out, (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    print(type(pipe.transformer).__module__)
""")


def test_end_to_end_surgery_cache_flow_finetune_sample_at_2x_and_drop_in(tmp_path, sd3_pipeline):
    """surgery -> cache (latents + joint tokens + pooled) -> 20 flow steps -> sample at 2x -> the same images from
    diffusers' SD3 pipeline loading the fine-tuned folder as remote code."""
    runner = CliRunner()
    model, cache, run = tmp_path / "ledit", tmp_path / "cache", tmp_path / "run"
    data = captioned_folder(tmp_path / "imgs")
    assert runner.invoke(app, ["surgery", str(sd3_pipeline), "-o", str(model)]).exit_code == 0
    result = runner.invoke(app, ["cache-latents", str(data), "--vae", str(sd3_pipeline), "--text-encoders",
                                 str(sd3_pipeline), "--max-length", str(MAX_LEN), "--resolution", str(RES),
                                 "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-flips",
                                 "-o", str(cache)])
    assert result.exit_code == 0, result.output
    cached = CachedLatentsDataset(cache, random_flip=False)
    assert cached.text["fields"] == ["embeds", "pooled"] and cached.shift_factor == pytest.approx(0.1)
    result = runner.invoke(app, ["finetune", str(model), "--data", str(cache), "--recipe",
                                 str(RECIPES / "ledit-sd35-medium-512.yaml"), "--steps", "20", "--batch-size", "4",
                                 "--output-dir", str(run), "--checkpoint-every", "10", "--mixed-precision", "no",
                                 "--set", f"resolution={RES}", "--set", f"vae={sd3_pipeline}",
                                 "--set", "num_workers=0", "--set", "validate_every=0", "--set", "log_every=5",
                                 "--set", "random_flip=false", "--set", "learning_rate=1e-3",
                                 "--set", "ema_half_life_images=40", "--set", "trackers=[]"])
    assert result.exit_code == 0, result.output
    tuned = run / "model"
    assert json.loads((tuned / "config.json").read_text())["_class_name"] == "LEDiTSD3Transformer2DModel"
    assert json.loads((tuned / "provenance.json").read_text())["options"]["recipe"]["objective"] == "flow"
    assert json.loads((tuned / "config.json").read_text())["objective"] == "flow"
    a = load_file(model / "diffusion_pytorch_model.safetensors")
    b = load_file(tuned / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(a["locality_conv.conv.weight"], b["locality_conv.conv.weight"])

    samples = tmp_path / "samples"
    result = runner.invoke(app, ["sample", str(tuned), "--prompt", "a red square on white background", "--prompt",
                                 "a blue square", "--height", "64", "--width", "32", "--steps", "3", "--cfg-scale",
                                 "3.0", "--max-length", str(MAX_LEN), "--seed", "7", "--device", "cpu",
                                 "-o", str(samples)])
    assert result.exit_code == 0, result.output
    ours = np.stack([np.asarray(Image.open(samples / f"{i:06d}.png")) for i in range(2)])
    assert ours.shape == (2, 64, 32, 3) and ours.std() > 0

    theirs = drop_in_images(DROP_IN, tuned, sd3_pipeline, tmp_path, "modeling_ledit_sd3")
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_stock_sd3_samples_within_its_cap_and_the_ledit_past_it(tmp_path, sd3_pipeline):
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(sd3_pipeline), "-o", str(model)]).exit_code == 0
    common = ["--prompt", "a cat", "--steps", "2", "--max-length", str(MAX_LEN), "--device", "cpu"]
    result = runner.invoke(app, ["sample", str(sd3_pipeline), "--height", "32", "--width", "48", *common,
                                 "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    # 112 px = 28 latent cells = 14 patches: past the tiny table's 12
    result = runner.invoke(app, ["sample", str(model), "--height", "112", "--width", "32", *common,
                                 "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "b" / "000000.png").size == (32, 112)
    result = runner.invoke(app, ["sample", str(model), "--scheduler", "dpm", *common, "-o", str(tmp_path / "c")])
    assert result.exit_code != 0 and "does not sample SD3 models" in result.output


def test_lora_on_sd3_adapts_attention_and_mlps_and_trains_conv_adaln_and_final_fully(tmp_path, sd3_pipeline):
    from ledit_convert.training.finetune import setup, train
    from ledit_convert.training.recipe import load_recipe
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(sd3_pipeline), "-o", str(model)]).exit_code == 0
    recipe = load_recipe(None, dict(resolution=RES, vae=str(sd3_pipeline), text_encoder=str(sd3_pipeline),
                                    text_max_length=MAX_LEN, lora_rank=2, global_batch_size=2, num_workers=0,
                                    validate_every=0, trackers=[], steps=1, random_flip=False))
    run = setup(str(model), str(captioned_folder(tmp_path / "imgs", n=2)), recipe, str(tmp_path / "run"))
    trained = {n.split("base_model.model.")[-1] for n, p in run.raw_model.named_parameters() if p.requires_grad}
    full = {n for n in trained if "lora_" not in n}
    assert {n.split(".")[0] for n in full} == {"locality_conv", "transformer_blocks", "norm_out", "proj_out"}
    assert {n.split(".", 2)[2] for n in full if n.startswith("transformer_blocks")} == {
        "norm1.linear.weight", "norm1.linear.bias", "norm1_context.linear.weight", "norm1_context.linear.bias"}
    adapted = {n.split(".lora_")[0].split(".", 2)[2] for n in trained if "lora_" in n}
    assert adapted == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2"}
    assert train(run)["steps"] == 1  # a flow step through the uncached captions' encoders


def test_objectives_are_refused_where_the_family_does_not_train_with_them(tmp_path, sd3_pipeline):
    runner = CliRunner()
    model = tmp_path / "ledit"
    assert runner.invoke(app, ["surgery", str(sd3_pipeline), "-o", str(model)]).exit_code == 0
    result = runner.invoke(app, ["finetune", str(model), "--data", str(captioned_folder(tmp_path / "i", n=2)),
                                 "--steps", "1", "--batch-size", "2", "--set", "objective=diffusion",
                                 "--set", f"resolution={RES}", "--set", f"vae={sd3_pipeline}",
                                 "--set", f"text_encoder={sd3_pipeline}", "--output-dir", str(tmp_path / "r")])
    assert result.exit_code != 0 and "SD3 models fine-tune with 'flow'" in result.output


def test_sd35_recipe_trains_with_flow_at_512():
    from ledit_convert.training.recipe import load_recipe
    recipe = load_recipe(str(RECIPES / "ledit-sd35-medium-512.yaml"))
    assert (recipe.objective, recipe.resolution, recipe.text_max_length) == ("flow", 512, 256)
    assert recipe.flow_weighting == "logit_normal" and recipe.class_dropout == 0.1 and not recipe.random_flip


def test_evaluate_with_a_prompts_file_scores_ledit_and_stock_sd3(tmp_path, sd3_pipeline):
    evaluate_with_prompts(tmp_path, sd3_pipeline, "sd3", "32,64x32", MAX_LEN)


def test_a_pipeline_scheduler_with_resolution_dependent_shift_is_used_as_it_is(tmp_path, sd3_pipeline):
    """SD3's pipeline computes the shift per image size when its scheduler asks for it; ours passes it through."""
    import shutil

    from ledit_convert.inference.text_pipeline import make_text_scheduler
    folder = tmp_path / "pipe"
    shutil.copytree(sd3_pipeline, folder)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16,
                                    max_image_seq_len=256).save_pretrained(folder / "scheduler")
    assert make_text_scheduler("flow", "sd3", str(folder)).config.use_dynamic_shifting
    images = {}
    for name, home in (("fixed", sd3_pipeline), ("dynamic", folder)):
        result = CliRunner().invoke(app, ["sample", str(home), "--prompt", "a cat", "--steps", "3", "--height", "64",
                                          "--width", "32", "--max-length", str(MAX_LEN), "--device", "cpu",
                                          "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(tmp_path / name / "000000.png")).astype(int)
    assert np.abs(images["fixed"] - images["dynamic"]).max() > 0  # another shift, another trajectory
