"""Text-to-image sampling of a PixArt or an SD3 (LEDiT or stock) at any height and width: prompts encoded by the
family's text encoders (`data.text`, the encoding training used), denoised by diffusers' own pipelines (PixArt's
with resolution binning off; SD3's with its flow-matching Euler scheduler), so the converted transformer runs in
exactly the pipeline it would drop into."""
import json
import os
from typing import List, Optional, Sequence, Tuple

import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline,
                       PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)

from ..conversion.checkpoints import load_pretrained
from ..data.text import DEFAULT_MAX_LENGTH, SD3_MAX_LENGTH, load_sd3_text_encoders, load_text_encoder
from ..errors import ConfigError
from ..models.pixart import LEDiTPixArtTransformer2DModel
from ..models.sd3 import LEDiTSD3Transformer2DModel
from .pipeline import default_scheduler
from .vae import assemble_vae

FAMILY_OF_KIND = {"pixart": "pixart", "pixart_diffusers": "pixart", "sd3": "sd3", "sd3_diffusers": "sd3"}
MODEL_OF_KIND = {"pixart": LEDiTPixArtTransformer2DModel, "pixart_diffusers": PixArtTransformer2DModel,
                 "sd3": LEDiTSD3Transformer2DModel, "sd3_diffusers": SD3Transformer2DModel}
# PixArt's pipelines drop the learned variance, which DiT's ddpm sampler reads; SD3 samples its flow
TEXT_SCHEDULERS = {"pixart": ("dpm", "ddim"), "sd3": ("flow",)}
TEXT_DEFAULTS = {"pixart": {"steps": 20, "cfg_scale": 4.5, "scheduler": "dpm", "max_length": DEFAULT_MAX_LENGTH},
                 "sd3": {"steps": 28, "cfg_scale": 7.0, "scheduler": "flow", "max_length": SD3_MAX_LENGTH}}


# a token field's pipeline argument (its negative: "negative_" + the same)
PIPELINE_ARGUMENTS = {"embeds": "prompt_embeds", "mask": "prompt_attention_mask", "pooled": "pooled_prompt_embeds"}


class TextToImage:
    """Calls like `LEDiTPipeline` with prompts in place of class labels: `(prompts, generator=, output_type=, height=,
    width=, num_inference_steps=, guidance_scale=)` -> an output with `.images`. An SD3 runs in
    StableDiffusion3Pipeline; a micro-conditioned PixArt (alpha 1024) in PixArtAlphaPipeline, which computes its
    resolution and aspect-ratio inputs; other PixArts in PixArtSigmaPipeline. The pipelines get the encoded
    prompts, never the prompts, so they need no text encoder of their own."""

    def __init__(self, transformer, vae, scheduler, encoder, negative_prompt: str = ""):
        self.sd3 = hasattr(transformer.config, "joint_attention_dim")
        if self.sd3:
            self.pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                                 text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        else:
            micro = getattr(transformer, "use_additional_conditions", False)
            if micro and transformer.config.sample_size != 128:
                raise ConfigError(f"a micro-conditioned PixArt of sample_size {transformer.config.sample_size}: "
                                  f"diffusers' PixArt-alpha pipeline gives resolution and aspect ratio only to "
                                  f"sample_size 128")
            cls = PixArtAlphaPipeline if micro else PixArtSigmaPipeline
            self.pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
        self.encoder, self.negative_prompt = encoder, negative_prompt
        self._negative = None  # the negative prompt's fields, encoded at the first guided call

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    def to(self, device) -> "TextToImage":
        self.pipe.to(device)
        self.encoder.model.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], guidance_scale: float = 4.5, **call):
        args = {PIPELINE_ARGUMENTS[k]: v for k, v in self.encoder.encode(list(prompts)).items()}
        if guidance_scale > 1.0:
            if self._negative is None:
                self._negative = self.encoder.encode([self.negative_prompt])
            args.update({"negative_" + PIPELINE_ARGUMENTS[k]: v.expand(len(prompts), *v.shape[1:])
                         for k, v in self._negative.items()})
        if not self.sd3:
            args.update(negative_prompt=None, use_resolution_binning=False)
        return self.pipe(guidance_scale=guidance_scale, **args, **call)


