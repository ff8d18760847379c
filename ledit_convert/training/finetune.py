"""`ledit-convert finetune`: DiT's training objective on accelerate, shaped as setup / train / save."""
import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from .. import __version__
from ..models.compiling import compile_blocks, is_compile_error, uncompile_blocks
from .diffusion import DiffusionSchedule
from ..errors import CheckpointError, ConfigError, DataError, first_line
from ..conversion.export import cpu_state_dict, init_config, provenance_record, write_model_folder
from ..conversion.lora import export_lora
from ..conversion.checkpoints import MODEL_CLASSES, load_pretrained, load_safetensors, torch_load_safely
from .recipe import Recipe, save_recipe
from .families import FULLY_TRAINED_WITH_LORA, apply_lora, condition, flow_schedule, model_family, text_inputs
from .position_fade import PositionFade, suspended
from .trainstep import diffusion_loss, ema_decay, flow_training_loss, learning_rate
from .sharding import (SHARDED_FOLDER, check_launch, device_mesh, gather_to_main, load_sharded, prepare_sharded,
                       save_sharded, shard_model, sharded_ema, sync_adapters)
from .runstate import (finish_checkpoint, list_checkpoints, partial_dir, read_state, resolve_resume, rng_state,
                       set_rng_state, training_loader, update_ema, write_state)

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything `train` needs, built once by `setup`."""

    accelerator: object
    recipe: Recipe
    model: torch.nn.Module  # prepared (maybe DDP-wrapped, compiled)
    raw_model: torch.nn.Module  # the unwrapped model (peft-wrapped when LoRA; the FSDP2 root when sharded)
    ema: Optional[torch.nn.Module]  # a whole fp32 copy (None when sharded: see ema_shards)
    trainable: List[torch.nn.Parameter]
    ema_trainable: List[torch.Tensor]
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    schedule: DiffusionSchedule
    vae: Optional[torch.nn.Module]  # encodes pixel batches; None for latents and pixel-space models
    step_generator: torch.Generator
    output_dir: Path
    model_dir: Path
    micro_batch: int
    step: int = 0
    skipped_images: int = 0
    decoder: Optional[torch.nn.Module] = None  # the VAE validation decodes with when training on latents
    compile_pending: bool = False  # blocks compiled, first step not yet run (where compile errors surface)
    evaluator: Optional[object] = None  # periodic.PeriodicEvaluator (every process) when eval_every > 0
    family: str = "dit"  # "dit" (class ids), "pixart" or "sd3" (text)
    text_encoder: Optional[object] = None  # data.text encoder(s): captions of uncached data, validation prompts
    null_text: Optional[Dict] = None  # the empty prompt's token fields on the device, for caption dropout
    flow: Optional[object] = None  # flow.FlowSchedule when the objective is rectified flow (SD3)
    fade: Optional[PositionFade] = None  # the source's table fading out (recipe position_fade_images)
    ema_shards: Optional[Dict[str, torch.Tensor]] = None  # fsdp2: the EMA by parameter name, sharded as they are

    @property
    def config(self):
        """The LEDiT config, looked up through the peft wrapper when LoRA is on."""
        model = self.raw_model
        return model.base_model.model.config if hasattr(model, "peft_config") else model.config


#################################################################################
#                                     Setup                                     #
#################################################################################

def load_vae(vae: Optional[str], device):
    """AutoencoderKL from a local folder (its own or a pipeline's vae/) or hub id; None for pixel-space models."""
    if vae is None:
        return None
    from ..inference.vae import assemble_vae
    return assemble_vae(vae, ConfigError).to(device).eval().requires_grad_(False)


def setup(model_dir: str, data, recipe: Recipe, output_dir: str, resume: Optional[str] = None,
          heldout=None) -> Run:
    """Build accelerator, model, EMA, optimizer and data (and the evaluator); restore a checkpoint when resuming.

    `data` is a path (image folder, saved HF dataset, latent cache) or a dataset object with `.labels`
    and `.load(index, flip) -> Sample` (e.g. images already in memory); `heldout`, the same kinds, overrides
    the recipe's eval_heldout.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ..data.images import open_training_data
    output_dir, model_path = Path(output_dir), Path(model_dir)
    if not (model_path / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a model folder (no config.json); run `ledit-convert surgery` first")
    family = model_family(model_path)
    model = load_pretrained(MODEL_CLASSES[family], model_path)
    cfg = model.config
    text = family != "dit"
    num_classes = 0 if text else cfg.num_classes
    resume_from = resolve_resume(resume, output_dir)
    if resume_from is not None:
        _check_layout(resume_from, recipe)
    if resume is None and (output_dir / "checkpoints").exists() and any((output_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{output_dir}: holds checkpoints of an earlier run; pass --resume latest or another "
                          "--output-dir")
    trackers = [t for t in recipe.trackers if t != "wandb" or _has("wandb")]
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision, gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        log_with=trackers or None, project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                       logging_dir=str(output_dir / "logs")))
    micro_batch = recipe.per_process_batch(accelerator.num_processes)
    check_launch(accelerator, recipe)
    if recipe.attention_backend == "flex" and accelerator.device.type != "cuda":
        raise ConfigError(f"attention_backend 'flex' trains on CUDA only (FlexAttention has no backward on "
                          f"{accelerator.device.type}); use auto or sdpa")
    if torch.cuda.is_available() and recipe.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data: validated before the first step, with a one-line reason on failure (flips themselves come from
    # SeededItems; a latent cache checks here that it has flip variants)
    from ..inference.vae import check_vae_fits, vae_scale_factor
    if isinstance(data, (str, Path)):
        from ..data.images import detect_data_kind
        kind = detect_data_kind(data) if recipe.data_kind == "auto" else recipe.data_kind
        factor = 1 if kind == "latents" else vae_scale_factor(recipe.vae, ConfigError)
        dataset = open_training_data(data, recipe.resolution, num_classes, patch_size=cfg.patch_size,
                                     random_flip=recipe.random_flip, class_map=recipe.class_map,
                                     image_column=recipe.image_column, label_column=recipe.label_column,
                                     vae_downsample=factor, kind=kind, captions=text,
                                     caption_column=recipe.caption_column, buckets=recipe.buckets,
                                     bucket_crop=recipe.bucket_crop, bucket_max_upscale=recipe.bucket_max_upscale,
                                     seed=recipe.seed)
    else:
        from ..data.images import check_labels
        dataset = data
        if not text:
            check_labels(dataset.labels, cfg.num_classes, type(data).__name__)
        factor = vae_scale_factor(recipe.vae, ConfigError)
    is_latents = hasattr(dataset, "posterior")
    if not is_latents:  # an image dataset with no readable image stops here, before the run folder is made
        dataset.load(0)
    if _uses_vae(recipe, is_latents):  # encodes the batches, or decodes validation and evaluation samples
        check_vae_fits(recipe.vae, cfg, family, str(model_path), ConfigError)
    _check_input_shapes(dataset, data, recipe, cfg, factor, is_latents)
    vae = None if is_latents else load_vae(recipe.vae, accelerator.device)
    text_encoder, null_text = (text_inputs(dataset, recipe, cfg, data, accelerator.device, family) if text
                               else (None, None))
    flow = flow_schedule(recipe, family)

    # model, EMA (a frozen copy, fp32), optimizer
    model.set_attention_backend(recipe.attention_backend)
    if recipe.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    base_model = model  # LoRA wraps it and injects its layers in place
    if recipe.lora_rank > 0:
        model = apply_lora(model, recipe, family)
    model.train()
    sharded = recipe.distributed == "fsdp2"
    ema = None if sharded else copy.deepcopy(model).eval().requires_grad_(False)
    # after the EMA copy: the fading table hooks the trained model only, so the EMA and exports never have it
    fade = PositionFade(base_model, recipe.position_fade_images) if recipe.position_fade_images else None
    ema_shards = None
    if sharded:  # in place, before the optimizer takes the parameters; the EMA is cloned from the shards
        sync_adapters(model, accelerator.device)
        shard_model(model, device_mesh(accelerator.device, accelerator.num_processes), recipe.mixed_precision,
                    recipe.fsdp_reshard_after_forward)
        ema_shards = sharded_ema(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema_trainable = list(ema_shards.values()) if sharded else \
        [p for p, q in zip(ema.parameters(), model.parameters()) if q.requires_grad]
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
                                  betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_eps, fused=fused)
    if sharded:
        prepared, optimizer = prepare_sharded(accelerator, model, optimizer)
    else:
        ema.to(accelerator.device)
        prepared, optimizer = accelerator.prepare(model, optimizer)
    if recipe.compile:
        compile_blocks(model, recipe.compile_mode)  # regional and lazy: failures surface at the first step
    step_generator = torch.Generator(device=accelerator.device).manual_seed(recipe.seed * 1000 + accelerator.process_index)
    torch.manual_seed(recipe.seed * 1000 + accelerator.process_index)  # the dilation draw uses the global RNG

    run = Run(accelerator, recipe, prepared, model, ema, trainable, ema_trainable, optimizer, None,
              DiffusionSchedule(), vae, step_generator, output_dir, model_path, micro_batch,
              compile_pending=recipe.compile, family=family, text_encoder=text_encoder, null_text=null_text,
              flow=flow, fade=fade, ema_shards=ema_shards)
    consumed = 0
    if resume_from is not None:
        consumed = _load_checkpoint(run, resume_from)
    run.loader = training_loader(dataset, recipe, micro_batch, accelerator.process_index, accelerator.num_processes,
                                 consumed, pin_memory=accelerator.device.type == "cuda")
    if flow is not None and recipe.eval_every:
        raise ConfigError("eval_every: evaluation during training measures DiT's objective; a flow-trained model is "
                          "evaluated with `ledit-convert evaluate --prompts-file`")
    if text and recipe.eval_every and set(recipe.eval_metrics) - {"heldout_loss"}:
        raise ConfigError(f"eval_metrics {recipe.eval_metrics}: a text-to-image model evaluates heldout_loss during "
                          f"training; FID per size comes from `ledit-convert evaluate --prompts-file`")
    if recipe.eval_every:  # every process samples its shard; the main one scores
        run.evaluator = _build_evaluator(run, heldout if heldout is not None else recipe.eval_heldout)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output_dir / "recipe.resolved.yaml")
        flat = {k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in recipe.to_dict().items()}
        accelerator.init_trackers("ledit-finetune", config=flat)
    return run


def _check_input_shapes(dataset, data, recipe: Recipe, cfg, factor: int, is_latents: bool) -> None:
    """A DataError when the data's inputs (every bucket's, for bucketed data) do not fit the model's input channels
    and patch size."""
    channels = dataset.latent_shape[0] if is_latents else (3 if recipe.vae is None else cfg.in_channels)
    if hasattr(dataset, "bucket_of_item"):
        sizes = getattr(dataset, "latent_sizes", None) or [(h // factor, w // factor) for h, w in dataset.buckets]
        what = "bucketed data"
    elif is_latents:
        sizes, what = [tuple(dataset.latent_shape[-2:])], f"{recipe.resolution}px latents"
    else:
        sizes, what = [(recipe.resolution // factor,) * 2], f"{recipe.resolution}px images"
    bad = [(h, w) for h, w in sizes if h % cfg.patch_size or w % cfg.patch_size]
    if bad or channels != cfg.in_channels:
        h, w = (bad or sizes)[0]
        raise DataError(f"{data}: {what} give {channels} x {h}x{w} inputs, which do not fit a model with "
                        f"{cfg.in_channels} input channels and patch {cfg.patch_size}")


def _build_evaluator(run: Run, heldout):
    """The recipe's evaluation plan with its FID references, decoder and held-out inputs loaded once."""
    from ..evaluation.evaluate import parse_references, reference_from_path
    from .periodic import PeriodicEvaluator
    acc, recipe = run.accelerator, run.recipe
    plan = recipe.eval_plan()
    extractor, held = None, None
    paths = parse_references(recipe.eval_references, plan.resolutions) if "fid" in plan.metrics else {}
    if acc.is_main_process:  # references, the FID network and held-out inputs serve the scoring, on main
        if paths:
            from ..evaluation.fid import InceptionFeatures
            extractor = InceptionFeatures(recipe.inception_weights, device=acc.device)
            plan.references = {res: reference_from_path(paths[res], extractor) for res in plan.resolutions}
        if "heldout_loss" in plan.metrics and heldout is not None:
            held = _heldout_inputs(run, heldout)

    def gather(images):
        from accelerate.utils import gather_object
        return np.concatenate(gather_object([images])) if acc.num_processes > 1 else images
    return PeriodicEvaluator(plan, run.output_dir, vae=_decoder(run), extractor=extractor, heldout=held,
                             schedule=run.schedule, log=acc.log, start_step=run.step, rank=acc.process_index,
                             world=acc.num_processes, gather=gather)


