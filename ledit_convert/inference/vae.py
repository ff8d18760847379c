"""The VAE a transformer decodes through: found by folder, pipeline folder or hub id, checked against the
transformer from its config alone, then loaded (kept in float32)."""
import os
from typing import Dict, Optional, Tuple

from diffusers import AutoencoderKL

from ..errors import CheckpointError, ConfigError, first_line


def vae_location(vae: str) -> Tuple[str, str]:
    """(path, subfolder) of a VAE named by its own folder or id, or by a pipeline (a local folder holding vae/, or
    a hub id whose root has no VAE config)."""
    vae = str(vae)
    if os.path.isdir(vae):
        own = os.path.isfile(os.path.join(vae, "config.json"))
        return (vae, "") if own or not os.path.isfile(os.path.join(vae, "vae", "config.json")) else (vae, "vae")
    try:
        AutoencoderKL.load_config(vae)
        return vae, ""
    except (OSError, ValueError):
        return vae, "vae"


def vae_config(vae: str, error: type = CheckpointError) -> Dict:
    """The config of a VAE (folder, pipeline folder or hub id), read without its weights; an unreadable one raises
    `error`."""
    try:
        path, sub = vae_location(vae)
        config = AutoencoderKL.load_config(path, subfolder=sub or None)
    except (OSError, ValueError) as e:
        raise error(f"--vae {vae}: cannot read its config ({first_line(e)})") from None
    if not isinstance(config.get("block_out_channels"), (list, tuple)) or not config["block_out_channels"]:
        raise error(f"--vae {vae}: its config has no block_out_channels; not an AutoencoderKL")
    return config


def vae_scale_factor(vae: Optional[str], error: type = CheckpointError) -> int:
    """Pixels per latent cell of a VAE (folder or hub id), from its config alone; 1 without one (pixel space).
    An unreadable config raises `error`."""
    if vae is None:
        return 1
    return 2 ** (len(vae_config(vae, error)["block_out_channels"]) - 1)


def check_vae_fits(vae: Optional[str], model_config, family: str, where: str, error: type = ConfigError) -> None:
    """Refuse, from configs alone, a VAE whose latents a transformer (`model_config`, of a "dit", "pixart" or "sd3"
    model named `where`) cannot take: other latent channels, or for SD3 no shift_factor to shift them by."""
    if vae is None:
        return
    config = vae_config(vae, error)
    latent, channels = config.get("latent_channels", 4), model_config["in_channels"]
    if latent != channels:
        raise error(f"--vae {vae}: gives {latent}-channel latents, but {where} takes in_channels {channels}")
    if family == "sd3" and config.get("shift_factor") is None:
        raise error(f"--vae {vae}: has no shift_factor, which SD3 shifts its latents by; use the VAE of the SD3 "
                    f"pipeline the model came from")


def assemble_vae(vae_path: Optional[str], error: type = CheckpointError) -> Optional[AutoencoderKL]:
    """The AutoencoderKL of a folder, pipeline folder or id (float32), or None in pixel space; a VAE that does not
    load raises `error` naming it."""
    if vae_path is None:
        return None
    try:
        path, sub = vae_location(vae_path)
        return AutoencoderKL.from_pretrained(path, subfolder=sub or None)
    except Exception as e:  # diffusers raises OSError, ValueError, RuntimeError, safetensors' own type...
        raise error(f"--vae {vae_path}: cannot load an AutoencoderKL ({first_line(e)})") from None
