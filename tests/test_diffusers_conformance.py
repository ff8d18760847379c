"""The three model classes behave like diffusers models where diffusers' own model tests look: layerwise casting,
whole-model and regional torch.compile, the attention-processor API, attention backend names and LoRA loading.
Each class runs with the LEDiT changes on and in stock mode, on tiny seeded configs."""
import copy
import re

import pytest
import torch
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

import test_pixart as pixart
import test_sd3 as sd3
from _tiny import randomize_, tiny_ledit
from factories import inputs, rel_err
from ledit_convert.models.compiling import repeated_blocks
from ledit_convert.models.pixart import LEDiTPixArtTransformer2DModel
from ledit_convert.models.sd3 import LEDiTSD3Transformer2DModel
from test_sd3_text2image import diffusers_pipeline, sd3_pipeline  # noqa: F401 (a fixture)


def _dit(on: bool):
    stock = dict(position_encoding="sincos", attention_layout=None, locality="none", attention_scaling="none")
    model = tiny_ledit() if on else tiny_ledit(**stock)
    x, t, y = inputs()
    return model, dict(hidden_states=x, timestep=t, class_labels=y)


def _pixart(on: bool):
    config = dict(pixart.SIGMA, **pixart.LEDIT_ON) if on else pixart.SIGMA
    x, kwargs = pixart.pixart_inputs("sigma")
    return randomize_(LEDiTPixArtTransformer2DModel(**config), 0, std=0.2), dict(kwargs, hidden_states=x)


def _sd3(on: bool):
    config = dict(sd3.CONFIGS["sd35"], **sd3.LEDIT_ON) if on else sd3.CONFIGS["sd35"]  # SD3.5: attn2 too
    x, kwargs = sd3.sd3_inputs()
    return randomize_(LEDiTSD3Transformer2DModel(**config), 0, std=0.2), dict(kwargs, hidden_states=x)


BUILDERS = {"dit": _dit, "pixart": _pixart, "sd3": _sd3}
CASES = [pytest.param(family, on, id=f"{family}-{'ledit' if on else 'stock'}") for family in BUILDERS
         for on in (True, False)]
TEXT_CASES = [case for case in CASES if case.values[0] != "dit"]


def build(family: str, on: bool):
    """A tiny model of the family (LEDiT changes on, or stock mode) in eval mode, and its forward arguments."""
    return BUILDERS[family](on)


def run(model, kwargs, **extra):
    with torch.no_grad():
        return model(**kwargs, **extra).sample


@pytest.fixture
def fresh_dynamo():
    """Compile tests start from nothing and count their own recompilations."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


#################################################################################
#                              Layerwise casting                                #
#################################################################################

@pytest.mark.parametrize("family, on", CASES)
def test_layerwise_casting_stores_fp8_keeps_precision_critical_layers_and_the_numerics(family, on):
    model, kwargs = build(family, on)
    want = run(model, kwargs)
    half = copy.deepcopy(model)
    half.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    assert rel_err(run(half, kwargs), want) <= 2e-3
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    patterns = DEFAULT_SKIP_MODULES_PATTERN + tuple(model._skip_layerwise_casting_patterns)
    for name, module in model.named_modules():  # what diffusers' own LoRA casting test checks
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            kept = any(re.search(pattern, name) for pattern in patterns)
            assert module.weight.dtype == (torch.float32 if kept else torch.float8_e4m3fn), name
    kept = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    if family == "dit":  # as diffusers' DiT keeps its embedders, adaLN and patchify
        assert {"t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "x_embedder.proj.weight",
                "blocks.0.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.weight"} <= kept
    if on:
        assert model.locality_conv.conv.weight.dtype == torch.float8_e4m3fn  # stored in fp8, run through its hook
    out = run(model, kwargs)
    assert rel_err(out, want) <= 0.1
    assert torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0) >= 0.995
    model.train()  # and a training step, as diffusers' casting test takes one
    model(**kwargs).sample.square().mean().backward()


@pytest.mark.parametrize("family, on", CASES)
@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_group_offloading_hooks_every_weight_and_keeps_the_output(family, on, kind):
    """diffusers' group offloading (here onto the CPU itself: the hooks and their order are what is checked)."""
    model, kwargs = build(family, on)
    want = run(model, kwargs)
    extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
    model.enable_group_offload(torch.device("cpu"), offload_type=kind, **extra)
    assert torch.equal(run(model, kwargs), want)


#################################################################################
#                                  torch.compile                                #
#################################################################################