def _heldout_inputs(run: Run, heldout):
    """The first eval_heldout_items held-out items as model inputs (encoded with a fixed posterior draw)."""
    from ..data.images import open_training_data
    cfg, recipe = run.config, run.recipe
    if isinstance(heldout, (str, Path)):
        from ..inference.vae import vae_scale_factor
        factor = vae_scale_factor(recipe.vae, ConfigError)
        heldout = open_training_data(heldout, recipe.resolution, getattr(cfg, "num_classes", 0),
                                     patch_size=cfg.patch_size, random_flip=False, vae_downsample=factor,
                                     captions=run.family != "dit", caption_column=recipe.caption_column)
    n = min(len(heldout), recipe.eval_heldout_items)
    g = torch.Generator().manual_seed(recipe.eval_seed)
    items = [heldout.sample(i, False, g) if hasattr(heldout, "posterior") else heldout.load(i, False) for i in range(n)]
    batch = torch.utils.data.default_collate(items)
    x = batch[0].to(run.accelerator.device)
    labels = condition(run, batch).to("cpu")  # class ids or a TextCondition
    # the posterior draw has its own generator: the training RNG (and so a resumed run) must not see it
    own = torch.Generator(device=run.accelerator.device).manual_seed(recipe.eval_seed)
    x0 = _encode(run, x, own) if not hasattr(heldout, "posterior") else x
    return x0.cpu(), labels


