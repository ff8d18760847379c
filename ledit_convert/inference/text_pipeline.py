"""Text-to-image sampling of a PixArt (LEDiT or stock) at any height and width: prompts encoded by
`text.TextEncoder` (the encoding training used), denoised by diffusers' own PixArt pipelines with resolution
binning off, so the converted transformer runs in exactly the pipeline it would drop into."""
import json
import os
from typing import List, Optional, Sequence

import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

from ..errors import CheckpointError, ConfigError
from .pipeline import default_scheduler
from ..models.pixart import LEDiTPixArtTransformer2DModel
from ..data.text import DEFAULT_MAX_LENGTH, TextEncoder, load_text_encoder

TEXT_SCHEDULERS = ("dpm", "ddim")  # PixArt's pipelines drop the learned variance, which DiT's ddpm sampler reads
TEXT_DEFAULTS = {"steps": 20, "cfg_scale": 4.5, "scheduler": "dpm"}  # PixArt's pipeline defaults


class TextToImage:
    """Calls like `LEDiTPipeline` with prompts in place of class labels: `(prompts, generator=, output_type=, height=,
    width=, num_inference_steps=, guidance_scale=)` -> an output with `.images`. A micro-conditioned model (PixArt-alpha
    1024) runs in PixArtAlphaPipeline, which computes its resolution and aspect-ratio inputs; others in
    PixArtSigmaPipeline."""

    def __init__(self, transformer, vae, scheduler, encoder: TextEncoder, negative_prompt: str = ""):
        micro = getattr(transformer, "use_additional_conditions", False)
        if micro and transformer.config.sample_size != 128:
            raise ConfigError(f"a micro-conditioned PixArt of sample_size {transformer.config.sample_size}: diffusers' "
                              f"PixArt-alpha pipeline gives resolution and aspect ratio only to sample_size 128")
        cls = PixArtAlphaPipeline if micro else PixArtSigmaPipeline
        self.pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
        self.encoder, self.negative_prompt = encoder, negative_prompt

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
        embeds, mask = self.encoder.encode(list(prompts))
        negative = {}
        if guidance_scale > 1.0:
            neg_embeds, neg_mask = self.encoder.encode([self.negative_prompt] * len(prompts))
            negative = dict(negative_prompt_embeds=neg_embeds, negative_prompt_attention_mask=neg_mask)
        return self.pipe(prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=guidance_scale,
                         negative_prompt=None, use_resolution_binning=False, **negative, **call)


def make_text_scheduler(kind: str):
    """DiT's (and PixArt's) 1000-step linear schedule as a DPM-Solver++ or DDIM scheduler."""
    if kind not in TEXT_SCHEDULERS:
        raise ConfigError(f"scheduler {kind!r} does not sample a text-to-image model; use one of {TEXT_SCHEDULERS} "
                          f"(PixArt's pipelines drop the learned variance that ddpm reads)")
    return default_scheduler(kind)


def source_pipeline(transformer_dir: str, hops: int = 4) -> Optional[str]:
    """The PixArt pipeline folder a converted model came from, followed through provenance.json (surgery, then
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


def load_text_pipeline(transformer_dir: str, kind: str, vae: Optional[str], text_encoder: Optional[str],
                       scheduler: str = "dpm", device: str = "cpu", dtype: torch.dtype = torch.float32,
                       negative_prompt: str = "", max_length: int = DEFAULT_MAX_LENGTH) -> TextToImage:
    """A converted ("pixart") or stock diffusers ("pixart_diffusers") PixArt with its VAE and text encoder, by
    default those of the pipeline folder it came from (`source_pipeline`)."""
    from .sampling import assemble_vae
    home = source_pipeline(transformer_dir)
    vae, text_encoder = vae or home, text_encoder or home
    for name, value in (("--vae", vae), ("--text-encoder", text_encoder)):
        if value is None:
            raise ConfigError(f"{transformer_dir}: a text-to-image model needs {name} (its PixArt pipeline folder "
                              f"or id), and the folder it was converted from is not at hand")
    noise_scheduler = make_text_scheduler(scheduler)
    cls = LEDiTPixArtTransformer2DModel if kind == "pixart" else PixArtTransformer2DModel
    try:
        transformer = cls.from_pretrained(transformer_dir, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the transformer in {transformer_dir}: {str(e).splitlines()[0]}") from None
    encoder = load_text_encoder(text_encoder, max_length, device)
    encoder.check_width(transformer.config.caption_channels, transformer_dir)
    return TextToImage(transformer, assemble_vae(vae), noise_scheduler, encoder, negative_prompt).to(device)


def plan_prompts(num_samples: int, prompts: List[str]) -> List[str]:
    """The prompt of every sample: the given prompts cycled."""
    if not prompts:
        raise ConfigError("a text-to-image model samples prompts: pass --prompt or --prompts-file")
    return [prompts[i % len(prompts)] for i in range(num_samples)]