@pytest.mark.parametrize("family, on", CASES)
def test_whole_model_compiles_as_one_graph_and_does_not_recompile(family, on, fresh_dynamo):
    """fullgraph=True: a graph break anywhere (a mask or table lookup, a host sync) is an error; the second call
    must reuse the first call's graph."""
    model, kwargs = build(family, on)
    want = run(model, kwargs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # tracing is what is tested here
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = run(compiled, kwargs), run(compiled, kwargs)
    assert rel_err(first, want) <= 1e-6 and rel_err(second, want) <= 1e-6
    if on:  # training: the caller fixes the conv's dilation (the random draw is host code)
        model.train()
        options = {"joint_attention_kwargs" if family == "sd3" else "attention_kwargs": {"locality_dilation": 2}}
        want = model(**kwargs, **options).sample
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="eager")(**kwargs, **options).sample
        assert rel_err(out, want) <= 1e-6
        out.square().mean().backward()


def _block_kinds(model) -> int:
    """How many distinct blocks a model has (self or causal; SD3's last block updates no text; SD3.5's first ones
    carry attn2): regional compilation makes one graph per kind."""
    return len({(block.causal, getattr(block, "context_pre_only", None), getattr(block, "attn2", None) is None)
                for block in repeated_blocks(model)})


@pytest.mark.parametrize("family, on", CASES)
def test_repeated_blocks_compile_once_per_kind_of_block(family, on, fresh_dynamo):
    """diffusers' compile_repeated_blocks: every block of a kind shares one graph, so no block may see inputs of
    another layout (the first PixArt block used to get the patch embedding's strided view)."""
    model, kwargs = build(family, on)
    want = run(model, kwargs)
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=_block_kinds(model)):  # one more is an error with fullgraph
        first = run(model, kwargs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run(model, kwargs)
    assert rel_err(first, want) <= 1e-6 and rel_err(second, want) <= 1e-6


#################################################################################
#                         Attention processors and backends                     #
#################################################################################

def _diffusers_processors(model):
    """diffusers' stock SDPA processor for every attention layer (the joint one for SD3's joint attention)."""
    return {name: JointAttnProcessor2_0() if name.endswith(".attn.processor") else AttnProcessor2_0()
            for name in model.attn_processors}


@pytest.mark.parametrize("family, on", TEXT_CASES)
def test_processor_api_round_trips_and_never_drops_a_mask_or_scaling(family, on):
    model, kwargs = build(family, on)
    want = run(model, kwargs)
    processors = model.attn_processors
    blocks = len(model.transformer_blocks)
    assert len(processors) == blocks * 2 if family == "pixart" else blocks + sum(b.attn2 is not None
                                                                                  for b in model.transformer_blocks)
    model.set_attn_processor(dict(processors))
    assert model.attn_processors == processors and torch.equal(run(model, kwargs), want)
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): AttnProcessor2_0()})

    model.set_attn_processor(_diffusers_processors(model))
    if on:  # diffusers' processors take no scan mask and no logit factor: refused, naming the processor
        with pytest.raises(ValueError, match="AttnProcessor2_0 cannot take LEDiT's causal mask"):
            run(model, kwargs)
    else:  # nothing to drop: diffusers' processors compute what ours do
        assert rel_err(run(model, kwargs), want) <= 1e-6
    model.set_default_attn_processor()
    assert torch.equal(run(model, kwargs), want)

    model.fuse_qkv_projections()
    fused = [m for m in model.modules() if getattr(m, "fused_projections", False)]
    assert fused and all(hasattr(m, "to_qkv") for m in fused)
    assert rel_err(run(model, kwargs), want) <= 1e-5
    model.unfuse_qkv_projections()
    assert not any(hasattr(m, "to_qkv") or getattr(m, "fused_projections", False) for m in model.modules())
    assert torch.equal(run(model, kwargs), want)


@pytest.mark.parametrize("family, on", CASES)
def test_diffusers_backend_names_map_to_masked_paths_or_are_refused(family, on):
    from diffusers.models.attention_dispatch import AttentionBackendName
    model, kwargs = build(family, on)
    model.set_attention_backend("sdpa")
    sdpa = run(model, kwargs)
    model.set_attention_backend("math")
    math = run(model, kwargs)
    for name, ours, want in (("native", "sdpa", sdpa), ("_native_math", "math", math), ("_native_efficient", "sdpa", sdpa),
                             ("_native_cudnn", "sdpa", sdpa), (AttentionBackendName.NATIVE, "sdpa", sdpa)):
        model.set_attention_backend(name)
        assert model.attention_backend == ours
        assert torch.equal(run(model, kwargs), want), name
    model.set_attention_backend("flex")
    assert model.attention_backend == "flex"
    for name in ("flash", "_native_flash", "_flash_3", "sage", "xformers"):
        with pytest.raises(ValueError, match=f"'{name}' takes no attention mask"):
            model.set_attention_backend(name)
    assert model.attention_backend == "flex"  # a refused name changes nothing
    with pytest.raises(ValueError, match="unknown attention backend 'bogus'"):
        model.set_attention_backend("bogus")
    model.reset_attention_backend()
    assert model.attention_backend == "auto"


