"""A training loop for small models whose whole training set fits on the device, built to keep a GPU busy.

    data = DeviceData(images, labels, "cuda")                      # uint8 NHWC, held once on the device
    arms = [Arm(make_model(), data, ArmConfig(batch=128, lr=2e-4, seed=s), graphed=True) for s in range(4)]
    train_concurrently(arms, steps=5000, on_step=evaluate, every=500)
    arms[0].export("out/model")                                    # EMA weights, a model folder like surgery's

It is an option of the training code, not a fork: the step is trainstep's loss, LR and EMA decay, so an eager
step computes what `finetune._step` + `runstate.update_ema` compute for the same draws (the EMA to float32
rounding of its decay, a device tensor here). What differs is where
the batch comes from (indices and flips drawn on the device from the arm's generator: no DataLoader, no host
sync) and how steps are launched: each arm queues its work on its own CUDA stream, and with `graphed=True` the
whole step (batch, forward, backward, clip, AdamW, EMA, loss sum) is one CUDA graph replay, one graph per conv
dilation the model can draw (the dilation is drawn on the host, then the matching graph is replayed).
`fastcheck.py` holds the check that a graphed arm matches an eager one, which a GPU run makes first.
"""
import copy
import dataclasses
import functools
import json
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..data.images import check_labels
from .diffusion import DiffusionSchedule
from ..errors import ConfigError, DataError
from ..conversion.export import atomic_folder, cpu_state_dict, init_config, write_json_atomic, write_model_folder
from ..models.attention import attention_mask, resolve_backend
from ..models.dit import LEDiTTransformer2DModel
from .position_fade import PositionFade
from .trainstep import diffusion_loss, ema_weight_tensor, learning_rate

logger = logging.getLogger(__name__)


#################################################################################
#                               Data on the device                              #
#################################################################################

