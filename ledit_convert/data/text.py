"""Text conditioning for text-to-image transformers: text encoders with their tokenizers, turning prompts into
named token fields: {"embeds", "mask"} for PixArt (T5 tokens and keep-masks it cross-attends to), {"embeds",
"pooled"} for SD3 (the joint CLIP + T5 sequence and the pooled CLIP vectors). Caching, training and sampling all
encode through an encoder's `encode`, so the tokens a model is trained on are the tokens it is sampled with."""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, DataError, first_line

DEFAULT_MAX_LENGTH = 300  # PixArt-Sigma's token count (PixArt-alpha trained with 120)
# a token field's transformer argument (PixArt: embeds + mask; SD3: embeds + pooled)
ARGUMENTS = {"embeds": "encoder_hidden_states", "mask": "encoder_attention_mask", "pooled": "pooled_projections"}


class TextEncoder:
    """A tokenizer and an encoder (T5 for PixArt). `encode` pads every prompt to `max_length` tokens, as PixArt's
    pipelines do, and lower-cases and strips it, as they do without caption cleaning."""

    def __init__(self, tokenizer, model: torch.nn.Module, max_length: int = DEFAULT_MAX_LENGTH, source: str = ""):
        if max_length < 1:
            raise ConfigError(f"text max_length must be positive, got {max_length}")
        self.tokenizer, self.model, self.max_length, self.source = tokenizer, model.eval(), max_length, source

    @property
    def width(self) -> int:
        """Channels of each output token (T5-XXL: 4096); a PixArt's caption_channels must equal it."""
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{"embeds": token states (B, max_length, width) float32, "mask": keep-masks (B, max_length) int64}."""
        texts = [str(p).lower().strip() for p in prompts]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self.model(ids, attention_mask=mask)[0]
        return {"embeds": states.float(), "mask": mask.long()}

    def check_fits(self, config, where: str) -> None:
        """A ConfigError when this encoder's tokens do not fit a transformer (its caption_channels)."""
        if self.width != config.caption_channels:
            raise ConfigError(f"text encoder {self.source}: gives {self.width}-wide tokens, but {where} takes "
                              f"caption_channels {config.caption_channels}")


@contextmanager
def _quiet_loading():
    """transformers' weight-loading progress bars off while encoders load: the commands report their own progress,
    and a failed command's stderr stays its one error line."""
    from transformers.utils import logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def _parts(path: str) -> Tuple[str, Optional[str], str, Optional[str]]:
    """(encoder path, subfolder, tokenizer path, subfolder) of a pipeline folder (text_encoder/ and tokenizer/), an
    encoder folder holding its tokenizer, or a hub id (a pipeline's layout assumed)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
            return path, "text_encoder", path, "tokenizer"
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None, path, None
        raise ConfigError(f"{path}: not a text encoder (no config.json, and no text_encoder/ of a pipeline)")
    return path, "text_encoder", path, "tokenizer"


def load_text_encoder(path: str, max_length: int = DEFAULT_MAX_LENGTH, device="cpu",
                      dtype: torch.dtype = torch.float32) -> TextEncoder:
    """The text encoder and tokenizer of a pipeline folder (PixArt's: text_encoder/ + tokenizer/), of a folder
    holding both, or of a hub id; T5 configs load as T5EncoderModel, others through AutoModel."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

    enc_path, enc_sub, tok_path, tok_sub = _parts(str(path))
    try:
        config = AutoConfig.from_pretrained(enc_path, subfolder=enc_sub or "")
        cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        with _quiet_loading():
            model = cls.from_pretrained(enc_path, subfolder=enc_sub or "", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, subfolder=tok_sub or "")
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--text-encoder {path}: cannot load a text encoder and tokenizer "
                          f"({first_line(e)})") from None
    return TextEncoder(tokenizer, model.to(device).requires_grad_(False), max_length, str(path))


SD3_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
SD3_MAX_LENGTH = 256  # T5 tokens of SD3's pipeline


