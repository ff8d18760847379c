"""The fading table: the source's sin/cos table added back to an LEDiT's patch embedding with a falling weight.

At weight 1 a converted model is its stock model with causal blocks (DiT against a float64 reference at every
weight; PixArt and SD3 against our classes in stock mode, which equal diffusers'); the EMA and every export have
no table; the harness loop and finetune resume mid-fade exactly; evaluations run without it."""
import math

import pytest
import torch
from safetensors.torch import load_file

from factories import facebook_state_dict, inputs, random_ledit_conv, rel_err
from reference import reference_forward, sincos_table_np
from test_fastloop import assert_same, make_arm, pixels, weights
from test_finetune import BASE, make_images, make_model
from test_model import CFG, make
import test_pixart
import test_sd3
from ledit_convert.errors import ConfigError
from ledit_convert.models.dit import LEDiTTransformer2DModel
from ledit_convert.models.pixart import LEDiTPixArtTransformer2DModel
from ledit_convert.models.sd3 import LEDiTSD3Transformer2DModel
from ledit_convert.training.fastloop import Arm, DeviceData
from ledit_convert.training.finetune import finetune, setup
from ledit_convert.training.position_fade import PositionFade, fade_weight, suspended
from ledit_convert.training.recipe import load_recipe

LAYOUT = ["self", "causal"] * 2


def test_the_weight_falls_linearly_from_one_to_zero():
    assert [fade_weight(i, 4) for i in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("weight", [1.0, 0.4, 0.0])
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_dit_with_a_fading_table_matches_the_float64_reference(weight, size):
    """LEDiT (causal blocks, random conv) + weight x DiT's table (extrapolated past the training grid) against the
    float64 forward with that table added before the conv."""
    sd = facebook_state_dict(seed=0)
    model = random_ledit_conv(make(sd, position_encoding="none", attention_layout=LAYOUT, locality="full"))
    fade = PositionFade(model, fade_images=10)
    assert fade.set_images_seen(round((1 - weight) * 10)) == pytest.approx(weight)
    x, t, y = inputs(height=size[0], width=size[1])
    with torch.no_grad():
        ours = model(x, t, y, attention_kwargs={"locality_dilation": 1}).sample
    h, w = size[0] // 2, size[1] // 2
    conv = (model.locality_conv.conv.weight, model.locality_conv.conv.bias, 1)
    factor = math.sqrt(math.log(h * w) / math.log(16))
    ref = reference_forward(sd, CFG, x, t, y, pos_table=weight * sincos_table_np(64, h, w), layout=LAYOUT,
                            scan=model.config.causal_scan, conv=conv, logit_factor=factor)
    assert rel_err(ours, ref) <= 1e-5
    with suspended(model), torch.no_grad():  # suspended: the plain LEDiT
        plain = model(x, t, y, attention_kwargs={"locality_dilation": 1}).sample
    fade.remove()
    with torch.no_grad():
        assert torch.equal(plain, model(x, t, y, attention_kwargs={"locality_dilation": 1}).sample)


def _stock_twin(model, cls, **table_on):
    """Our class in stock mode (its own table) with the converted model's weights, causal blocks and conv."""
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    twin = cls(**dict(cfg, attention_scaling="none", **table_on)).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("pos_embed" in k for k in missing)
    return twin


@pytest.mark.parametrize("family", ["dit", "pixart-sigma", "pixart-alpha", "sd3", "sd35"])
def test_at_weight_one_each_family_is_its_stock_model_with_causal_blocks(family):
    if family == "dit":
        model = make(facebook_state_dict(seed=0), position_encoding="none", attention_layout=LAYOUT, locality="full")
        x, t, y = inputs()
        args, kwargs, cls = (x, t, y), {}, LEDiTTransformer2DModel
    elif family.startswith("pixart"):
        name = family.split("-")[1]
        ref = test_pixart.stock(name)
        model = LEDiTPixArtTransformer2DModel(**test_pixart.CONFIGS[name], **test_pixart.LEDIT_ON).eval()
        model.load_state_dict(ref.state_dict(), strict=False)
        x, kwargs = test_pixart.pixart_inputs(name)
        args, cls = (x,), LEDiTPixArtTransformer2DModel
    else:
        ref = test_sd3.stock(family)
        model = LEDiTSD3Transformer2DModel(**test_sd3.CONFIGS[family], **test_sd3.LEDIT_ON).eval()
        model.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "pos_embed.pos_embed"}, strict=False)
        x, kwargs = test_sd3.sd3_inputs()
        args, cls = (x,), LEDiTSD3Transformer2DModel
    random_ledit_conv(model)
    twin = _stock_twin(model, cls, position_encoding="sincos")
    PositionFade(model, fade_images=100)  # weight 1 until the first image
    options = {"attention_kwargs" if family in ("dit",) or family.startswith("pixart") else "joint_attention_kwargs":
               {"locality_dilation": 1}}
    with torch.no_grad():
        ours, stock = model(*args, **kwargs, **options).sample, twin(*args, **kwargs, **options).sample
    assert rel_err(ours, stock) <= 1e-6


