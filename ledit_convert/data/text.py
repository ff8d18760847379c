"""Text conditioning for text-to-image transformers: a text encoder with its tokenizer, turning prompts into the
tokens a PixArt cross-attends to and their keep-masks. Caching, training and sampling all encode through
`TextEncoder.encode`, so the tokens a model is trained on are the tokens it is sampled with."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, DataError

DEFAULT_MAX_LENGTH = 300  # PixArt-Sigma's token count (PixArt-alpha trained with 120)


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
    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, max_length, width) float32 and keep-masks (B, max_length) int64 of `prompts`."""
        texts = [str(p).lower().strip() for p in prompts]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self.model(ids, attention_mask=mask)[0]
        return states.float(), mask.long()

    def check_width(self, caption_channels: int, where: str) -> None:
        """A ConfigError when this encoder's tokens do not fit a transformer taking `caption_channels`."""
        if self.width != caption_channels:
            raise ConfigError(f"text encoder {self.source}: gives {self.width}-wide tokens, but {where} takes "
                              f"caption_channels {caption_channels}")


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
        model = cls.from_pretrained(enc_path, subfolder=enc_sub or "", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, subfolder=tok_sub or "")
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--text-encoder {path}: cannot load a text encoder and tokenizer "
                          f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    return TextEncoder(tokenizer, model.to(device).requires_grad_(False), max_length, str(path))


@dataclass
class TextCondition:
    """A batch's text tokens and keep-masks with the empty prompt's, which replace them where a caption is dropped
    (classifier-free guidance, as PixArt trains), and PixArt-alpha's micro-conditions when the model has them."""

    embeds: torch.Tensor  # (B, T, D)
    mask: torch.Tensor  # (B, T), 1 = keep
    null_embeds: torch.Tensor  # (T, D): the empty prompt
    null_mask: torch.Tensor  # (T,)
    micro: Optional[Dict[str, torch.Tensor]] = None  # {"resolution": (B, 2), "aspect_ratio": (B, 1)}

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, rows: slice) -> "TextCondition":
        micro = None if self.micro is None else {k: v[rows] for k, v in self.micro.items()}
        return TextCondition(self.embeds[rows], self.mask[rows], self.null_embeds, self.null_mask, micro)

    def to(self, device) -> "TextCondition":
        micro = None if self.micro is None else {k: v.to(device) for k, v in self.micro.items()}
        return TextCondition(self.embeds.to(device), self.mask.to(device), self.null_embeds.to(device),
                             self.null_mask.to(device), micro)

    def model_kwargs(self, drop: Optional[torch.Tensor] = None) -> Dict:
        """The transformer's text arguments; rows where `drop` (B,) is True see the empty prompt instead."""
        embeds, mask = self.embeds, self.mask
        if drop is not None:
            embeds = torch.where(drop[:, None, None], self.null_embeds.to(embeds.dtype)[None], embeds)
            mask = torch.where(drop[:, None], self.null_mask.to(mask.dtype)[None], mask)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                "added_cond_kwargs": self.micro or {"resolution": None, "aspect_ratio": None}}


def micro_conditions(batch: int, height: int, width: int, device=None) -> Dict[str, torch.Tensor]:
    """PixArt-alpha's micro-conditions for images of height x width pixels: resolution (h, w), aspect ratio h / w."""
    return {"resolution": torch.tensor([[float(height), float(width)]], device=device).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[height / width]], device=device).repeat(batch, 1)}


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