class SD3TextEncoders:
    """SD3's three text encoders, encoding as diffusers' `StableDiffusion3Pipeline.encode_prompt` does: each CLIP's
    penultimate hidden states, side by side and zero-padded to the T5 width, followed by the T5 tokens (zeros when
    the T5 is left out), make the joint sequence "embeds" (B, clip_tokens + max_length, width); the two CLIPs'
    projected pooled outputs side by side make "pooled" (B, P). Prompts are used as given (CLIP's tokenizer
    lower-cases on its own)."""

    def __init__(self, clips, t5=None, max_length: int = SD3_MAX_LENGTH, joint_width: int = 4096, source: str = ""):
        if len(clips) != 2:
            raise ConfigError(f"SD3 encodes with two CLIP text encoders, got {len(clips)}")
        if max_length < 1:
            raise ConfigError(f"text max_length must be positive, got {max_length}")
        self.clips = [(tok, model.eval()) for tok, model in clips]
        self.t5 = None if t5 is None else (t5[0], t5[1].eval())
        self.max_length, self.source = max_length, source
        self.width = int(t5[1].config.d_model) if t5 is not None else joint_width
        self.pooled_width = sum(int(m.config.projection_dim) for _, m in self.clips)

    @property
    def model(self) -> torch.nn.Module:  # what `to(device)` moves: every encoder
        return torch.nn.ModuleList([m for _, m in self.clips] + ([self.t5[1]] if self.t5 else []))

    @property
    def device(self) -> torch.device:
        return next(self.clips[0][1].parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{"embeds": the joint sequence (B, 77 + max_length, width) float32, "pooled": (B, P) float32}."""
        texts, states, pooled = [str(p) for p in prompts], [], []
        for tokenizer, model in self.clips:
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = model(ids, output_hidden_states=True)
            pooled.append(out[0].float())
            states.append(out.hidden_states[-2].float())
        clip = torch.cat(states, dim=-1)
        if self.t5 is None:
            t5 = torch.zeros(len(texts), self.max_length, self.width, device=self.device)
        else:
            tokenizer, model = self.t5
            ids = tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = model(ids)[0].float()
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        return {"embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def check_fits(self, config, where: str) -> None:
        """A ConfigError when these encoders' outputs do not fit an SD3 transformer."""
        if (self.width, self.pooled_width) != (config.joint_attention_dim, config.pooled_projection_dim):
            raise ConfigError(f"text encoders {self.source}: give {self.width}-wide tokens and {self.pooled_width}-wide "
                              f"pooled vectors, but {where} takes joint_attention_dim {config.joint_attention_dim} and "
                              f"pooled_projection_dim {config.pooled_projection_dim}")


def load_sd3_text_encoders(path: str, max_length: int = SD3_MAX_LENGTH, device="cpu",
                           dtype: torch.dtype = torch.float32, with_t5: bool = True) -> SD3TextEncoders:
    """The text encoders and tokenizers of an SD3 pipeline folder or id (text_encoder/, text_encoder_2/ and, unless
    `with_t5` is False or it is absent from a local folder, text_encoder_3/ with their tokenizers)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    path = str(path)
    parts = []
    for i, (enc, tok) in enumerate(SD3_PARTS):
        if i == 2 and (not with_t5 or (os.path.isdir(path) and not os.path.isdir(os.path.join(path, enc)))):
            break
        try:
            cls = T5EncoderModel if i == 2 else CLIPTextModelWithProjection
            with _quiet_loading():
                model = cls.from_pretrained(path, subfolder=enc, torch_dtype=dtype).to(device).requires_grad_(False)
            parts.append((AutoTokenizer.from_pretrained(path, subfolder=tok), model))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--text-encoder {path}: cannot load {enc}/ and {tok}/ "
                              f"({first_line(e)})") from None
    return SD3TextEncoders(parts[:2], parts[2] if len(parts) == 3 else None, max_length, source=path)


@dataclass
class TextCondition:
    """A batch's token fields with the empty prompt's, which replace them where a caption is dropped
    (classifier-free guidance, as PixArt trains), and PixArt-alpha's micro-conditions when the model has them."""

    tokens: Dict[str, torch.Tensor]  # {"embeds": (B, T, D), "mask": (B, T)} or {"embeds", "pooled": (B, P)}
    null: Dict[str, torch.Tensor]  # the empty prompt's fields, without the batch dimension
    micro: Optional[Dict[str, torch.Tensor]] = None  # {"resolution": (B, 2), "aspect_ratio": (B, 1)}

    def __len__(self) -> int:
        return len(self.tokens["embeds"])

    def __getitem__(self, rows: slice) -> "TextCondition":
        micro = None if self.micro is None else {k: v[rows] for k, v in self.micro.items()}
        return TextCondition({k: v[rows] for k, v in self.tokens.items()}, self.null, micro)

    def to(self, device) -> "TextCondition":
        micro = None if self.micro is None else {k: v.to(device) for k, v in self.micro.items()}
        return TextCondition({k: v.to(device) for k, v in self.tokens.items()},
                             {k: v.to(device) for k, v in self.null.items()}, micro)

    def model_kwargs(self, drop: Optional[torch.Tensor] = None) -> Dict:
        """The transformer's text arguments; rows where `drop` (B,) is True see the empty prompt instead."""
        out = {}
        for name, value in self.tokens.items():
            if drop is not None:
                rows = drop.view(-1, *[1] * (value.ndim - 1))
                value = torch.where(rows, self.null[name].to(value.dtype)[None], value)
            out[ARGUMENTS[name]] = value
        if "mask" in self.tokens:  # PixArt
            out["added_cond_kwargs"] = self.micro or {"resolution": None, "aspect_ratio": None}
        return out


def read_prompts(path: str) -> List[str]:
    """Prompts of a text file, one per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read prompts ({getattr(e, 'strerror', None) or e})") from None
    if not prompts:
        raise DataError(f"{path}: holds no prompts (one per line)")
    return prompts
