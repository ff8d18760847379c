"""The on-device loop: its eager step is finetune's, data draws, EMA ramp, dilation, resume, several arms."""
import numpy as np
import pytest
import torch

from _tiny import randomize_
from ledit_convert.data.images import ArrayImageDataset
from ledit_convert.errors import ConfigError, DataError
from ledit_convert.training.fastcheck import compare_arms, measure_throughput
from ledit_convert.training.fastloop import Arm, ArmConfig, DeviceData, train_concurrently
from ledit_convert.models.dit import LEDiTTransformer2DModel
from ledit_convert.training.trainstep import ema_decay, learning_rate

CLASSES = 3


def tiny_model(seed=0, dilation_prob=0.0, rates=(2,)):
    """A 32-wide, 2-block (SA, CA) pixel-space LEDiT for 8x8 RGB, random non-zero weights."""
    model = LEDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32,
                                    num_layers=2, num_attention_heads=2, num_classes=CLASSES,
                                    attention_layout=["self", "causal"], locality_dilation_prob=dilation_prob,
                                    locality_dilation_rates=list(rates))
    return randomize_(model, seed)


def pixels(n=12, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return images, np.arange(n) % CLASSES


def make_arm(seed=0, dilation_prob=0.0, rates=(2,), **cfg):
    images, labels = pixels()
    cfg = ArmConfig(**{"batch": 4, "lr": 1e-3, "seed": seed, **cfg})
    return Arm(tiny_model(dilation_prob=dilation_prob, rates=rates), DeviceData(images, labels, "cpu"), cfg)


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_same(a, b, atol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_device_data_draws_stored_images_and_their_mirrors():
    images, labels = pixels(n=6)
    data, reference = DeviceData(images, labels, "cpu"), ArrayImageDataset(images, labels)
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == torch.uint8
    x, y = data.draw(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    flips = []
    for xi, yi in zip(x, y):
        found = [(i, f) for i in range(6) for f in (False, True) if torch.equal(xi, reference.load(i, f).x)]
        assert len(found) == 1, "every draw is one stored image, mirrored or not, converted as the dataset does"
        assert int(yi) == labels[found[0][0]]
        flips.append(found[0][1])
    assert 10 < sum(flips) < 54
    again, _ = data.draw(64, torch.Generator().manual_seed(0))
    other, _ = data.draw(64, torch.Generator().manual_seed(1))
    assert torch.equal(x, again) and not torch.equal(x, other)
    unflipped, _ = DeviceData(torch.from_numpy(images), labels, "cpu", random_flip=False).draw(
        64, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(u, reference.load(i, False).x) for i in range(6)) for u in unflipped)
    with pytest.raises(DataError, match="uint8"):
        DeviceData(images.astype(np.float32), labels, "cpu")
    with pytest.raises(DataError, match="labels"):
        DeviceData(images, labels[:-1], "cpu")


def test_eager_step_equals_finetune_step(tmp_path):
    from ledit_convert.training.finetune import _step, setup
    from ledit_convert.training.recipe import load_recipe
    from ledit_convert.training.runstate import update_ema
    tiny_model().save_pretrained(tmp_path / "model")
    images, labels = pixels()
    hyper = dict(lr_warmup_steps=2, weight_decay=0.01, max_grad_norm=0.5, ema_decay=0.9, class_dropout=0.3)
    recipe = load_recipe(None, dict(resolution=8, vae="none", global_batch_size=4, num_workers=0, trackers=[],
                                    validate_every=0, steps=3, learning_rate=1e-3, **hyper))
    run = setup(str(tmp_path / "model"), ArrayImageDataset(images, labels), recipe, str(tmp_path / "run"))
    arm = Arm(LEDiTTransformer2DModel.from_pretrained(tmp_path / "model"), DeviceData(images, labels, "cpu"),
              ArmConfig(batch=4, lr=1e-3, **hyper))
    for step in range(3):
        draws = torch.Generator().manual_seed(0)
        draws.set_state(arm.generator.get_state())
        x, y = arm.data.draw(4, draws)  # the batch the arm is about to draw; the loss's draws follow it
        run.step_generator.set_state(draws.get_state())
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(step, 1e-3, 2)
        expected = _step(run, (x, y, torch.zeros(4))).item()
        update_ema(run.ema_trainable, run.trainable, ema_decay(step, 4, 0.9))
        arm.step()
        assert arm.pop_losses() == expected
    assert_same(weights(arm.model), weights(run.raw_model))
    assert_same(weights(arm.ema), weights(run.ema), atol=1e-7)  # the decay is a float32 device tensor here


def test_ema_with_half_life_ramp_is_trainstep_schedule():
    arm = make_arm(ema_half_life_images=40, ema_rampup_ratio=0.5)
    expected = [w.double() for w in weights(arm.model)]
    for step in range(4):
        arm.step()
        decay = ema_decay(step, 4, 0.9999, 40, 0.5)
        expected = [decay * e + (1 - decay) * p.double() for e, p in zip(expected, weights(arm.model))]
    assert ema_decay(0, 4, 0.9999, 40, 0.5) < ema_decay(3, 4, 0.9999, 40, 0.5) < ema_decay(3, 4, 0.9999, 40)  # ramping
    assert_same([w.double() for w in weights(arm.ema)], expected, atol=1e-6)


def test_dilation_comes_from_the_arms_rng_and_reaches_the_conv():
    arm = make_arm(dilation_prob=1.0)
    seen = []
    arm.model.locality_conv.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    global_rng = torch.get_rng_state()
    for _ in range(2):
        arm.step()
    assert seen == [2, 2]
    assert torch.equal(torch.get_rng_state(), global_rng), "the model did not draw from the global RNG"

    def dilations(seed):
        arm = make_arm(seed=seed, dilation_prob=0.5, rates=(2, 3))
        seen = []
        arm.model.locality_conv.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
        for _ in range(12):
            arm.step()
        return seen
    first = dilations(0)
    assert first == dilations(0) != dilations(1)
    assert {1, 2, 3} == set(first)
    assert make_arm(dilation_prob=0.5, rates=(2, 3)).dilations == [1, 2, 3]


def test_save_and_resume_continue_exactly(tmp_path):
    settings = dict(dilation_prob=0.5, lr_warmup_steps=3, ema_half_life_images=40, ema_rampup_ratio=0.5)
    straight = make_arm(**settings)
    for _ in range(2):
        straight.step()
    straight.save(tmp_path / "ckpt")
    straight.step()  # the two steps not yet popped when saved are carried over into this mean
    expected = [straight.pop_losses()]
    straight.step()
    expected.append(straight.pop_losses())

    resumed = Arm.resume(tmp_path / "ckpt", DeviceData(*pixels(), "cpu"))
    assert resumed.step_count == 2 and resumed.cfg == straight.cfg
    resumed.step()
    got = [resumed.pop_losses()]
    resumed.step()
    got.append(resumed.pop_losses())
    assert got == expected
    assert_same(weights(resumed.model), weights(straight.model))
    assert_same(weights(resumed.ema), weights(straight.ema))
    assert resumed.generator.get_state().equal(straight.generator.get_state())
    assert resumed.rng.getstate() == straight.rng.getstate()
    assert not list(tmp_path.glob(".ckpt*")), "the checkpoint was written to a temporary folder, then renamed"
    into = make_arm(seed=5, **settings)  # a fresh arm of the same architecture takes the saved state in place
    into.load(tmp_path / "ckpt")
    into.step()
    assert into.pop_losses() == expected[0] and into.cfg.seed == 5


def test_graph_warm_up_leaves_training_where_it_was():
    """The eager warm-up before capture is rolled back, fresh (no AdamW state yet) or mid-run."""
    for before in (0, 2):
        warmed, straight = make_arm(dilation_prob=0.5), make_arm(dilation_prob=0.5)
        for _ in range(before):
            warmed.step()
            straight.step()
        warmed._warm_up()
        assert warmed.pop_losses() == straight.pop_losses()
        for _ in range(2):
            warmed.step()
            straight.step()
        assert warmed.pop_losses() == straight.pop_losses()
        assert_same(weights(warmed.model), weights(straight.model))
        assert_same(weights(warmed.ema), weights(straight.ema))
        assert_same(warmed._optimizer_tensors(), straight._optimizer_tensors())
    def host_draw(module, args):  # a draw a graph would freeze into a constant
        torch.rand(())

    drawing = make_arm()
    drawing.model.register_forward_pre_hook(host_draw)
    with pytest.raises(RuntimeError, match="global RNG"):
        drawing._warm_up()


def test_train_concurrently_matches_each_arm_alone():
    together = [make_arm(seed=0, dilation_prob=0.5), make_arm(seed=1)]
    calls = []
    info = train_concurrently(together, 4, on_step=lambda step, arms: calls.append(step), every=2)
    assert calls == [2, 4]
    assert info["samples"] == 4 * 2 * 4 and info["samples_per_s"] > 0
    for arm, alone in zip(together, [make_arm(seed=0, dilation_prob=0.5), make_arm(seed=1)]):
        for _ in range(4):
            alone.step()
        assert arm.pop_losses() == alone.pop_losses()
        assert_same(weights(arm.model), weights(alone.model))
        assert_same(weights(arm.ema), weights(alone.ema))


def test_compare_arms_passes_twins_and_reports_a_mismatch():
    same = compare_arms(make_arm(seed=0), make_arm(seed=0), steps=2)
    assert same["passed"] and same["loss_rel_err"] == 0 and same["weights_rel_err"] == 0
    different = compare_arms(make_arm(seed=0), make_arm(seed=1), steps=2)
    assert not different["passed"] and different["loss_rel_err"] > 0


def test_graphs_need_cuda_and_configs_are_checked():
    images, labels = pixels()
    with pytest.raises(ValueError, match="graphed=True captures CUDA graphs"):
        Arm(tiny_model(), DeviceData(images, labels, "cpu"), ArmConfig(batch=4, lr=1e-3), graphed=True)
    with pytest.raises(ConfigError) as e:
        ArmConfig(batch=0, lr=1e-3, ema_decay=1.0, mixed_precision="fp16", max_grad_norm=0)
    assert all(word in str(e.value) for word in ("batch 0", "ema_decay", "fp16", "max_grad_norm"))
    with pytest.raises(DataError, match="label 5"):
        Arm(tiny_model(), DeviceData(images, labels + 3, "cpu"), ArmConfig(batch=4, lr=1e-3))


def test_export_writes_the_ema_as_a_model_folder(tmp_path):
    arm = make_arm(ema_decay=0.5)
    arm.step()
    out = arm.export(tmp_path / "model")
    loaded = LEDiTTransformer2DModel.from_pretrained(out)
    assert_same(weights(loaded), weights(arm.ema))
    assert not all(torch.equal(a, b) for a, b in zip(weights(arm.ema), weights(arm.model)))


def test_bf16_autocast_step_and_throughput_helper_run():
    arm = make_arm(mixed_precision="bf16")
    arm.step()
    assert np.isfinite(arm.pop_losses())
    numbers = measure_throughput(lambda graphed: make_arm(), arms=2, steps=1, untimed_steps=1)
    assert {"one_eager", "concurrent_eager"} <= set(numbers) and "one_graphed" not in numbers


def test_a_failed_warm_up_puts_everything_back():
    arm, twin = make_arm(dilation_prob=0.5), make_arm(dilation_prob=0.5)
    arm.step(), twin.step()
    before, gen = [t.clone() for t in arm._written()], arm.generator.get_state()
    real, calls = arm._compute, {"n": 0}

    def failing(dilation):  # the second warm-up step fails half-way, after the forward and backward ran
        calls["n"] += 1
        if calls["n"] == 2:
            x, labels = arm.data.draw(arm.cfg.batch, arm.generator)
            arm.model(x, torch.zeros(len(x), dtype=torch.long), labels).sample.sum().backward()
            raise RuntimeError("a host sync")
        return real(dilation)
    arm._compute = failing
    with pytest.raises(RuntimeError, match="a host sync"):
        arm._warm_up()
    assert_same([t for t in arm._written()], before)
    assert torch.equal(arm.generator.get_state(), gen)
    arm._compute = real
    for _ in range(3):  # and it trains on exactly as its twin that never warmed up
        arm.step(), twin.step()
    assert arm.pop_losses() == twin.pop_losses()
    assert_same(weights(arm.model), weights(twin.model))


def test_a_graphed_arm_whose_capture_fails_steps_eagerly_and_says_why(caplog):
    arm, twin = make_arm(), make_arm()
    arm.graphed = True  # as if on CUDA; the capture fails the way a refused capture would

    def refuse():
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    arm._capture_graphs = refuse
    with caplog.at_level("WARNING"):
        for _ in range(2):
            arm.step(), twin.step()
    assert not arm.graphed and arm.graph_error == "RuntimeError: operation not permitted when stream is capturing"
    assert "steps eagerly" in caplog.text
    assert arm.pop_losses() == twin.pop_losses()