#################################################################################
#                                     LoRA                                      #
#################################################################################

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2"]


def _stock_lora(transformer, folder):
    """A LoRA trained for the stock SD3 (random factors, alpha != rank), saved as diffusers saves one."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = copy.deepcopy(transformer)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=SD3_TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model),
                                               transformer_lora_adapter_metadata=config.to_dict())
    return folder


def _images(pipe):
    return pipe("a red fox", num_inference_steps=2, height=32, width=32, max_sequence_length=7, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_a_stock_sd3_lora_loads_through_the_pipeline_onto_a_converted_sd3(tmp_path, sd3_pipeline):  # noqa: F811
    """With the LEDiT changes off, the converted SD3 with the LoRA gives the stock SD3's images with the same LoRA,
    from diffusers' format and from its older lora.down / lora.up keys; the pipeline's LoRA scale reaches it."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file, save_file
    stock = SD3Transformer2DModel.from_pretrained(sd3_pipeline / "transformer").eval()
    ours = LEDiTSD3Transformer2DModel.from_config(stock.config).eval()
    ours.load_state_dict(stock.state_dict())
    lora = _stock_lora(stock, tmp_path / "lora")
    old = {k.replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v
           for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    reference, converted = diffusers_pipeline(sd3_pipeline, stock), diffusers_pipeline(sd3_pipeline, ours)
    before = _images(converted)
    reference.load_lora_weights(lora)
    want = _images(reference)
    converted.load_lora_weights(lora)
    got = _images(converted)
    assert abs(got - want).max() <= 1e-5 and abs(got - before).max() > 1e-3
    for pipe in (reference, converted):  # the older keys carry no alpha: both load them with alpha = rank
        pipe.unload_lora_weights()
        pipe.load_lora_weights(tmp_path / "old.safetensors", adapter_name="old")
    assert abs(_images(converted) - _images(reference)).max() <= 1e-5
    half = converted("a red fox", num_inference_steps=2, height=32, width=32, max_sequence_length=7,
                     output_type="np", generator=torch.Generator().manual_seed(0),
                     joint_attention_kwargs={"scale": 0.0}).images
    assert abs(half - before).max() <= 1e-5  # LoRA scale 0: the model without the adapter


# what a LoRA fine-tune adapts and what it trains fully, per family (as training/families.py sets them up)
FINE_TUNES = {
    "dit": (r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc1)", ("locality_conv", "adaLN_modulation", "final_layer")),
    "pixart": (r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_v)|ff\.net\.2)",
               ("locality_conv", "adaln_single", "scale_shift_table", "proj_out")),
    "sd3": (r".*transformer_blocks\.\d+\.attn2?\.(to_q|to_v|add_k_proj)",
            ("locality_conv", "norm1.linear", "norm1_context.linear", "norm_out", "proj_out")),
}


@pytest.mark.parametrize("family", FINE_TUNES)
def test_a_lora_fine_tune_exports_adapters_and_trained_modules_that_load_in_plain_diffusers(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from ledit_convert.conversion.lora import LORA_WEIGHTS, TRAINED_MODULES, export_lora
    base, kwargs = build(family, True)
    converted = tmp_path / "converted"
    base.save_pretrained(converted)
    targets, fully = FINE_TUNES[family]
    config = LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
    tuned = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # a fine-tune moved the fully trained modules too
        for name, p in tuned.named_parameters():
            if any(part in name for part in fully) and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    want = run(copy.deepcopy(tuned).merge_and_unload(), kwargs)
    out = export_lora(tuned.requires_grad_(False), tmp_path / "lora", fully)  # as the EMA copy is: nothing trainable
    trained = load_file(str(out / TRAINED_MODULES))
    assert trained and all(any(part in k for part in fully) for k in trained)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in load_file(str(out / LORA_WEIGHTS)))

    from diffusers import AutoModel
    reloaded = AutoModel.from_pretrained(str(converted), trust_remote_code=True).eval()
    assert rel_err(run(reloaded, kwargs), run(base, kwargs)) == 0
    missing, unexpected = reloaded.load_state_dict(load_file(str(out / TRAINED_MODULES)), strict=False)
    assert not unexpected
    reloaded.load_lora_adapter(str(out), prefix="transformer", weight_name=LORA_WEIGHTS)
    assert rel_err(run(reloaded, kwargs), want) <= 1e-5
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        export_lora(tuned, tmp_path / "x", fully, adapter_name="other")
