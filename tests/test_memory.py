"""The memory plan: its arithmetic against hand-computed bytes, its parameter counts against hand-derived block
formulas and against the folders surgery writes, and the launch decisions it supports."""
import json
from pathlib import Path

import pytest

from ledit_convert.errors import ConfigError
from ledit_convert.training.memory import (GiB, PUBLISHED, ModelSize, build_on_meta, ledit_config, memory_plan,
                                           model_size, plans_for, tokens_per_sample)
from ledit_convert.training.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# P 1000 parameters, T 600 trained, R 100 outside blocks, B 200 in the largest block (150 trained), 4 blocks, width 8
SIZE = ModelSize(params=1000, trainable=600, root=100, largest_block=200, largest_block_trainable=150, blocks=4,
                 width=8)
BF16_CKPT = Recipe(mixed_precision="bf16", gradient_checkpointing=True, global_batch_size=8)


def test_ddp_bytes_by_hand():
    plan = memory_plan(SIZE, BF16_CKPT, "ddp", gpus=4, tokens=10)
    assert plan.micro_batch == 2  # 8 images over 4 GPUs
    assert plan.params == 4 * 1000 + 2 * (100 + 200)  # fp32 weights + autocast's copies of the root and one block
    assert plan.grads == 4 * 600 + 4 * 600  # .grad + DDP's buckets
    assert plan.optimizer == 8 * 600 and plan.ema == 4 * 1000
    # per image: 4 blocks keep their 2-byte input (10 tokens x 8 wide) = 640, one block recomputes 34 x 10 x 8 = 2720
    assert plan.activations == 2 * (640 + 2720)
    assert plan.total == 4600 + 4800 + 4800 + 4000 + 6720


def test_fsdp2_bytes_by_hand():
    plan = memory_plan(SIZE, BF16_CKPT, "fsdp2", gpus=4, tokens=10)
    assert plan.params == 1000 + 2 * (100 + 2 * 200)  # 4000 / 4 fp32 shards + bf16 root and two gathered blocks
    assert plan.grads == 600 + 6 * 150  # 2400 / 4 + one block's bf16 gradients and their fp32 reduce copy
    assert (plan.optimizer, plan.ema, plan.activations) == (1200, 600, 6720)
    kept = memory_plan(SIZE, Recipe(mixed_precision="bf16", gradient_checkpointing=True, global_batch_size=8,
                                    fsdp_reshard_after_forward=False), "fsdp2", gpus=4, tokens=10)
    assert kept.params == 1000 + 2 * 1000  # every block stays gathered from forward to backward


def test_fp32_without_checkpointing_by_hand():
    recipe = Recipe(global_batch_size=8, gradient_accumulation_steps=2)
    ddp = memory_plan(SIZE, recipe, "ddp", gpus=2, tokens=10)
    assert ddp.micro_batch == 2 and ddp.params == 4000  # no autocast copies in fp32
    assert ddp.activations == 2 * 4 * (34 * 10 * 8 * 2)  # 2 images x 4 blocks x fp32 (twice 16-bit) activations
    fsdp = memory_plan(SIZE, recipe, "fsdp2", gpus=2, tokens=10, micro_batch=3)
    assert fsdp.micro_batch == 3 and fsdp.params == 2000 + 4 * 500 and fsdp.grads == 1200 + 8 * 150


def test_refusals():
    with pytest.raises(ConfigError, match="fsdp2 on 1 GPU"):
        memory_plan(SIZE, BF16_CKPT, "fsdp2", gpus=1, tokens=10)
    with pytest.raises(ConfigError, match="strategy 'zero' is not one of ddp, fsdp2"):
        memory_plan(SIZE, BF16_CKPT, "zero", gpus=2, tokens=10)
    with pytest.raises(ConfigError, match="does not split over 3"):
        memory_plan(SIZE, BF16_CKPT, "ddp", gpus=3, tokens=10)
    with pytest.raises(ConfigError, match="neither a model folder nor one of the published models"):
        plans_for("no-such-model", BF16_CKPT, [8])


def test_counts_of_a_tiny_dit_by_hand():
    """D = 32: a block is qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, adaLN 6D^2+6D = 18D^2+15D; outside the
    blocks the patch conv (3x2x2 in) D*12+D, the timestep MLP 256D+D+D^2+D, 4 class rows 4D, the 3x3 conv 9D^2+D and
    the final layer 2D^2+2D + D*24+24."""
    from ledit_convert.models.dit import LEDiTTransformer2DModel
    model = LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32,
                                    num_layers=2, num_attention_heads=2, num_classes=3,
                                    attention_layout=["self", "causal"])
    d = 32
    block = 18 * d * d + 15 * d
    root = (d * 12 + d) + (256 * d + d + d * d + d) + 4 * d + (9 * d * d + d) + (2 * d * d + 2 * d + d * 24 + 24)
    full = model_size(model, "dit", Recipe())
    assert (full.largest_block, full.root, full.params) == (block, root, 2 * block + root)
    assert (full.blocks, full.width) == (2, d)
    # rank 2 on qkv, proj, fc1, fc2: r(D + 3D) + r(D + D) + r(D + 4D) + r(4D + D) = 16rD per block; adaLN, the conv
    # and the final layer train fully
    lora = model_size(model, "dit", Recipe(lora_rank=2))
    adapters = 16 * 2 * d
    assert lora.params == full.params + 2 * adapters
    assert lora.trainable == 2 * (adapters + 6 * d * d + 6 * d) + (9 * d * d + d) + (2 * d * d + 2 * d + d * 24 + 24)
    assert lora.largest_block_trainable == adapters + 6 * d * d + 6 * d
    assert sum(p.numel() for p in model.parameters()) == full.params  # the model itself was not wrapped


