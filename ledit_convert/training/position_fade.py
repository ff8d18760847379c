"""Fading the source's positional table out during fine-tuning, instead of cutting it at surgery.

    fade = PositionFade(model, fade_images=4096)   # model: an LEDiT after surgery (no table of its own)
    fade.set_images_seen(step * global_batch)      # before each step: weight = max(0, 1 - images / fade_images)
    with suspended(model): evaluate(model)         # evaluations run without the table

The stock model added its sin/cos table to the patch embedding; surgery removes it, so the first fine-tune steps
see a model whose blocks lose every position cue at once. A fade keeps adding `weight * table` to the patch
embedding's output (before the locality conv, where the stock model added it) while the weight falls linearly
from 1 to 0, so the blocks can learn to replace the table while it goes. The table lives only in the training run:
a forward hook on the patch embedding, never a parameter, buffer or config key, so the EMA, `save_pretrained` and
every exported folder have no table. The weight is a function of the images seen, so a resumed run continues the
fade exactly. It is a device tensor filled in place (the LR's pattern), so a captured CUDA graph reads each new
value.

Each family's table is the one its stock model adds at that grid, from the model class's own `position_table`:
  DiT: the MAE/DiT 2D sin/cos table (DiT's code extrapolates it past the training grid);
  PixArt: diffusers' PatchEmbed table with the model's base grid and interpolation scale;
  SD3: diffusers' table of `pos_embed_max_size` per side, cropped at the centre as SD3's PatchEmbed does. This is
  the table diffusers computes for the config; a checkpoint whose stored table differs from it is not reproduced.
"""
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, Tuple

import torch

from ..errors import ConfigError
from ..models.dit import LEDiTTransformer2DModel
from ..models.pixart import LEDiTPixArtTransformer2DModel
from ..models.sd3 import LEDiTSD3Transformer2DModel

_FADES: "weakref.WeakKeyDictionary[torch.nn.Module, PositionFade]" = weakref.WeakKeyDictionary()


def fade_weight(images_seen: int, fade_images: int) -> float:
    """The table's weight after `images_seen` training images: 1 at the start, 0 from `fade_images` on."""
    return max(0.0, 1.0 - images_seen / fade_images)


def _sd3_table(model: LEDiTSD3Transformer2DModel, height: int, width: int, device) -> torch.Tensor:
    cap = model.config.pos_embed_max_size
    if height > cap or width > cap:
        raise ValueError(f"a {height}x{width} token grid is past SD3's stored table ({cap}x{cap}); the source "
                         "model cannot run there, so there is no table to fade")
    return model.position_table(height, width, device, "extrapolate")


# model class -> (the patch-embedding module's attribute, the stock model's table (1, N, D) for an h x w grid): each
# class's own `position_table` at the scaling its stock model uses
FAMILIES: Dict[type, Tuple[str, Callable]] = {
    LEDiTTransformer2DModel: ("x_embedder", lambda m, h, w, device: m.position_table(h, w, "extrapolate", device,
                                                                                     torch.float32)),
    LEDiTPixArtTransformer2DModel: ("pos_embed", lambda m, h, w, device: m.position_table(h, w, device)),
    LEDiTSD3Transformer2DModel: ("pos_embed", _sd3_table),
}


class PositionFade:
    """A forward hook adding `weight * table` to a model's patch embedding; the weight is set per step."""

    def __init__(self, model: torch.nn.Module, fade_images: int):
        family = next((v for cls, v in FAMILIES.items() if isinstance(model, cls)), None)
        if family is None:
            raise ConfigError(f"position_fade_images: {type(model).__name__} has no source table to fade "
                              f"(families: {', '.join(c.__name__ for c in FAMILIES)})")
        if model.config.position_encoding != "none":
            raise ConfigError("position_fade_images: the model still has its own positional table "
                              f"(position_encoding {model.config.position_encoding!r}); fading is for a model "
                              "whose table surgery removed")
        if fade_images <= 0:
            raise ConfigError(f"position_fade_images {fade_images} must be positive (0 turns the fade off)")
        if model in _FADES:
            raise ValueError("this model already has a position fade")
        attr, table_fn = family
        self._model = weakref.ref(model)  # the hook holds this object: no strong reference back to the model
        self.fade_images, self._table_fn = fade_images, table_fn
        self.patch = model.config.patch_size
        device = next(model.parameters()).device
        self.weight = torch.ones((), dtype=torch.float32, device=device)
        self.active = True
        self._handle = getattr(model, attr).register_forward_hook(self._add_table)
        _FADES[model] = self

    def table(self, height: int, width: int, device, dtype) -> torch.Tensor:
        """The source's table for an h x w token grid, (1, h*w, D), from the model's own (cached) tables."""
        return self._table_fn(self._model(), height, width, device).to(dtype)

    @torch.compiler.disable
    def _add_table(self, module, inputs, out):
        if not self.active:
            return out
        h, w = inputs[0].shape[-2] // self.patch, inputs[0].shape[-1] // self.patch
        return out + self.weight.to(out.dtype) * self.table(h, w, out.device, out.dtype)

    def set_images_seen(self, images_seen: int) -> float:
        """Set the weight for a step that starts after `images_seen` training images; returns it."""
        weight = fade_weight(images_seen, self.fade_images)
        self.weight.fill_(weight)
        return weight

    def remove(self) -> None:
        """Detach the hook: the model is the plain LEDiT again."""
        self._handle.remove()
        model = self._model()
        if model is not None:
            _FADES.pop(model, None)


@contextmanager
def suspended(model: torch.nn.Module):
    """Run `model` (or the peft model wrapping it) without its fading table inside: evaluation sees the model as
    it will be exported."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):  # a PeftModel: the hook is on the base
        model = model.base_model.model
    fade = _FADES.get(model)
    if fade is None or not fade.active:
        yield
        return
    fade.active = False
    try:
        yield
    finally:
        fade.active = True
