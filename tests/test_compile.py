"""Compiled paths: regional torch.compile of the blocks, in training, sampling and the CLI."""
import copy

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

import ledit_convert.models.attention as attention_module
from ledit_convert.models.attention import CAUSAL_SCANS
from ledit_convert.models.compiling import compile_blocks, is_compiled, repeated_blocks, uncompile_blocks

from _tiny import tiny_dit, tiny_ledit, tiny_vae
from factories import inputs, rel_err


@pytest.fixture(autouse=True)
def fresh_dynamo_one_thread():
    """Each test compiles from scratch; tiny models run faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scan", CAUSAL_SCANS)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_blocks_trace_as_one_graph_each(scan, backend):
    """fullgraph=True: a graph break anywhere inside a block (a mask rebuilt, a host sync) is an error."""
    eager = tiny_ledit(causal_scan=scan, locality_dilation_prob=1.0)
    eager.set_attention_backend(backend)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, dynamic=False)
    for block in repeated_blocks(compiled):  # the cheap "eager" backend: tracing is what is tested here
        block._compiled_call_impl = torch.compile(block._call_impl, backend="eager", fullgraph=True)
    for height, width, kwargs in ((8, 8, {}), (12, 8, {}), (12, 8, {"attention_kwargs": {"causal_to_self": True}})):
        x, t, y = inputs(height=height, width=width)
        for train in (False, True):
            eager.train(train), compiled.train(train)
            torch.manual_seed(1)  # the same dilation draw in both
            ref = eager(x, t, y, **kwargs).sample
            torch.manual_seed(1)
            out = compiled(x, t, y, **kwargs).sample
            assert rel_err(out, ref) <= 1e-6


def test_compiled_blocks_do_not_rebuild_masks(monkeypatch):
    model = tiny_ledit(causal_scan="mask_lower_right_corner")
    compile_blocks(model)
    for block in repeated_blocks(model):
        block._compiled_call_impl = torch.compile(block._call_impl, backend="eager", fullgraph=True)
    x, t, y = inputs(height=10, width=14)
    with torch.no_grad():
        first = model(x, t, y).sample  # builds and caches the mask for this grid

        def no_rebuild(*args, **kwargs):
            raise AssertionError("causal mask rebuilt")
        monkeypatch.setattr(attention_module, "causal_visibility", no_rebuild)
        again = model(x, t, y).sample
    assert torch.equal(first, again)


def test_compiled_training_gradients_match_float64():
    """Inductor-compiled blocks: outputs and every gradient against an eager float64 run (math attention)."""
    base = tiny_ledit(layers=2, locality_dilation_prob=0.0).train()
    x, t, y = inputs(height=8, width=12)
    ref_model = copy.deepcopy(base).double()
    ref_model.set_attention_backend("math")
    ref = ref_model(x.double(), t, y).sample
    ref.square().mean().backward()
    model = copy.deepcopy(base)
    compile_blocks(model)
    out = model(x, t, y).sample
    out.square().mean().backward()
    assert is_compiled(model)
    assert rel_err(out, ref) <= 1e-5
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-4, name


def test_compiled_blocks_with_flex_attention_inside():
    """The CUDA training path traces FlexAttention into each block's graph; on the CPU its forward runs too."""
    base = tiny_ledit(layers=2)
    x, t, y = inputs(height=8, width=12)
    ref_model = copy.deepcopy(base).double()
    ref_model.set_attention_backend("math")
    model = copy.deepcopy(base)
    model.set_attention_backend("flex")
    compile_blocks(model)
    with torch.no_grad():
        assert rel_err(model(x, t, y).sample, ref_model(x.double(), t, y).sample) <= 1e-5


def test_uncompile_and_diffusers_blocks():
    model = tiny_ledit()
    assert compile_blocks(model) == 4 and is_compiled(model)
    uncompile_blocks(model)
    assert not is_compiled(model)
    assert compile_blocks(tiny_dit()) == 2  # diffusers' DiTTransformer2DModel: its transformer_blocks
    with pytest.raises(ValueError, match="no transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reduce-overhead"):
        compile_blocks(tiny_ledit(), mode="reduce-overhead")