def test_sd35_large_block_by_hand_and_the_published_size():
    """SD3.5 Large, D = 2432: attention q,k,v,out for image and text 8D^2+8D, RMS q/k norms 4 x 64, two MLPs
    2 x (8D^2+5D), two adaLN-Zero linears 2 x (6D^2+6D): 36D^2+30D+256 per block (the last block's text side is
    smaller). About 8.1B parameters as published, plus surgery's 9D^2+D conv."""
    family, config = ledit_config(PUBLISHED["sd3.5-large"])
    size = model_size(build_on_meta(family, config), family, Recipe())
    d = 2432
    assert (family, size.blocks, size.width) == ("sd3", 38, d)
    assert size.largest_block == 36 * d * d + 30 * d + 4 * 64
    stock = size.params - (9 * d * d + d)
    assert abs(stock - 8.1e9) / 8.1e9 < 0.01
    assert tokens_per_sample(family, config, Recipe(resolution=1024)) == (1024 // 8 // 2) ** 2 + 77 + 256


@pytest.mark.parametrize("name, published", [("dit-xl-2-256", 675e6), ("pixart-sigma-xl-2-1024", 611e6),
                                             ("sd3.5-medium", 2.24e9)])
def test_published_sizes(name, published):
    family, config = ledit_config(PUBLISHED[name])
    size = model_size(build_on_meta(family, config), family, Recipe())
    d = size.width
    assert abs(size.params - (9 * d * d + d) - published) / published < 0.01


def test_stock_configs_count_as_the_folders_surgery_writes(tmp_path):
    """ledit_config's reading of a stock config against surgery's own output, weights and all."""
    from typer.testing import CliRunner
    from factories import diffusers_dit
    from test_sd3 import stock
    from ledit_convert.cli import app
    from ledit_convert.conversion.checkpoints import read_checkpoint, read_json
    for name, model in (("dit", diffusers_dit()), ("sd3", stock("sd35"))):
        model.save_pretrained(tmp_path / name)
        assert CliRunner().invoke(app, ["surgery", str(tmp_path / name), "-o", str(tmp_path / f"{name}-ledit")]
                                  ).exit_code == 0
        converted = sum(t.numel() for t in read_checkpoint(str(tmp_path / f"{name}-ledit")).state_dict.values()
                        if t.dtype.is_floating_point)
        family, config = ledit_config(read_json(tmp_path / name / "config.json"))
        assert model_size(build_on_meta(family, config), family, Recipe()).params == converted
        _, from_folder, _ = plans_for(str(tmp_path / f"{name}-ledit"), Recipe(global_batch_size=8), [8])
        _, from_stock, _ = plans_for(str(tmp_path / name), Recipe(global_batch_size=8), [8])
        assert from_folder == from_stock


def test_sd35_large_recipe_needs_fsdp2_on_8_gpus_and_fits_there():
    recipe = load_recipe(str(RECIPES / "ledit-sd35-large-1024.yaml"))
    _, _, plans = plans_for("sd3.5-large", recipe, [8])
    ddp, fsdp = plans
    assert ddp.total > 80 * GiB > 2 * fsdp.total  # DDP cannot hold it on an 80 GB GPU; FSDP2 with room to spare


def test_inspect_memory_plans_from_a_published_config_without_weights():
    """`inspect --memory` of a published name: the plan from its config alone, one row per strategy and count."""
    from typer.testing import CliRunner
    from ledit_convert.cli import app
    recipe = str(RECIPES / "ledit-sd35-large-1024.yaml")
    result = CliRunner().invoke(app, ["inspect", "sd3.5-large", "--memory", "--recipe", recipe, "--gpus", "1,8",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tokens_per_image"] == 4429 and report["parameters"] == report["trainable"]
    assert [(row["strategy"], row["gpus"], row["micro_batch"]) for row in report["gib_per_gpu"]] == [
        ("ddp", 1, 64), ("ddp", 8, 8), ("fsdp2", 8, 8)]  # no fsdp2 row for 1 GPU
    table = CliRunner().invoke(app, ["inspect", "sd3.5-large", "--memory", "--recipe", recipe, "--gpus", "8"])
    assert table.exit_code == 0 and "fsdp2" in table.output and "GiB per GPU" in table.output
    bad = CliRunner().invoke(app, ["inspect", "sd3.5-large", "--memory", "--gpus", "8,x"])
    assert bad.exit_code == 3 and "--gpus '8,x'" in bad.stderr
