"""A LoRA fine-tune as diffusers LoRA weights, for the converted folder it started from.

A LoRA fine-tune adapts attention and MLP linears and trains a few modules fully (the locality conv, adaLN, the
final layer). Besides the merged model folder it exports both parts on their own, loadable in plain diffusers onto
the converted folder the fine-tune started from:

    transformer = AutoModel.from_pretrained(converted_folder, trust_remote_code=True)
    transformer.load_state_dict(load_file("lora/trained_modules.safetensors"), strict=False)
    transformer.load_lora_adapter("lora", prefix="transformer", weight_name="pytorch_lora_weights.safetensors")

or, for an SD3, `pipe.load_lora_weights("lora")` on diffusers' StableDiffusion3Pipeline holding that transformer.

The adapters are in diffusers' format (keys `transformer.<module>.lora_A.weight`, the LoRA config as metadata, so
the rank and alpha travel with them); the fully trained tensors keep the model's own keys.
"""
import json
from pathlib import Path
from typing import Dict, Sequence

import torch
from safetensors.torch import save_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' loaders look for
TRAINED_MODULES = "trained_modules.safetensors"
PEFT_PREFIX = "base_model.model."  # what get_peft_model puts before every module name


def _model_key(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def trained_tensors(model: torch.nn.Module, fully_trained: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The fully trained tensors of a LoRA model (names holding one of `fully_trained`, LoRA factors and the frozen
    base layers under them excluded), under the plain model's keys."""
    return {_model_key(name): p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if any(part in name for part in fully_trained) and "lora_" not in name and "base_layer" not in name}


def export_lora(model: torch.nn.Module, out_dir, fully_trained: Sequence[str], adapter_name: str = "default") -> Path:
    """Write `model`'s LoRA adapter `adapter_name` (a peft-wrapped model, or a diffusers model with `add_adapter`) as
    diffusers LoRA weights, and its fully trained tensors (names holding one of `fully_trained`), to `out_dir`."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"model has no LoRA adapter {adapter_name!r} to export")
    trained = trained_tensors(model, fully_trained)
    if not trained:
        raise ValueError(f"no parameter of the model is named by fully_trained {list(fully_trained)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(model, adapter_name=adapter_name)
    lora = {_model_key(name): t.detach().cpu().contiguous() for name, t in adapter.items()}
    # the writer is SD3's pipeline's, but the format (a "transformer." prefix and the config as metadata) is every
    # diffusers LoRA loader's
    config = json.loads(json.dumps(model.peft_config[adapter_name].to_dict(), default=sorted))  # sets -> lists
    StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=lora,
                                               transformer_lora_adapter_metadata=config)
    save_file(trained, str(out / TRAINED_MODULES))
    return out