def test_a_fade_is_for_a_converted_model_and_a_positive_budget():
    sd = facebook_state_dict(seed=0)
    with pytest.raises(ConfigError, match="own positional table"):
        PositionFade(make(sd), 10)
    ledit = make(sd, position_encoding="none", attention_layout=LAYOUT, locality="full")
    with pytest.raises(ConfigError, match="must be positive"):
        PositionFade(ledit, 0)
    with pytest.raises(ConfigError, match="no source table"):
        PositionFade(torch.nn.Linear(2, 2), 10)
    big = LEDiTSD3Transformer2DModel(**test_sd3.CONFIGS["sd3"], **test_sd3.LEDIT_ON)
    fade = PositionFade(big, 10)
    with pytest.raises(ValueError, match="past SD3's stored table"):
        big(torch.zeros(1, 4, 26, 8), encoder_hidden_states=torch.zeros(1, 5, 12), pooled_projections=torch.zeros(1, 10),
            timestep=torch.tensor([1.0]))
    fade.remove()


# -- the harness loop (fastloop) ------------------------------------------------

def test_an_arm_fades_by_images_and_its_ema_and_export_have_no_table(tmp_path):
    arm = make_arm(position_fade_images=10)  # batch 4: weights 1, 0.6, 0.2, 0, 0 at steps 0..4
    seen = []
    for _ in range(5):
        arm.step()
        seen.append(round(float(arm.fade.weight), 6))
    assert seen == [1.0, 0.6, 0.2, 0.0, 0.0]
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([0, 1])
    with torch.no_grad():
        before = arm.ema(x, t, y, attention_kwargs={"locality_dilation": 1}).sample
        arm.fade.weight.fill_(1.0)  # the EMA model has no hook: the weight does not reach it
        assert torch.equal(before, arm.ema(x, t, y, attention_kwargs={"locality_dilation": 1}).sample)
    out = arm.export(tmp_path / "model")
    loaded = LEDiTTransformer2DModel.from_pretrained(out)
    assert loaded.config.position_encoding == "none"
    assert not [k for k in load_file(str(out / "diffusion_pytorch_model.safetensors")) if "pos" in k]
    with torch.no_grad():
        assert torch.equal(before, loaded.eval()(x, t, y, attention_kwargs={"locality_dilation": 1}).sample)


def test_an_arm_resumed_mid_fade_continues_exactly(tmp_path):
    settings = dict(position_fade_images=20, dilation_prob=0.5)
    straight = make_arm(**settings)
    for _ in range(2):
        straight.step()
    straight.save(tmp_path / "ckpt")
    for _ in range(3):
        straight.step()
    resumed = Arm.resume(tmp_path / "ckpt", DeviceData(*pixels(), "cpu"))
    assert resumed.fade is not None and resumed.cfg.position_fade_images == 20
    for _ in range(3):
        resumed.step()
    assert_same(weights(resumed.model), weights(straight.model))
    assert_same(weights(resumed.ema), weights(straight.ema))
    assert float(resumed.fade.weight) == float(straight.fade.weight) == pytest.approx(0.2)  # the fifth step: 16 of 20


# -- finetune -------------------------------------------------------------------

@pytest.fixture()
def dirs(tmp_path):
    return make_model(tmp_path / "model"), make_images(tmp_path / "imgs"), tmp_path


def test_finetune_resumed_mid_fade_continues_exactly_and_exports_no_table(dirs):
    model, imgs, tmp = dirs
    fade = dict(BASE, position_fade_images=20)  # 4 images a step: the table is gone after step 5 of 7
    straight = finetune(str(model), str(imgs), load_recipe(None, dict(fade, steps=7)), str(tmp / "a"))
    part = finetune(str(model), str(imgs), load_recipe(None, dict(fade, steps=3)), str(tmp / "b"))
    rest = finetune(str(model), str(imgs), load_recipe(None, dict(fade, steps=7)), str(tmp / "b"), resume="latest")
    assert part["losses"] + rest["losses"] == straight["losses"]
    a = load_file(str(tmp / "a/model/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp / "b/model/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [k for k in a if "pos" in k]
    assert LEDiTTransformer2DModel.from_pretrained(tmp / "a/model").config.position_encoding == "none"
    plain = finetune(str(model), str(imgs), load_recipe(None, dict(BASE, steps=3)), str(tmp / "c"))
    assert plain["losses"][1] != straight["losses"][1]  # the table was there (a fresh final layer is zero at step 1)


def test_finetune_fades_under_lora_and_refuses_a_stock_model(dirs, tmp_path):
    model, imgs, tmp = dirs
    run = setup(str(model), str(imgs), load_recipe(None, dict(BASE, steps=2, position_fade_images=8, lora_rank=2)),
                str(tmp / "lora"))
    assert run.fade is not None and hasattr(run.raw_model, "peft_config")
    with suspended(run.raw_model):
        assert not run.fade.active
    assert run.fade.active
    stock = LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32,
                                    num_layers=2, num_attention_heads=2, num_classes=3, position_encoding="sincos",
                                    locality="none", attention_scaling="none")
    stock.save_pretrained(tmp_path / "stock")
    with pytest.raises(ConfigError, match="own positional table"):
        setup(str(tmp_path / "stock"), str(imgs), load_recipe(None, dict(BASE, steps=2, position_fade_images=8)),
              str(tmp / "stock-run"))
    with pytest.raises(ConfigError, match="position_fade_images -1"):
        load_recipe(None, dict(BASE, position_fade_images=-1))