class DeviceData:
    """A uint8 image set kept as one (N, 3, H, W) tensor on the device; batches are drawn there."""

    def __init__(self, images, labels, device, random_flip: bool = True):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),) or len(images) == 0:
            raise DataError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # one name for caches, streams and graphs
        self.device, self.random_flip = device, random_flip
        self.images = images.to(device).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8: a quarter of float
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.host_labels = labels.cpu().numpy().astype(np.int64)  # for checks against a model's classes

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, batch: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """`batch` items drawn with replacement, each mirrored with probability 1/2: x (B, 3, H, W) float32 in
        [-1, 1] and labels (B,) int64, on the device; draws in order: indices, flips."""
        index = torch.randint(0, len(self), (batch,), device=self.device, generator=generator)
        x = self.images.index_select(0, index).float() / 127.5 - 1.0  # as ArrayImageDataset.load
        if self.random_flip:
            flip = torch.rand(batch, device=self.device, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels.index_select(0, index)


#################################################################################
#                                   One arm                                     #
#################################################################################

@dataclass
class ArmConfig:
    """One arm's optimisation settings; the defaults are DiT's (as in Recipe) unless a comment says otherwise."""

    batch: int
    lr: float
    lr_warmup_steps: int = 0
    ema_decay: float = 0.9999
    ema_half_life_images: Optional[float] = None  # EDM's EMA: replaces ema_decay (see trainstep.ema_decay)
    ema_rampup_ratio: Optional[float] = None
    class_dropout: float = 0.1
    max_grad_norm: Optional[float] = 1.0  # None: no clipping (DiT's choice); small arms at high LR like a clip
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    mixed_precision: str = "no"  # no | bf16 (autocast; weights, EMA and optimizer state stay fp32)
    seed: int = 0
    position_fade_images: int = 0  # > 0: the source's table fades out over this many images (position_fade.py)

    def __post_init__(self):
        self.betas = tuple(self.betas)  # a list once it has been through JSON
        p = []
        if self.batch < 1 or self.lr <= 0 or self.lr_warmup_steps < 0:
            p.append(f"batch {self.batch}, lr {self.lr}, lr_warmup_steps {self.lr_warmup_steps}: need batch >= 1, "
                     "lr > 0, warm-up >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            p.append(f"ema_decay {self.ema_decay} is not in [0, 1)")
        if self.ema_half_life_images is not None and self.ema_half_life_images <= 0:
            p.append(f"ema_half_life_images {self.ema_half_life_images} must be positive")
        if self.ema_rampup_ratio is not None and (self.ema_half_life_images is None or
                                                  not 0.0 < self.ema_rampup_ratio <= 1.0):
            p.append(f"ema_rampup_ratio {self.ema_rampup_ratio} needs ema_half_life_images and must be in (0, 1]")
        if not 0.0 <= self.class_dropout < 1.0:
            p.append(f"class_dropout {self.class_dropout} is not in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append(f"max_grad_norm {self.max_grad_norm} must be positive (None turns clipping off)")
        if self.weight_decay < 0 or len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"weight_decay {self.weight_decay} must be >= 0 and betas {self.betas} two values in [0, 1)")
        if self.position_fade_images < 0:
            p.append(f"position_fade_images {self.position_fade_images} must be >= 0 (0: no fade)")
        if self.mixed_precision not in ("no", "bf16"):
            p.append(f"mixed_precision {self.mixed_precision!r} is not one of no, bf16")
        if p:
            raise ConfigError("invalid ArmConfig: " + "; ".join(p))


@contextmanager
def _no_host_syncs(on: bool):
    """CUDA sync debug mode "error" inside: a hidden host sync fails here, by name, rather than inside capture."""
    if not on:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as e:
        if "synchronizing" not in str(e):  # c10's message: "called a synchronizing CUDA operation"
            raise
        raise RuntimeError(f"the training step makes a host-device sync, which CUDA graph capture forbids: {e}") from e
    finally:
        torch.cuda.set_sync_debug_mode(before)


class Arm:
    """One model in training: weights, fp32 EMA, AdamW, its own RNGs, step counters and (CUDA) stream.

    `graphed=True` (CUDA only) captures the step as CUDA graphs before the first step: `warmup` eager steps per
    dilation on the arm's stream (all but the first of each under sync detection), then every tensor those
    steps wrote is rolled back, so a graphed arm follows the same trajectory as an eager one from the same seed.
    The attention backend defaults to "sdpa": causal blocks then take the cached dense boolean mask, a plain
    kernel that is safe to capture; "auto" would pick FlexAttention on CUDA, whose kernel comes from
    torch.compile, and a recompilation during capture would run the compiler (and its benchmark launches)
    inside the graph. The dense mask costs N^2 bytes per grid, small at the sizes this loop is for."""

    def __init__(self, model: LEDiTTransformer2DModel, data: DeviceData, cfg: ArmConfig, graphed: bool = False,
                 warmup: int = 3, attention_backend: str = "sdpa", check_syncs: bool = True):
        self.device, self.data, self.cfg = data.device, data, cfg
        self.cuda = self.device.type == "cuda"
        if graphed and not self.cuda:
            raise ValueError(f"graphed=True captures CUDA graphs, but this arm's data is on {self.device}; "
                             "use graphed=False off CUDA")
        if graphed and warmup < 1:
            raise ValueError(f"warmup {warmup}: a graphed arm needs at least one eager step per dilation")
        mc = model.config
        if mc.in_channels != 3 or any(s % mc.patch_size for s in data.images.shape[-2:]):
            raise DataError(f"{tuple(data.images.shape[1:])} images do not fit a model with {mc.in_channels} input "
                            f"channels and patch {mc.patch_size} (DeviceData holds RGB pixels)")
        check_labels(data.host_labels, mc.num_classes, "DeviceData")
        self.graphed, self.warmup, self.check_syncs = graphed, warmup, check_syncs
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

        # model, EMA (fp32 copy), gradients allocated once: every later write is in place, as graphs need
        self.model = model.to(self.device).train()
        self.model.set_attention_backend(attention_backend)
        self._ema = copy.deepcopy(self.model).float().eval().requires_grad_(False)
        # the fading table hooks the trained model only, after the EMA copy: the EMA and exports never have it
        self.fade = PositionFade(self.model, cfg.position_fade_images) if cfg.position_fade_images else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_trainable = [e for e, p in zip(self._ema.parameters(), self.model.parameters()) if p.requires_grad]
        for p in self.trainable:
            p.grad = torch.zeros_like(p)
        opt = dict(betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if self.cuda:  # the LR lives on the device: a new value is a fill, not a recapture
            self._lr = torch.tensor(cfg.lr, dtype=torch.float32, device=self.device)
            self.optimizer = torch.optim.AdamW(self.trainable, lr=self._lr, fused=True, capturable=True, **opt)
            self.optimizer._warned_capturable_if_run_uncaptured = True  # eager steps of these arms are intended
        else:
            self._lr = None
            self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, **opt)

        # randomness: device draws from the arm's generator, the conv dilation from a host RNG (a Python int
        # picks the graph); counters on both sides
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        conv = self.model.locality_conv
        self.dilation_prob = conv.dilation_prob if conv is not None and conv.dilation_rates else 0.0
        self.dilation_rates = list(conv.dilation_rates) if self.dilation_prob > 0 else []
        self.dilations = sorted({1, *self.dilation_rates})
        self.step_count = 0
        self._step_tensor = torch.zeros((), dtype=torch.int64, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._loss_steps = 0
        self.schedule = DiffusionSchedule()
        self._learn_sigma = mc.out_channels == 2 * mc.in_channels
        self._autocast = nullcontext if cfg.mixed_precision == "no" else functools.partial(
            torch.autocast, self.device.type, dtype=torch.bfloat16, cache_enabled=False)  # no cache: capture-safe
        self._graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}
        self.graph_error: Optional[str] = None  # why a graphed arm fell back to eager steps, if it did
        self._kept: List[object] = []  # cached inputs the steps read (`_hold_cached_inputs`)
        self._primed = False

    # -- the step ---------------------------------------------------------------

    def _draw_dilation(self) -> int:
        """1, or with the model's locality_dilation_prob one of its rates: the model's rule, the arm's RNG."""
        if self.dilation_prob <= 0 or self.rng.random() >= self.dilation_prob:
            return 1
        return self.dilation_rates[self.rng.randrange(len(self.dilation_rates))]

    def _compute(self, dilation: int) -> None:
        """The step's device work, the same eager and captured: batch, loss, backward, clip, AdamW, EMA, loss sum."""
        cfg = self.cfg
        x, labels = self.data.draw(cfg.batch, self.generator)
        model = functools.partial(self.model, attention_kwargs={"locality_dilation": dilation})
        loss = diffusion_loss(model, self.schedule, x, labels, self.generator, cfg.class_dropout,
                              self.model.config.num_classes, self._learn_sigma, self._autocast)
        loss.backward()  # accumulates into the zeroed gradient buffers
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm, error_if_nonfinite=False, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        with torch.no_grad():  # ema += (1 - decay) * (param - ema), the weight a device tensor: no host float
            weight = ema_weight_tensor(self._step_tensor, cfg.batch, cfg.ema_decay, cfg.ema_half_life_images,
                                       cfg.ema_rampup_ratio)
            diff = torch._foreach_sub(self.trainable, self.ema_trainable)
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(self.ema_trainable, diff)
            self._step_tensor += 1
            self._loss_sum += loss.detach()

    @contextmanager
    def _on_stream(self):
        """Run on the arm's stream, after whatever the current stream has queued (a device-side wait)."""
        if not self.cuda:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def _set_lr(self, lr: float) -> None:
        if self.cuda:
            self._lr.fill_(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        """One optimizer step, queued on the arm's stream (a graph replay once captured); no host sync."""
        if self.graphed and not self._graphs:
            try:
                self._capture_graphs()
            except RuntimeError as e:  # a host sync in the step, a capture the driver refused: train eagerly
                self.graphed = False
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logger.warning("CUDA graph capture failed (%s); this arm (seed %d) steps eagerly", self.graph_error,
                               self.cfg.seed)
        dilation = self._draw_dilation()
        with self._on_stream():
            self._set_lr(learning_rate(self.step_count, self.cfg.lr, self.cfg.lr_warmup_steps))
            if self.fade is not None:
                self.fade.set_images_seen(self.step_count * self.cfg.batch)
            if self._graphs:
                self._graphs[dilation].replay()
            else:
                self._compute(dilation)
        self.step_count += 1
        self._loss_steps += 1
        if self.cuda and not self._primed:
            # the first step fills shared caches (masks, tables) from this stream: let them land before another
            # arm's stream reads them
            torch.cuda.synchronize(self.device)
            self._hold_cached_inputs()
            self._primed = True

    def pop_losses(self) -> Optional[float]:
        """Mean training loss of the steps since the last call (None if there were none); the one host sync."""
        if not self._loss_steps:
            return None
        with self._on_stream():
            total = float(self._loss_sum)
            self._loss_sum.zero_()
        steps, self._loss_steps = self._loss_steps, 0
        return total / steps

    def join(self) -> None:
        """Make the current stream wait for the work this arm has queued (device-side; no host sync)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    @property
    def ema(self) -> torch.nn.Module:
        """The EMA model (eval mode, fp32), for sampling; the current stream first waits for the arm's updates."""
        self.join()
        return self._ema

    # -- CUDA graphs ------------------------------------------------------------

    def _written(self) -> List[torch.Tensor]:
        """Every tensor a step writes in place except the optimizer state."""
        return [*self.model.state_dict().values(), *self._ema.state_dict().values(),
                *(p.grad for p in self.trainable), self._step_tensor, self._loss_sum]

    def _optimizer_tensors(self) -> List[torch.Tensor]:
        return [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]

    def _warm_up(self) -> None:
        """`warmup` eager steps per dilation on the arm's stream, then every tensor they wrote and the generator put
        back: lazy set-up (AdamW state, masks and tables, cuBLAS/cuDNN plans) is done, training has not moved.
        Steps after the first of each dilation run under sync detection (one-time set-up may sync; a per-step
        sync would break capture)."""
        with self._on_stream(), torch.no_grad():
            saved = [(t, t.clone()) for t in [*self._written(), *self._optimizer_tensors()]]
        generator_state = self.generator.get_state()
        global_rngs = self._global_rng_states()
        with self._on_stream():
            try:
                for dilation in self.dilations:
                    for i in range(self.warmup):
                        with _no_host_syncs(self.cuda and self.check_syncs and i > 0):
                            self._set_lr(self.cfg.lr)
                            self._compute(dilation)
            finally:  # also after a failed warm-up step, so that an eager fallback starts where this arm was
                self._roll_back(saved)
                self.generator.set_state(generator_state)
        if not all(torch.equal(a, b) for a, b in zip(global_rngs, self._global_rng_states())):
            raise RuntimeError("the training step draws from torch's global RNG: a graph would replay a host draw "
                               "as a constant, or share the default CUDA generator with other arms")

    def _roll_back(self, saved) -> None:
        """Put back every tensor `saved` lists; optimizer state created since is zeroed (as if never made)."""
        with torch.no_grad():  # state the warm-up created (fresh AdamW moments and steps) goes back to zero
            kept = {id(t) for t, _ in saved}
            for t in self._optimizer_tensors():
                if id(t) not in kept:
                    t.zero_()
            for t, copy_ in saved:
                t.copy_(copy_)

    def _global_rng_states(self) -> List[torch.Tensor]:
        return [torch.get_rng_state(), *([torch.cuda.get_rng_state(self.device)] if self.cuda else [])]

    def _hold_cached_inputs(self) -> None:
        """Keep a reference to the attention mask the model looked up from its cache (shared by arms, bounded):
        graphs read its memory, and other arms' streams may, so it must never be freed and reused under them."""
        mc = self.model.config
        if any(block.causal for block in self.model.blocks):
            grid = tuple(s // mc.patch_size for s in self.data.images.shape[-2:])
            backend = resolve_backend(self.model.attention_backend, mc.causal_scan, self.device.type)
            self._kept = [attention_mask(mc.causal_scan, grid, self.device, backend)]

    def _capture_graphs(self) -> None:
        """Warm up, then capture one graph per dilation; every tensor the graphs read or write stays allocated."""
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError(f"torch {torch.__version__} cannot capture a private generator; graphed arms need "
                               "CUDAGraph.register_generator_state")
        self._warm_up()
        self._hold_cached_inputs()
        # one memory pool for the arm's graphs: they replay one after another on its stream, and every tensor that
        # outlives a step was allocated before capture. capture_begin/end by hand (not torch.cuda.graph) so that a
        # capture that fails is ended: otherwise its pool stays marked as capturing, which blocks the allocator's
        # free-and-retry on out-of-memory and trips empty_cache for the rest of the process
        pool = torch.cuda.graph_pool_handle()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            for dilation in self.dilations:
                graph = torch.cuda.CUDAGraph()
                graph.register_generator_state(self.generator)  # replays advance its Philox offset like eager draws
                with torch.cuda.stream(self.stream):
                    graph.capture_begin(pool=pool)
                    try:
                        self._compute(dilation)
                    finally:
                        try:
                            graph.capture_end()
                        except Exception:
                            torch._C._cuda_endAllocateToPool(index, pool)
                            torch._C._cuda_releasePool(index, pool)
                            self._graphs.clear()
                            raise
                self._graphs[dilation] = graph
        self._primed = True  # capture synchronized the device

    # -- save, resume, export ---------------------------------------------------

    def save(self, folder) -> Path:
        """Model, EMA, optimizer, counters and RNG states, written to a temporary folder renamed into place."""
        state = {"step": self.step_count, "loss_steps": self._loss_steps, "python_rng": self.rng.getstate(),
                 "config": dataclasses.asdict(self.cfg), "tool_version": __version__,
                 "model_config": init_config(self.model)}
        with self._on_stream(), atomic_folder(Path(folder), overwrite=True) as tmp:
            save_file(cpu_state_dict(self.model), str(tmp / "model.safetensors"))
            save_file(cpu_state_dict(self._ema), str(tmp / "ema.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"generator": self.generator.get_state(), "loss_sum": self._loss_sum.cpu()}, tmp / "rng.pt")
            write_json_atomic(tmp / "state.json", state)
        return Path(folder)

    @classmethod
    def resume(cls, folder, data: DeviceData, model: Optional[LEDiTTransformer2DModel] = None,
               cfg: Optional[ArmConfig] = None, **arm_options) -> "Arm":
        """An arm continuing exactly where `save` left it; the model is rebuilt from the saved config if not given,
        the settings are the saved ones unless `cfg` is."""
        state = json.loads((Path(folder) / "state.json").read_text())
        model = model if model is not None else LEDiTTransformer2DModel(**state["model_config"])
        arm = cls(model, data, cfg or ArmConfig(**state["config"]), **arm_options)
        arm.load(folder)
        return arm

    def load(self, folder) -> None:
        """Restore what `save` wrote into this arm (same architecture), before its first step."""
        if self._graphs:
            raise RuntimeError("load() replaces optimizer state the captured graphs point at; load before the "
                               "first step of a graphed arm")
        folder = Path(folder)
        state = json.loads((folder / "state.json").read_text())
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        self._ema.load_state_dict(load_file(str(folder / "ema.safetensors")), strict=True)
        options = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        for group, own in zip(self.optimizer.param_groups, options):
            group.update(own)  # loading replaced the LR (the graphs read the arm's own tensor) and the device flags
        for moments in self.optimizer.state.values():  # fused AdamW counts steps on the device, plain on the CPU
            moments["step"] = moments["step"].to(self.device if self.cuda else "cpu", torch.float32)
        rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
        self.generator.set_state(rng["generator"])
        self._loss_sum.copy_(rng["loss_sum"])
        version, internal, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.step_count, self._loss_steps = state["step"], state["loss_steps"]
        self._step_tensor.fill_(self.step_count)

    def export(self, folder, provenance: Optional[Dict] = None, overwrite: bool = True) -> Path:
        """Write the EMA weights as a model folder (config, weights, model code) that reloads in diffusers."""
        ema = self.ema
        if provenance is None:
            provenance = {"tool": "ledit-convert", "tool_version": __version__,
                          "training": {"loop": "fastloop", "steps": self.step_count,
                                       "config": dataclasses.asdict(self.cfg)}}
        return write_model_folder(Path(folder), init_config(ema), cpu_state_dict(ema), overwrite=overwrite,
                                  provenance=provenance)


#################################################################################
#                                  Several arms                                 #
#################################################################################

def train_concurrently(arms: Sequence[Arm], steps: int, on_step: Optional[Callable[[int, Sequence[Arm]], None]] = None,
                       every: int = 1) -> Dict:
    """Advance every arm by `steps` steps, round-robin, each on its own CUDA stream so their kernels overlap
    (one after another on CPU); `on_step(step, arms)` runs every `every` steps with the arms' work visible to
    the current stream; one synchronize at the end. Returns samples/s over the whole call."""
    if every < 1:
        raise ValueError(f"every {every} must be >= 1")
    start, in_callback = time.perf_counter(), 0.0
    for i in range(1, steps + 1):
        for arm in arms:
            arm.step()
        if on_step is not None and i % every == 0:
            t = time.perf_counter()
            for arm in arms:
                arm.join()  # the callback reads what the arms wrote; their next steps wait for the callback's work
            on_step(i, arms)
            in_callback += time.perf_counter() - t
    for device in {arm.device for arm in arms if arm.cuda}:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    samples = steps * sum(arm.cfg.batch for arm in arms)
    return {"steps": steps, "arms": len(arms), "samples": samples, "seconds": seconds,
            "callback_seconds": in_callback, "samples_per_s": samples / max(seconds, 1e-9)}