def _uses_vae(recipe: Recipe, is_latents: bool) -> bool:
    """Whether a run loads the recipe's VAE: to encode image batches, or to decode validation or evaluation samples
    within its steps."""
    return recipe.vae is not None and (not is_latents or any(
        0 < every <= recipe.steps for every in (recipe.validate_every, recipe.eval_every)))


def _decoder(run: Run):
    """The VAE that turns samples into images: the training VAE, or for latent data the recipe's (loaded once)."""
    if run.vae is None and run.recipe.vae is not None and run.decoder is None:
        run.decoder = load_vae(run.recipe.vae, run.accelerator.device)  # never used to encode training batches
    return run.vae if run.vae is not None else run.decoder


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


#################################################################################
#                                     Train                                     #
#################################################################################

def _encode(run: Run, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixels -> scaled latents through the VAE (a posterior sample, as DiT, drawn from `generator`, by default the
    step generator); latents pass through."""
    if run.vae is None:
        return x
    with torch.no_grad():
        dist = run.vae.encode(x.to(run.vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator or run.step_generator, device=x.device,
                            dtype=dist.mean.dtype)
        latent = dist.mean + dist.std * noise
        shift = getattr(run.vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * run.vae.config.scaling_factor).float()


def _step(run: Run, batch) -> torch.Tensor:
    """One micro-batch of DiT's loss; returns the detached per-sample loss mean."""
    x, skipped = batch[0], batch[2]
    device = run.accelerator.device
    x = x.to(device, non_blocking=True)
    labels = condition(run, batch)
    run.skipped_images += int(skipped.sum())  # counted on the CPU batch: no device sync
    x0 = _encode(run, x)
    with run.accelerator.accumulate(run.model):
        if run.ema_shards is not None:  # fsdp2: reduce-scatter once, at the last micro-step (DDP's no_sync)
            run.raw_model.set_requires_gradient_sync(run.accelerator.sync_gradients)
        if run.flow is not None:
            loss = flow_training_loss(run.model, run.flow, x0, labels, run.step_generator, run.recipe.class_dropout,
                                      run.accelerator.autocast)
        else:
            learn_sigma = run.config.out_channels == 2 * run.config.in_channels
            loss = diffusion_loss(run.model, run.schedule, x0, labels, run.step_generator, run.recipe.class_dropout,
                                  getattr(run.config, "num_classes", 0), learn_sigma, run.accelerator.autocast)
        run.accelerator.backward(loss)
        if run.accelerator.sync_gradients and run.recipe.max_grad_norm:
            run.accelerator.clip_grad_norm_(run.trainable, run.recipe.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_step(run: Run, batch) -> torch.Tensor:
    """One micro-batch (`_step`). With compiled blocks, the first one is where compilation happens (forward and
    backward graphs); if that fails, the blocks go back to eager and the micro-batch is redone from the same
    random state, so the run continues exactly as an eager run would."""
    if not run.compile_pending:
        return _step(run, batch)
    run.compile_pending = False
    saved_rng, skipped, micro_step = rng_state(run.step_generator), run.skipped_images, run.accelerator.step
    try:
        return _step(run, batch)
    except Exception as e:
        if not is_compile_error(e):
            raise
        logger.warning("torch.compile failed (%s: %s); training continues in eager mode", type(e).__name__,
                       first_line(e))
    uncompile_blocks(run.model)
    for param in run.trainable:  # a failed backward may have left partial gradients
        param.grad = None
    set_rng_state(saved_rng, run.step_generator)
    run.skipped_images, run.accelerator.step = skipped, micro_step  # the latter counts accumulation micro-steps
    return _step(run, batch)


def train(run: Run, progress: Optional[Callable[[Dict], None]] = None,
          validate: Optional[Callable[[Run], None]] = None) -> Dict:
    """Run until recipe.steps optimizer steps; checkpoint, log and validate along the way."""
    acc, recipe = run.accelerator, run.recipe
    loss_sum = torch.zeros((), device=acc.device)
    loss_count = 0
    losses: List[float] = []
    t0, images_at_t0 = time.perf_counter(), run.step
    data = iter(run.loader)
    while run.step < recipe.steps:
        lr = learning_rate(run.step, recipe.learning_rate, recipe.lr_warmup_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if run.fade is not None:
            run.fade.set_images_seen(run.step * recipe.global_batch_size)
        for _ in range(recipe.gradient_accumulation_steps):
            loss_sum += train_step(run, next(data))
            loss_count += 1
        update_ema(run.ema_trainable, run.trainable, ema_decay(run.step, recipe.global_batch_size, recipe.ema_decay,
                                                                recipe.ema_half_life_images, recipe.ema_rampup_ratio))
        run.step += 1
        if run.step % recipe.log_every == 0 or run.step == recipe.steps:
            mean_loss = acc.reduce(loss_sum / loss_count, reduction="mean").item()  # the only sync: every N steps
            loss_sum.zero_()
            loss_count = 0
            elapsed = time.perf_counter() - t0
            ips = (run.step - images_at_t0) * recipe.global_batch_size / max(elapsed, 1e-9)
            losses.append(mean_loss)
            acc.log({"loss": mean_loss, "lr": lr, "images_per_s": ips,
                     "skipped_images": run.skipped_images}, step=run.step)
            if progress is not None and acc.is_main_process:
                progress({"step": run.step, "loss": mean_loss, "lr": lr, "images_per_s": ips})
        if run.evaluator is not None and run.evaluator.due(run.step):
            evaluate_now(run)  # before the checkpoint: a run resumed from it finds this step evaluated
        if run.step % recipe.checkpoint_every == 0 or run.step == recipe.steps:
            save_checkpoint(run)
        if validate is not None and recipe.validate_every and run.step % recipe.validate_every == 0:
            validate(run)
    return {"steps": run.step, "losses": losses, "skipped_images": run.skipped_images}


#################################################################################
#                                      Save                                     #
#################################################################################

def save_checkpoint(run: Run) -> Path:
    """Model, EMA, optimizer, RNG states and data position, written to a partial folder then renamed. Sharded (fsdp2)
    runs write the first three with torch.distributed.checkpoint, every process its own shards."""
    acc = run.accelerator
    folder = partial_dir(run.output_dir, run.step)
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    torch.save(rng_state(run.step_generator), folder / f"rng_{acc.process_index}.pt")
    if run.ema_shards is not None:
        save_sharded(folder / SHARDED_FOLDER, run.raw_model, run.optimizer, run.ema_shards)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if run.ema_shards is None:
            save_file(cpu_state_dict(run.raw_model), str(folder / "model.safetensors"))
            save_file(cpu_state_dict(run.ema), str(folder / "ema.safetensors"))
            torch.save(run.optimizer.state_dict(), folder / "optimizer.pt")
        layout = {"distributed": "fsdp2"} if run.ema_shards is not None else {}  # absent: ddp (older checkpoints)
        write_state(folder, {"step": run.step, "consumed_per_process": run.step * run.micro_batch *
                             run.recipe.gradient_accumulation_steps, "num_processes": acc.num_processes,
                             "skipped_images": run.skipped_images, "tool_version": __version__, **layout})
        finish_checkpoint(run.output_dir, run.step, run.recipe.keep_checkpoints)
    acc.wait_for_everyone()
    return run.output_dir / "checkpoints" / f"step_{run.step:08d}"


def _check_layout(folder: Path, recipe: Recipe) -> None:
    """A ConfigError, before anything is built, when a checkpoint was saved by a ddp run and resumed as fsdp2 or the
    other way round: the files differ (safetensors of whole tensors, or one shard per process)."""
    saved = read_state(folder).get("distributed", "ddp")  # checkpoints from before fsdp2 are ddp ones
    if saved != recipe.distributed:
        raise ConfigError(f"{folder}: saved by a {saved} run, resumed with distributed={recipe.distributed}; resume "
                          f"with distributed={saved}")


def _load_checkpoint(run: Run, folder: Path) -> int:
    """Restore a checkpoint into a freshly built run; returns the items this process had consumed."""
    acc = run.accelerator
    state = read_state(folder)
    if state["num_processes"] != acc.num_processes:
        raise ConfigError(f"{folder}: saved with {state['num_processes']} process(es), resumed with "
                          f"{acc.num_processes}; the data order would change")
    if run.ema_shards is not None:
        load_sharded(folder / SHARDED_FOLDER, run.raw_model, run.optimizer, run.ema_shards)
    else:
        run.raw_model.load_state_dict(load_safetensors(folder / "model.safetensors"), strict=True)
        run.ema.load_state_dict(load_safetensors(folder / "ema.safetensors"), strict=True)
        run.optimizer.load_state_dict(torch_load_safely(folder / "optimizer.pt"))
    set_rng_state(torch_load_safely(folder / f"rng_{acc.process_index}.pt"), run.step_generator)
    run.step = state["step"]
    run.skipped_images = state.get("skipped_images", 0)
    return state["consumed_per_process"]


def _ema_note(recipe: Recipe) -> str:
    if recipe.ema_half_life_images is None:
        return f"EMA {recipe.ema_decay}"
    ramp = f", ramp-up {recipe.ema_rampup_ratio}" if recipe.ema_rampup_ratio else ""
    return f"EMA half-life {recipe.ema_half_life_images:g} images{ramp}"


def _gathered_ema(run: Run) -> Optional[torch.nn.Module]:
    """A sharded run's EMA as a whole fp32 model on the main process's CPU (None elsewhere), gathered one tensor at a
    time into a skeleton built on the meta device (peft-wrapped under LoRA, as the trained model is). Every process
    calls it."""
    state = gather_to_main(run.raw_model, run.ema_shards, run.accelerator.is_main_process)
    if state is None:
        return None
    with torch.device("meta"):  # no memory until the gathered tensors are assigned
        skeleton = MODEL_CLASSES[run.family](**{k: v for k, v in dict(run.config).items() if not k.startswith("_")})
        if run.recipe.lora_rank > 0:
            skeleton = apply_lora(skeleton, run.recipe, run.family)
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.eval()


def _write_ema_folder(run: Run, out: Path, extra: Dict, ema: Optional[torch.nn.Module] = None) -> None:
    """The EMA weights as a model folder (surgery's format), LoRA merged; with LoRA also `<out>-lora/`, the adapter in
    diffusers' format and the fully trained modules, for the folder the fine-tune started from; main process only.
    `ema`: an fp32 CPU model to write (consumed: LoRA merges into it), by default a copy of run.ema."""
    ema = copy.deepcopy(run.ema).cpu().float() if ema is None else ema
    if run.recipe.lora_rank > 0:
        export_lora(ema, out.parent / f"{out.name}-lora", FULLY_TRAINED_WITH_LORA[run.family])  # before the merge
        ema = ema.merge_and_unload()
    prov = provenance_record(run.model_dir, None, "ledit", {"recipe": run.recipe.to_dict()},
                             [f"fine-tuned {run.step} steps ({_ema_note(run.recipe)})"])
    prov.update(extra)
    write_model_folder(out, init_config(ema), cpu_state_dict(ema), overwrite=True, provenance=prov,
                       extra_files={"recipe.yaml": (run.output_dir / "recipe.resolved.yaml").read_text()},
                       family=run.family)


def export_ema(run: Run, summary: Dict) -> Path:
    """Write the EMA weights as a model folder (same format as surgery) to <output-dir>/model."""
    out = run.output_dir / "model"
    ema = _gathered_ema(run) if run.ema_shards is not None else None  # every process joins the gather
    if run.accelerator.is_main_process:
        _write_ema_folder(run, out, {"training": summary}, ema)
    run.accelerator.wait_for_everyone()
    return out


def evaluate_now(run: Run) -> List[Dict]:
    """The periodic evaluation at this step (every process samples its shard, the main one scores); new best EMA
    weights go to best/."""
    def on_best(row):
        _write_ema_folder(run, run.output_dir / "best", {"evaluation": row})
        run.evaluator.write_best()
    with suspended(run.raw_model):  # the raw weights are evaluated as they will be exported: without a fading table
        rows = run.evaluator.evaluate(run.step, {"ema": run.ema, "raw": run.raw_model},
                                      run.step * run.recipe.global_batch_size, on_best)
    run.accelerator.wait_for_everyone()
    return rows


@torch.no_grad()
def validation_grids(run: Run) -> List[Path]:
    """EMA samples of fixed classes (or prompts) and seed at the training resolution and at 2x, saved as PNG and
    logged."""
    import numpy as np
    from PIL import Image

    from ..inference.pipeline import LEDiTPipeline, default_scheduler
    acc, recipe = run.accelerator, run.recipe
    if not acc.is_main_process:
        return []
    vae = _decoder(run)
    if run.family == "dit":
        classes = [c for c in recipe.validation_classes if 0 <= c < run.config.num_classes]
        conditions = classes or list(range(min(8, run.config.num_classes)))
        pipe = LEDiTPipeline(transformer=run.ema, vae=vae, scheduler=default_scheduler("ddpm"))
    else:
        from ..inference.text_pipeline import TextToImage, make_text_scheduler
        # diffusers' pipeline takes a plain transformer: with LoRA, a merged copy (the EMA itself stays wrapped)
        ema = copy.deepcopy(run.ema).merge_and_unload() if recipe.lora_rank > 0 else run.ema
        conditions = list(recipe.validation_prompts)
        from ..inference.text_pipeline import TEXT_DEFAULTS
        pipe = TextToImage(ema, vae, make_text_scheduler(TEXT_DEFAULTS[run.family]["scheduler"], run.family),
                           run.text_encoder)
    pipe.set_progress_bar_config(disable=True)
    folder = run.output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    side = run.config.sample_size * pipe.vae_scale_factor  # pixels (model cells for a pixel-space model)
    for scale in (1, 2):
        g = torch.Generator(device=acc.device).manual_seed(recipe.validation_seed)
        images = pipe(conditions, height=side * scale, width=side * scale, num_inference_steps=recipe.validation_steps,
                      guidance_scale=recipe.validation_cfg, generator=g, output_type="np").images
        grid = np.concatenate(list(images), axis=1)  # one row, classes left to right
        path = folder / f"step_{run.step:08d}_{scale}x.png"
        Image.fromarray((grid * 255).round().clip(0, 255).astype(np.uint8)).save(path)
        saved.append(path)
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"validation/{scale}x", grid, run.step, dataformats="HWC")
    return saved


def _outermost_missing(path: Path) -> Optional[Path]:
    """The outermost folder of `path` that does not exist yet (the first a new run makes), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _drop_unfinished_run(output_dir: Path, created: Path) -> None:
    """Remove the folders a new run made (main process) when it holds no complete checkpoint to resume from."""
    if os.environ.get("RANK", "0") == "0" and created.exists() and not list_checkpoints(output_dir):
        shutil.rmtree(created, ignore_errors=True)


def finetune(model_dir: str, data: str, recipe: Recipe, output_dir: str, resume: Optional[str] = None,
             progress: Optional[Callable[[Dict], None]] = None, validate: Optional[Callable[[Run], None]] = None,
             heldout=None) -> Dict:
    """setup -> train -> export; returns a summary (steps, logged losses, skipped images, model path). A new run that
    fails before its first checkpoint removes the run folder it made."""
    created = _outermost_missing(Path(output_dir))
    try:
        run = setup(model_dir, data, recipe, output_dir, resume, heldout)
        summary = train(run, progress, validate)
    except BaseException:
        if created is not None:
            _drop_unfinished_run(Path(output_dir), created)
        raise
    summary["model"] = str(export_ema(run, summary))
    if run.evaluator is not None:
        summary["evaluations"] = len(run.evaluator.rows)
        if run.evaluator.best is not None:
            summary["best"] = {"metric": recipe.best_metric, "value": run.evaluator.best[recipe.best_metric],
                               "step": run.evaluator.best["step"], "model": str(run.output_dir / "best")}
    run.accelerator.end_training()
    return summary
