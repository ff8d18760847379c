# Class-conditional sampling for LEDiT and stock DiT transformers at any height and width.
#
# This file is self-contained (torch, diffusers, numpy, PIL and the standard library only): save_pipeline
# copies it verbatim beside the weights as `pipeline_ledit.py` so that
# `diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads a saved pipeline where
# ledit_convert is not installed. Keep it that way: no ledit_convert imports here.
#
# The sampler follows DiT's sample.py: guidance on the first 3 latent channels by default (DiT's
# forward_with_cfg; diffusers' DiTPipeline guides all 4), cond and uncond in one batched forward, the learned
# variance handed to a DDPM "learned_range" scheduler, 1000 linear betas from 1e-4 to 0.02.
import inspect
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.models.modeling_utils import ModelMixin  # diffusers' loader looks this name up in custom modules
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

SCHEDULER_KINDS = ("ddpm", "ddim", "dpm")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PIPELINE_MODULE = "pipeline_ledit"  # file name (without .py) of this module inside a saved pipeline folder
MODEL_MODULE = "modeling_ledit"  # file name of the model source inside the saved transformer/ subfolder
__all__ = ["LEDiTPipeline", "default_scheduler", "save_pipeline", "SCHEDULER_KINDS", "OUTPUT_TYPES"]


