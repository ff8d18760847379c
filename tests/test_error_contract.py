"""The error contract on every family's paths (DiT, PixArt, SD3), through the command line: a bad input gives the
README's exit code and one stderr line naming the file or option, no traceback, and no new files."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _tiny import NUM_CLASSES, TEXT_WIDTH, randomize_, tiny_ledit, tiny_vae
from factories import diffusers_dit
from test_cli import one_line_error
from test_pixart import stock as stock_pixart
from test_sd3 import stock as stock_sd3
from test_sd3_text2image import sd3_pipeline  # noqa: F401 (a fixture)
from test_text2image import captioned_folder, pixart_pipeline  # noqa: F401 (a fixture)
from ledit_convert.cli import app
from ledit_convert.data.images import ImageFolderDataset
from ledit_convert.data.latents import cache_latents
from ledit_convert.errors import DataError, first_line

runner = CliRunner()
FAMILIES = ("dit", "pixart", "sd3")
RES = 32  # pixels: every tiny model's sample_size 8 x the tiny VAE's factor 4
INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def files_under(root) -> set:
    """Every path below `root`, to show a failed command wrote nothing."""
    return {os.path.join(d, n) for d, dirs, names in os.walk(root) for n in dirs + names}


def refused(tmp_path, args, code, text):
    """Run a command that must fail with `code` and one line naming `text`, leaving no new file under tmp_path."""
    before = files_under(tmp_path)
    result = runner.invoke(app, args)
    one_line_error(result, code, text)
    assert files_under(tmp_path) == before, sorted(files_under(tmp_path) - before)
    return result


def sixteen_channel_vae(folder):
    """A VAE whose 16 latent channels fit none of the tiny (4-channel) models."""
    from diffusers import AutoencoderKL
    blocks = (8, 8, 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=blocks,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    randomize_(vae, 0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def homes(tmp_path_factory, pixart_pipeline, sd3_pipeline):  # noqa: F811
    """Per family: a converted model folder, its VAE, and the text-encoder options that cache, sample and train it."""
    root = tmp_path_factory.mktemp("homes")
    tiny_ledit().save_pretrained(root / "dit")
    tiny_vae().save_pretrained(root / "dit-vae")
    out = {"dit": (root / "dit", str(root / "dit-vae"), [], [], [])}
    for family, pipe, option in (("pixart", pixart_pipeline, "--text-encoder"),
                                 ("sd3", sd3_pipeline, "--text-encoders")):
        result = runner.invoke(app, ["surgery", str(pipe), "-o", str(root / family)])
        assert result.exit_code == 0, result.output
        out[family] = (root / family, str(pipe), [option, str(pipe), "--max-length", "8"],
                       ["--text-encoder", str(pipe), "--max-length", "8"],
                       ["--set", f"text_encoder={pipe}", "--set", "text_max_length=8"])
    return out


def finetune_args(model, data, vae, text_set, run):
    """A two-step fine-tune of `model` on `data` with two data-loader workers."""
    return ["finetune", str(model), "--data", str(data), "--steps", "2", "--batch-size", "2", "--mixed-precision",
            "no", "--output-dir", str(run), "--vae", vae, "--set", f"resolution={RES}", "--set", "num_workers=2",
            "--set", "validate_every=0", "--set", "trackers=[]", *text_set]


def unreadable_images(root, captions: bool):
    """Two files named as images that no decoder reads (with sidecar captions for text models)."""
    root.mkdir(parents=True)
    for i in range(2):
        (root / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        if captions:
            (root / f"{i}.txt").write_text("a red square")
    return root


# 1. a sharded checkpoint whose index is cut off mid-file

def stock_transformer(family):
    return {"dit": lambda: diffusers_dit(hidden=32, depth=2, heads=2), "pixart": lambda: stock_pixart("sigma", 3),
            "sd3": lambda: stock_sd3("sd3", 3)}[family]()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_truncated_shard_index_is_a_checkpoint_error_naming_it(family, tmp_path):
    folder = tmp_path / "transformer"
    stock_transformer(family).save_pretrained(folder, max_shard_size="20KB")
    index = folder / INDEX
    text = index.read_text()
    assert len(set(json.loads(text)["weight_map"].values())) > 1
    index.write_text(text[: len(text) // 2])
    refused(tmp_path, ["surgery", str(folder), "-o", str(tmp_path / "out")], 2, str(index))
    index.write_text(text.replace(".safetensors\"", ".missing.safetensors\"", 1))
    refused(tmp_path, ["surgery", str(folder), "-o", str(tmp_path / "out")], 2, "which is missing")


def test_a_pipeline_folder_without_transformer_says_so(tmp_path, pixart_pipeline):  # noqa: F811
    pipe = tmp_path / "pipe"
    shutil.copytree(pixart_pipeline, pipe, ignore=shutil.ignore_patterns("transformer"))
    refused(tmp_path, ["surgery", str(pipe), "-o", str(tmp_path / "out")], 2, "without transformer/")
    refused(tmp_path, ["inspect", str(pipe)], 2, "without transformer/")


# 2. errors inside DataLoader workers

@pytest.mark.parametrize("family", FAMILIES)
def test_worker_errors_read_as_the_same_one_line(family, homes, tmp_path):
    model, vae, cache_text, _, text_set = homes[family]
    data = unreadable_images(tmp_path / "images", captions=family != "dit")
    result = refused(tmp_path, ["cache-latents", str(data), "--vae", vae, "--resolution", str(RES),  # 4 workers
                                "-o", str(tmp_path / "cache"), *cache_text], 4, "2 unreadable images in a row")
    assert "every image of the dataset" in result.stderr and "DataLoader" not in result.stderr
    refused(tmp_path, finetune_args(model, data, vae, text_set, tmp_path / "run"), 4, "2 unreadable images in a row")


class _Failing(torch.utils.data.Dataset):
    """Item reads that fail as a broken disk would, not as a LeditError."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise OSError(f"item {index}: disk gone")