def make_text_scheduler(kind: str, family: str = "pixart", home: Optional[str] = None):
    """PixArt: DiT's (and PixArt's) 1000-step linear schedule as a DPM-Solver++ or DDIM scheduler. SD3: the flow-
    matching Euler scheduler of the pipeline folder `home` (its shift, and its resolution-dependent shift when it has
    one), else SD3's (shift 3)."""
    if kind not in TEXT_SCHEDULERS[family]:
        why = " (PixArt's pipelines drop the learned variance that ddpm reads)" if family == "pixart" else ""
        name = "SD3" if family == "sd3" else "PixArt"
        raise ConfigError(f"scheduler {kind!r} does not sample {name} models; use one of {TEXT_SCHEDULERS[family]}{why}")
    if family == "pixart":
        return default_scheduler(kind)
    if home is not None and os.path.isfile(os.path.join(home, "scheduler", "scheduler_config.json")):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(home, subfolder="scheduler")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def source_pipeline(transformer_dir: str, hops: int = 4) -> Optional[str]:
    """The pipeline folder a converted model came from, followed through provenance.json (surgery, then
    each fine-tune), if it still exists: the default home of the VAE and text encoder."""
    folder = transformer_dir
    for _ in range(hops):
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            return folder
        parent = os.path.dirname(os.path.normpath(folder))
        if os.path.basename(os.path.normpath(folder)) == "transformer" and \
                os.path.isfile(os.path.join(parent, "model_index.json")):
            return parent
        try:
            with open(os.path.join(folder, "provenance.json")) as f:
                folder = json.load(f)["source"]["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not os.path.isdir(folder):
            return None
    return None


def text_parts(transformer_dir: str, vae: Optional[str],
               text_encoder: Optional[str]) -> Tuple[str, str, Optional[str]]:
    """(VAE, text encoder, source pipeline) of a text-to-image transformer: those given, else the pipeline folder it
    was converted from (`source_pipeline`); a ConfigError when one is neither given nor at hand."""
    home = source_pipeline(transformer_dir)
    vae, text_encoder = vae or home, text_encoder or home
    for name, value in (("--vae", vae), ("--text-encoder", text_encoder)):
        if value is None:
            raise ConfigError(f"{transformer_dir}: a text-to-image model needs {name} (its pipeline folder or id), "
                              f"and the folder it was converted from is not at hand")
    return vae, text_encoder, home


def load_text_encoders(family: str, path: str, max_length: Optional[int] = None, device="cpu",
                       dtype: torch.dtype = torch.float32):
    """A family's text encoding: T5 for PixArt, the two CLIPs and T5 for SD3 (`max_length`: the family's default)."""
    length = TEXT_DEFAULTS[family]["max_length"] if max_length is None else max_length
    loader = load_sd3_text_encoders if family == "sd3" else load_text_encoder
    return loader(path, length, device, dtype)


def load_text_pipeline(transformer_dir: str, kind: str, vae: Optional[str], text_encoder: Optional[str],
                       scheduler: Optional[str] = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       negative_prompt: str = "", max_length: Optional[int] = None) -> TextToImage:
    """A converted ("pixart", "sd3") or stock diffusers ("pixart_diffusers", "sd3_diffusers") text-to-image
    transformer with its VAE and text encoders, by default those of the pipeline folder it came from
    (`source_pipeline`)."""
    family = FAMILY_OF_KIND[kind]
    vae, text_encoder, home = text_parts(transformer_dir, vae, text_encoder)
    noise_scheduler = make_text_scheduler(scheduler or TEXT_DEFAULTS[family]["scheduler"], family, home)
    transformer = load_pretrained(MODEL_OF_KIND[kind], transformer_dir, torch_dtype=dtype)
    encoder = load_text_encoders(family, text_encoder, max_length, device)
    encoder.check_fits(transformer.config, transformer_dir)
    return TextToImage(transformer, assemble_vae(vae), noise_scheduler, encoder, negative_prompt).to(device)


def kind_for_scaling(kind: str, scaling: Optional[str]) -> str:
    """The kind to load a model as: a stock folder loads into our class when a position scaling is asked (diffusers'
    classes take none; ours run the same table and weights)."""
    return kind.replace("_diffusers", "") if scaling else kind


def set_position_scaling(pipe: TextToImage, scaling: Optional[str], where: str = "") -> TextToImage:
    """The transformer's position scaling for every call (None: its own); one its positions do not take is a
    ConfigError prefixed by `where`."""
    if scaling is None and not hasattr(pipe.transformer, "set_position_scaling"):
        return pipe
    try:
        pipe.transformer.set_position_scaling(scaling)
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None
    return pipe


def plan_prompts(num_samples: int, prompts: List[str]) -> List[str]:
    """The prompt of every sample: the given prompts cycled."""
    if not prompts:
        raise ConfigError("a text-to-image model samples prompts: pass --prompt or --prompts-file")
    return [prompts[i % len(prompts)] for i in range(num_samples)]
