"""Writing model folders that reload in plain diffusers: atomically, with their code and provenance."""
import datetime
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch

from .. import __version__
from .checkpoints import MODEL_CLASSES, WEIGHT_FILES
from ..errors import OutputExistsError

WEIGHTS_FILE = WEIGHT_FILES[0]
# diffusers' save_pretrained default ("10GB"): a model past it (SD3.5 Large in fp32: 33 GB) is written as numbered
# shards with an index, which from_pretrained and checkpoints.read_checkpoint both read
MAX_SHARD_BYTES = 10 * 10 ** 9


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Stop before any work when the output exists and --overwrite was not given."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `out` only if the block finishes."""
    out = Path(out)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def model_config_json(config: Dict, family: str = "dit") -> Dict:
    """The config.json diffusers writes for this config of the family's model class (built on the meta device: no
    weights allocated)."""
    with torch.device("meta"):
        model = MODEL_CLASSES[family](**config)
    return json.loads(model.to_json_string())


def cpu_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A module's tensors detached, on the CPU and contiguous, as safetensors writes them."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def init_config(model) -> Dict:
    """A model's config as __init__ keyword arguments (without diffusers' private `_` entries)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def save_weights(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file of contiguous tensors, in the order the model names them."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in state_dict.items()}  # a no-op for tensors that already are
    save_file(tensors, str(path), metadata={"format": "pt"})


def shard_names(state_dict: Dict[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    """Tensor names per weights file, in state-dict order: a file takes tensors until the next would carry it past
    `max_bytes` (a tensor larger than that gets a file of its own), as huggingface_hub's splitter does."""
    files, size = [[]], 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def save_weights_files(state_dict: Dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES
                       ) -> List[str]:
    """The weights as `WEIGHTS_FILE`, or past `max_shard_bytes` as diffusers' shards
    (`diffusion_pytorch_model-00001-of-00004.safetensors`...) and their index; returns the file names."""
    groups = shard_names(state_dict, max_shard_bytes)
    if len(groups) == 1:
        save_weights(state_dict, Path(folder) / WEIGHTS_FILE)
        return [WEIGHTS_FILE]
    stem, suffix = WEIGHTS_FILE.rsplit(".", 1)
    names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{suffix}" for i in range(len(groups))]
    for name, keys in zip(names, groups):  # one file's tensors serialised at a time
        save_weights({k: state_dict[k] for k in keys}, Path(folder) / name)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    weight_map = {k: name for name, keys in zip(names, groups) for k in keys}
    write_json_atomic(Path(folder) / f"{WEIGHTS_FILE}.index.json", {"metadata": {"total_size": total},
                                                                     "weight_map": weight_map})
    return names


def model_card(summary: Dict, changes: List[str], family: str = "dit", target: str = "LEDiT") -> str:
    """A short README.md for the output folder; `target` names what the model became (LEDiT, or DiT-RoPE)."""
    kind, tag = {"dit": ("class-conditional", "dit"), "pixart": ("text-to-image (PixArt)", "pixart"),
                 "sd3": ("text-to-image (SD3 MMDiT)", "sd3")}[family]
    lines = [
        "---", "library_name: diffusers", f"tags: [ledit, {tag}, {kind.split()[0]}, image-generation]", "---", "",
        f"# {summary.get('variant', 'DiT')} converted to {target}",
        "",
        f"A {kind} diffusion transformer converted by ledit-convert "
        f"{__version__} from `{summary.get('path')}` ({summary.get('format')}).",
        "",
        "Changes:",
        *[f"- {c}" for c in changes],
        "",
        ("The locality conv starts at zero: fine-tune" if target == "LEDiT" else
         "Its blocks learned the sin/cos table, not RoPE: fine-tune")
        + (" (`ledit-convert finetune`)" if family == "dit" else "") + " before expecting quality at new resolutions.",
        "",
        "```python",
        "from diffusers import AutoModel",
        "model = AutoModel.from_pretrained('<this folder>', trust_remote_code=True)",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_folder(out: Path, config: Dict, state_dict: Dict[str, torch.Tensor], *, overwrite: bool,
                       provenance: Union[Dict, Callable[[], Dict], None] = None, card: Optional[str] = None,
                       extra_files: Optional[Dict[str, str]] = None, family: str = "dit",
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write config.json, weights, model code, provenance and card into `out`, atomically, for a model of the
    family's class ("dit", "pixart" or "sd3"). `provenance` may be a function, called once the weights are written, so slow
    inputs to it (a source hash) can run alongside. Weights past `max_shard_bytes` are split into indexed shards."""
    out = Path(out)
    config_json = model_config_json(config, family)
    with atomic_folder(out, overwrite) as tmp:
        save_weights_files(state_dict, tmp, max_shard_bytes)
        write_json_atomic(tmp / "config.json", config_json)
        MODEL_CLASSES[family].write_remote_code(tmp)
        if provenance is not None:
            write_json_atomic(tmp / "provenance.json", provenance() if callable(provenance) else provenance)
        if card is not None:
            (tmp / "README.md").write_text(card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def provenance_record(source_path, source_sha256: Optional[str], source_format: str, options: Dict,
                      changes: List[str]) -> Dict:
    """Where a folder came from and how it was made."""
    import diffusers
    return {
        "tool": "ledit-convert", "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(Path(source_path).resolve()), "format": source_format, "sha256": source_sha256},
        "options": options, "changes": changes,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