def test_an_error_in_a_loader_worker_keeps_the_workers_one_line(tmp_path):
    dataset = ImageFolderDataset(unreadable_images(tmp_path / "images", captions=False), RES)
    with pytest.raises(DataError) as in_process:
        dataset.load(0)
    with pytest.raises(DataError) as in_worker:
        next(iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)))
    assert str(in_worker.value) == str(in_process.value) and "2 unreadable images in a row" in str(in_process.value)
    with pytest.raises(DataError) as cached:
        cache_latents(dataset, tiny_vae(), tmp_path / "cache", num_workers=2)
    assert str(cached.value) == str(in_process.value) and not (tmp_path / "cache").exists()
    with pytest.raises(OSError) as other:
        next(iter(torch.utils.data.DataLoader(_Failing(), num_workers=1)))
    assert first_line(other.value) == "item 0: disk gone"  # what the command line prints for an unexpected error


# 3. a converted model whose weights file is truncated

@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_and_sample_refuse_truncated_weights(family, homes, tmp_path):
    source, vae, _, sample_text, text_set = homes[family]
    model = tmp_path / "model"
    shutil.copytree(source, model)
    weights = model / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = captioned_folder(tmp_path / "images", n=2)
    refused(tmp_path, finetune_args(model, data, vae, text_set, tmp_path / "run"), 2, str(weights))
    prompt = ["--prompt", "a cat"] if family != "dit" else []
    refused(tmp_path, ["sample", str(model), "--vae", vae, "--steps", "1", "--num-samples", "1", *prompt,
                       *sample_text, "-o", str(tmp_path / "samples")], 2, str(weights))


# 4. a VAE that does not fit the transformer

@pytest.mark.parametrize("family", FAMILIES)
def test_a_vae_that_does_not_fit_is_refused_before_any_work(family, homes, tmp_path):
    model, _, _, sample_text, text_set = homes[family]
    wide = sixteen_channel_vae(tmp_path / "vae16")
    prompt = ["--prompt", "a cat"] if family != "dit" else []
    sample = ["sample", str(model), "--steps", "1", "--num-samples", "1", *prompt, *sample_text,
              "-o", str(tmp_path / "samples")]
    result = refused(tmp_path, sample + ["--vae", wide], 3, f"--vae {wide}")
    assert "16-channel latents" in result.stderr and "in_channels 4" in result.stderr
    data = captioned_folder(tmp_path / "images", n=2)
    refused(tmp_path, finetune_args(model, data, wide, text_set, tmp_path / "run"), 3, f"--vae {wide}")


def test_sd3_refuses_a_vae_without_a_shift_factor(homes, tmp_path):
    model, _, _, sample_text, text_set = homes["sd3"]
    tiny_vae(1).save_pretrained(tmp_path / "vae")  # SD-style: no shift_factor
    vae = str(tmp_path / "vae")
    refused(tmp_path, ["sample", str(model), "--prompt", "a cat", "--steps", "1", *sample_text, "--vae", vae,
                       "-o", str(tmp_path / "samples")], 3, "shift_factor")
    data = captioned_folder(tmp_path / "images", n=2)
    refused(tmp_path, finetune_args(model, data, vae, text_set, tmp_path / "run"), 3, "shift_factor")


def test_a_text_encoder_of_another_width_is_refused_before_any_work(homes, tmp_path):
    from _tiny import save_text_encoder
    model = homes["pixart"][0]
    wide = save_text_encoder(tmp_path / "wide", width=TEXT_WIDTH + 8)
    refused(tmp_path, ["sample", str(model), "--prompt", "a cat", "--text-encoder", str(wide), "--max-length", "8",
                       "-o", str(tmp_path / "samples")], 3, "caption_channels 16")


# the output: refused with the CLI's spelling, written whole or not at all

def test_sample_names_the_flag_and_replaces_a_folder_only_when_done(homes, tmp_path):
    model, vae = homes["dit"][:2]
    out = tmp_path / "samples"
    out.mkdir()
    (out / "old.png").write_bytes(b"")
    args = ["sample", str(model), "--vae", vae, "--steps", "1", "--num-samples", "1", "--class-labels", "1",
            "--device", "cpu", "-o", str(out)]
    refused(tmp_path, args, 5, "pass --overwrite")
    refused(tmp_path, args + ["--overwrite", "--class-labels", str(NUM_CLASSES)], 3, f"class label {NUM_CLASSES}")
    result = runner.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["000000_class1.png", "grid.png"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary sibling left
    assert Image.open(out / "grid.png").size[0] > 0