def default_scheduler(kind: str = "ddpm") -> SchedulerMixin:
    """DiT's schedule (1000 linear betas 1e-4..0.02) as a diffusers DDPM, DDIM or DPM-Solver++ scheduler."""
    betas = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if kind == "ddpm":
        # "linspace" spacing picks round(i * 999 / (S - 1)), the steps DiT's space_timesteps(1000, "S") keeps;
        # "learned_range" interpolates the log-variance like DiT's p_mean_variance; DiT samples unclipped.
        return DDPMScheduler(**betas, variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")
    if kind == "ddim":
        # DDIM steps back by a fixed stride, so its timesteps must be evenly spaced ("leading", as DiT's "ddimS").
        return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    if kind == "dpm":
        return DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler kind {kind!r}; expected one of {SCHEDULER_KINDS}")


def _takes_learned_variance(scheduler) -> bool:
    """True for DDPM-style schedulers that read the variance half of a learned-sigma output."""
    # DPMSolverMultistep also has variance_type, but it then keeps channels [:3] (DeepFloyd IF): not for latents.
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    return learned and isinstance(scheduler, DDPMScheduler)


class LEDiTPipeline(DiffusionPipeline):
    r"""
    Class-conditional image generation with a LEDiT (or stock DiT) transformer at any height and width.

    Parameters:
        transformer: a `LEDiTTransformer2DModel` (forward takes `attention_kwargs`) or a diffusers
            `DiTTransformer2DModel`; either may learn the variance (out_channels = 2 x in_channels).
        vae ([`AutoencoderKL`], optional): decodes latents to pixels. Without it the pipeline works in the model's
            own space (sizes in model cells; a 3-channel model is taken to be a pixel-space model).
        scheduler: a diffusers scheduler, e.g. from `default_scheduler("ddpm")`.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: ModelMixin, vae: Optional[AutoencoderKL], scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE blocks - 1), 8 for SD VAEs; 1 without a VAE (pixel space)."""
        if getattr(self, "vae", None) is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def num_classes(self) -> int:
        """Number of real classes; the null (unconditional) class is this index."""
        config = self.transformer.config
        if "num_classes" in config:  # our model
            return int(config.num_classes)
        return int(config.num_embeds_ada_norm)  # diffusers DiTTransformer2DModel

    @property
    def takes_attention_kwargs(self) -> bool:
        """Whether the transformer accepts LEDiT's `attention_kwargs` (diffusers' DiT does not)."""
        model = getattr(self.transformer, "_orig_mod", self.transformer)  # see through torch.compile
        return "attention_kwargs" in inspect.signature(model.forward).parameters

    def check_inputs(self, class_labels, height, width, num_inference_steps, guidance_channels, output_type,
                     attention_scaling, causal_to_self_below, position_mode):
        """Validate the call's arguments; return (latent height, latent width, guided channel count)."""
        config = self.transformer.config
        for label in class_labels:
            if not 0 <= label < self.num_classes:
                raise ValueError(f"class label {label} is out of range 0..{self.num_classes - 1} of the model's classes")
        multiple = self.vae_scale_factor * config.patch_size
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise ValueError(f"{name} {value} must be a positive multiple of {multiple} "
                                 f"(VAE factor {self.vae_scale_factor} x patch size {config.patch_size})")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps {num_inference_steps} must be at least 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        if output_type != "latent" and getattr(self, "vae", None) is None and config.in_channels != 3:
            raise ValueError(f"output_type {output_type!r} needs a VAE: without one the model's {config.in_channels} "
                             "channels are not an RGB image")
        channels = config.in_channels
        guided = channels if guidance_channels in (None, "all") else guidance_channels
        if isinstance(guided, bool) or not isinstance(guided, int) or not 1 <= guided <= channels:
            raise ValueError(f"guidance_channels {guidance_channels!r} must be 1..{channels}, 'all' or None")
        if attention_scaling not in (None, "log", "none"):
            raise ValueError(f"attention_scaling {attention_scaling!r} must be 'log', 'none' or None")
        if causal_to_self_below is not None and (isinstance(causal_to_self_below, bool)
                                                 or not isinstance(causal_to_self_below, int) or causal_to_self_below < 0):
            raise ValueError(f"causal_to_self_below {causal_to_self_below!r} must be a non-negative integer timestep")
        if not self.takes_attention_kwargs:
            # diffusers' DiT: plain attention, sin/cos table interpolated to new grids by its PatchEmbed.
            name = type(self.transformer).__name__
            if attention_scaling == "log":
                raise ValueError(f"attention_scaling 'log' needs a LEDiT model; {name} has no attention options")
            if causal_to_self_below is not None:
                raise ValueError(f"causal_to_self_below {causal_to_self_below} needs a LEDiT model; {name} has no causal blocks")
            if position_mode not in (None, "interpolate"):
                raise ValueError(f"position scaling {position_mode!r} needs a LEDiT-class model; {name} always "
                                 "interpolates its table")
            if height != width:  # its forward unpatchifies an int(sqrt(N)) x int(sqrt(N)) grid
                raise ValueError(f"{name} only generates square images; got height {height}, width {width}")
        elif position_mode is not None:  # one the positions do not take (yarn on a sin/cos table, any on LEDiT)
            model = getattr(self.transformer, "_orig_mod", self.transformer)
            if not hasattr(model, "check_position_scaling"):
                raise ValueError(f"position scaling {position_mode!r} needs a model that takes position scalings; "
                                 f"{type(model).__name__} does not")
            model.check_position_scaling(position_mode)
        if self.transformer.training:
            raise ValueError("the transformer is in training mode (label dropout, random conv dilation); call .eval()")
        return height // self.vae_scale_factor, width // self.vae_scale_factor, guided

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, List[int]],
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 250,
        guidance_scale: float = 4.0,
        guidance_channels: Union[int, str, None] = 3,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        output_type: str = "pil",
        attention_scaling: Optional[str] = None,
        causal_to_self_below: Optional[int] = None,
        position_mode: Optional[str] = None,
        return_dict: bool = True,
    ):
        r"""
        Generate one image per class label.

        Args:
            class_labels: class ids in [0, num_classes).
            height, width: output size in pixels, multiples of vae_scale_factor x patch_size; default the
                training size (transformer sample_size x vae_scale_factor). Non-square sizes are allowed.
            num_inference_steps: denoising steps (DiT's protocol: 250 DDPM steps).
            guidance_scale: classifier-free guidance scale; guidance is off at <= 1 (one forward per step).
            guidance_channels: how many leading latent channels are guided: 3 as DiT's sampler, "all" or None
                for all of them as diffusers' DiTPipeline.
            generator: a torch.Generator, or one per image (then an image does not depend on its batch).
            output_type: "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW float in [0, 1]) or "latent".
            attention_scaling: None keeps the model's setting, "log" multiplies logits by sqrt(ln N / ln N_train),
                "none" disables it.
            causal_to_self_below: for timesteps t < this value, causal blocks run as self-attention (LEDiT App. C).
            position_mode: how positions meet a size other than the training one (the model's position scaling):
                for sin/cos models "extrapolate" (DiT), "interpolate" (diffusers), "ntk" or "dype-interpolate"; for
                2D RoPE models "none", "pi", "ntk", "yarn", "riflex", "dype", "dype-pi" or "dype-ntk".
            return_dict: return an `ImagePipelineOutput` (else a one-tuple).
        """
        # 1. Inputs
        labels = [int(class_labels)] if isinstance(class_labels, int) else [int(c) for c in class_labels]
        default_size = self.transformer.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        latent_h, latent_w, guided = self.check_inputs(labels, height, width, num_inference_steps, guidance_channels,
                                                       output_type, attention_scaling, causal_to_self_below,
                                                       position_mode)
        device = self._execution_device
        model_dtype = self.transformer.dtype
        channels = self.transformer.config.in_channels
        use_cfg = guidance_scale > 1
        learned_sigma = (self.transformer.config.out_channels or channels) == 2 * channels
        pass_variance = learned_sigma and _takes_learned_variance(self.scheduler)

        # 2. Latents: drawn in float32 whatever the model dtype, so a seed means the same noise in fp32 and bf16,
        # and kept in float32 so 250 scheduler updates do not accumulate bf16 rounding.
        latents = randn_tensor((len(labels), channels, latent_h, latent_w), generator=generator, device=device,
                               dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        class_ids = torch.tensor(labels, device=device)
        if use_cfg:  # cond rows first, then the null class: one batched forward per step
            class_ids = torch.cat([class_ids, torch.full_like(class_ids, self.num_classes)])

        # 3. Transformer kwargs, built once: plain steps, and steps below causal_to_self_below (check_inputs allows
        # that only for LEDiT models), picked per step from a host copy of the schedule
        options: Dict[str, Any] = {}
        if self.takes_attention_kwargs:
            if attention_scaling is not None:
                options["scaling"] = attention_scaling
            if position_mode is not None:
                options["position_scaling"] = position_mode
        plain_kwargs = {"attention_kwargs": options} if options else {}
        to_self_kwargs = {"attention_kwargs": {**options, "causal_to_self": True}}
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        host_timesteps = timesteps.tolist()
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

        # 4. Denoising loop
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            model_input = torch.cat([model_input, model_input]) if use_cfg else model_input
            t_batch = t.reshape(1).expand(model_input.shape[0])
            below = causal_to_self_below is not None and host_timesteps[i] < causal_to_self_below
            kwargs = to_self_kwargs if below else plain_kwargs
            out = self.transformer(model_input.to(model_dtype), timestep=t_batch, class_labels=class_ids,
                                   return_dict=False, **kwargs)[0].float()
            if use_cfg:
                cond, uncond = out.chunk(2)
                # DiT's forward_with_cfg: guide the first `guided` eps channels, keep the cond half of the rest
                # (remaining eps channels and the variance values).
                mixed = uncond[:, :guided] + guidance_scale * (cond[:, :guided] - uncond[:, :guided])
                out = torch.cat([mixed, cond[:, guided:]], dim=1)
            if learned_sigma and not pass_variance:
                out = out[:, :channels]  # DDIM / DPM-Solver take eps only
            latents = self.scheduler.step(out, t, latents, return_dict=False, **step_kwargs)[0]

        # 5. Output
        if output_type == "latent":
            images = latents
        else:
            if getattr(self, "vae", None) is None:  # a pixel-space model: its samples are images in [-1, 1]
                images = latents
            else:
                latents = latents / self.vae.config.scaling_factor
                if getattr(self.vae.config, "shift_factor", None):
                    latents = latents + self.vae.config.shift_factor
                images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            images = (images.float() / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def save_pipeline(pipe: DiffusionPipeline, folder: str) -> str:
    """Save `pipe` so that ledit_convert and plain diffusers (trust_remote_code=True) both reload it."""
    pipe.save_pretrained(folder)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    # A [module, class] pair whose module file sits in the folder is how diffusers finds a custom pipeline.
    shutil.copyfile(inspect.getsourcefile(type(pipe)), os.path.join(folder, PIPELINE_MODULE + ".py"))
    index["_class_name"] = [PIPELINE_MODULE, type(pipe).__name__]
    library, class_name = index["transformer"]
    if library.split(".")[0] != "diffusers":
        # Custom component: its (self-contained) source goes into the component folder, named in the index.
        transformer_dir = os.path.join(folder, "transformer")
        code = os.path.join(transformer_dir, MODEL_MODULE + ".py")
        if not os.path.exists(code):  # LEDiT models save their code, and the files it imports, themselves
            shutil.copyfile(inspect.getsourcefile(type(pipe.transformer)), code)
        index["transformer"] = [MODEL_MODULE, class_name]
        config_path = os.path.join(transformer_dir, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        # Lets diffusers.AutoModel.from_pretrained(folder/transformer, trust_remote_code=True) find the class too.
        config["auto_map"] = {"AutoModel": f"{MODEL_MODULE}.{class_name}"}
        _write_json(config_path, config)
    _write_json(index_path, index)
    return folder


def _write_json(path: str, data: dict) -> None:
    """Write JSON through a temporary file so a crash never leaves half a config."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)