def test_sample_command_with_compile(tmp_path, caplog):
    """`sample --compile` writes the same images as eager sampling (inductor, fp32)."""
    from typer.testing import CliRunner

    from ledit_convert.cli import app
    tiny_ledit().save_pretrained(tmp_path / "model")
    tiny_vae().save_pretrained(tmp_path / "vae")
    args = ["sample", str(tmp_path / "model"), "--vae", str(tmp_path / "vae"), "--steps", "2", "--class-labels",
            "1,2", "--scheduler", "ddim", "--device", "cpu", "--npz", "--no-png", "--height", "32", "--width", "48"]
    runner = CliRunner()
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = runner.invoke(app, args + ["-o", str(tmp_path / name)] + extra)
        assert result.exit_code == 0, result.output
    import numpy as np
    eager = np.load(tmp_path / "eager" / "samples_2x32x48x3.npz")["arr_0"].astype(int)
    compiled = np.load(tmp_path / "compiled" / "samples_2x32x48x3.npz")["arr_0"].astype(int)
    assert np.abs(eager - compiled).max() <= 1  # uint8 rounding of fp32 noise at most
    assert "eager mode" not in caplog.text  # it really ran compiled


def test_sampling_falls_back_to_eager_when_compile_fails(tmp_path, monkeypatch, caplog):
    from ledit_convert.inference.sampling import sample_images
    tiny_ledit().save_pretrained(tmp_path / "model")
    tiny_vae().save_pretrained(tmp_path / "vae")

    def broken(*args, **kwargs):
        raise TorchDynamoException("no compiler here")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with caplog.at_level("WARNING"):
        result = sample_images(str(tmp_path / "model"), vae=str(tmp_path / "vae"), num_samples=2, steps=1,
                               scheduler="ddim", output_dir=str(tmp_path / "s"), compile=True, write_grid=False)
    assert len(result.image_paths) == 2
    assert "sampling continues in eager mode" in caplog.text


def test_finetune_compiled_matches_eager(tmp_path, caplog, monkeypatch):
    """recipe compile=true: the same losses and weights as an eager run, with dilated and plain steps mixed."""
    from safetensors.torch import load_file

    from ledit_convert.training.finetune import finetune
    from ledit_convert.models.dit import LocalityConv
    from ledit_convert.training.recipe import load_recipe
    from test_finetune import BASE, make_images, make_model
    draws = []
    sample = LocalityConv.sample_dilation
    monkeypatch.setattr(LocalityConv, "sample_dilation", lambda self: draws.append(sample(self)) or draws[-1])
    model, imgs = make_model(tmp_path / "model", dilation_prob=0.5), make_images(tmp_path / "imgs")
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        draws.clear()
        recipe = load_recipe(None, dict(BASE, steps=5, seed=3, compile=compile_))
        runs[name] = finetune(str(model), str(imgs), recipe, str(tmp_path / name))
        assert set(draws) == {1, 2}, draws  # both conv paths ran, in eager and in compiled training
    assert "eager mode" not in caplog.text
    assert runs["compiled"]["losses"] == pytest.approx(runs["eager"]["losses"], rel=1e-4)
    eager = load_file(tmp_path / "eager" / "model" / "diffusion_pytorch_model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "model" / "diffusion_pytorch_model.safetensors")
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-4, atol=1e-6), key


def test_a_machine_without_a_cpp_compiler_samples_eagerly(tmp_path, caplog):
    """The real failure, not a stand-in: inductor finds no C++ compiler, sampling warns and goes on eagerly."""
    import numpy as np
    import torch._inductor.config as inductor_config

    from ledit_convert.inference.sampling import sample_images
    tiny_ledit().save_pretrained(tmp_path / "model")
    tiny_vae().save_pretrained(tmp_path / "vae")
    common = dict(vae=str(tmp_path / "vae"), num_samples=2, steps=1, scheduler="ddim", write_grid=False,
                  write_png=False, npz=True)
    no_compiler = {"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}  # a cached kernel needs no compiler
    with caplog.at_level("WARNING"), inductor_config.patch(no_compiler):
        compiled = sample_images(str(tmp_path / "model"), output_dir=str(tmp_path / "c"), compile=True, **common)
    assert "InductorError" in caplog.text and "sampling continues in eager mode" in caplog.text
    eager = sample_images(str(tmp_path / "model"), output_dir=str(tmp_path / "e"), **common)
    assert np.array_equal(np.load(compiled.npz_path)["arr_0"], np.load(eager.npz_path)["arr_0"])
