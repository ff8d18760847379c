"""Checkpoint readers: the only module that knows file formats.

Every reader returns a `SourceCheckpoint` whose state dict uses the key names of its model class,
`LEDiTTransformer2DModel` for DiTs (facebookresearch DiT's names, minus `pos_embed`) or
`LEDiTPixArtTransformer2DModel` for PixArt (diffusers' names), and whose config reproduces the source
model's own numerics.
"""
import argparse
import inspect
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError, first_line
from ..models.dit import LEDiTTransformer2DModel, sincos_position_table
from ..models.pixart import LEDiTPixArtTransformer2DModel, default_interpolation_scale
from ..models.sd3 import LEDiTSD3Transformer2DModel

# facebookresearch DiT: heads cannot be read from the weights, so they come from the named configs.
DIT_HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}
DIT_NAMES = {(28, 1152): "XL", (24, 1024): "L", (12, 768): "B", (12, 384): "S"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# PixArt-alpha's hub folders still say Transformer2DModel; norm_type "ada_norm_single" tells them apart from DiT
DIFFUSERS_PIXART_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
DIFFUSERS_SD3_CLASSES = ("SD3Transformer2DModel",)
MODEL_CLASSES = {"dit": LEDiTTransformer2DModel, "pixart": LEDiTPixArtTransformer2DModel,
                 "sd3": LEDiTSD3Transformer2DModel}  # by family
LEDIT_CLASS_NAMES = {cls.__name__: family for family, cls in MODEL_CLASSES.items()}  # config.json _class_name
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class SourceCheckpoint:
    """A DiT or LEDiT read from disk, in this project's key names."""

    path: Path
    format: str  # "facebook-state-dict", "facebook-train-checkpoint", "facebook-safetensors", "diffusers",
    #              "diffusers-pixart", "diffusers-sd3", "ledit"
    config: Dict  # init kwargs of the family's model class (MODEL_CLASSES)
    state_dict: Dict[str, torch.Tensor]
    weights_file: Optional[Path] = None  # the file holding the tensors (hashed for provenance)
    notes: List[str] = field(default_factory=list)
    family: str = "dit"  # "dit" (class-conditional), "pixart" or "sd3" (text-to-image)

    @property
    def width(self) -> int:
        """Token width D."""
        c = self.config
        return c["hidden_size"] if self.family == "dit" else c["num_attention_heads"] * c["attention_head_dim"]

    @property
    def variant(self) -> str:
        """Variant name such as "DiT-XL/2" or "PixArt-XL/2", or "custom"."""
        if self.family == "sd3":
            return f"MMDiT-{self.config['num_layers']}x{self.width}/{self.config['patch_size']}"
        name = DIT_NAMES.get((self.config["num_layers"], self.width))
        prefix = "DiT" if self.family == "dit" else "PixArt"
        return f"{prefix}-{name}/{self.config['patch_size']}" if name else "custom"

    @property
    def num_parameters(self) -> int:
        """Parameter count of the tensors read."""
        return sum(t.numel() for t in self.state_dict.values())


def _fail(path, problem: str):
    raise CheckpointError(f"{path}: {problem}")


#################################################################################
#                              Opening files safely                             #
#################################################################################

def torch_load_safely(path: Path):
    """torch.load with weights_only=True (argparse.Namespace allow-listed); never runs code from the file."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+ ?[\w.]*)", str(e)) or re.search(r"Unsupported global: ([^\s]+)", str(e))
        what = f" ({found.group(1).strip()})" if found else ""
        _fail(path, f"refused to unpickle: it references code or objects that are not tensors{what}")
    except (EOFError, zipfile.BadZipFile) as e:
        _fail(path, f"truncated or corrupt checkpoint ({type(e).__name__})")
    except Exception as e:  # torch raises many types for files that are not checkpoints
        msg = first_line(e)
        if "central directory" in msg or "zip archive" in msg:
            _fail(path, "truncated or corrupt checkpoint (its zip archive is incomplete)")
        _fail(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {msg[:120]})")


def load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """Read a .safetensors file, reporting a bad header as a CheckpointError."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for bad headers
        _fail(path, f"not a readable safetensors file ({first_line(e, 160)})")


def _tensor_dict(obj, path) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        _fail(path, f"expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        _fail(path, f"entry {bad[0]!r} is not a named tensor")
    return dict(obj)


#################################################################################
#                       facebookresearch DiT (.pt / .safetensors)               #
#################################################################################

def _facebook_config(sd, path, num_heads: Optional[int], image_size: Optional[int], notes: List[str]) -> Dict:
    """Infer a DiT config from tensor shapes."""
    for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight",
                "t_embedder.mlp.0.weight"):
        if key not in sd:
            _fail(path, f"not a DiT state dict: missing {key!r}")
    w = sd["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        _fail(path, f"x_embedder.proj.weight has shape {tuple(w.shape)}, expected (D, C, p, p)")
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if depth == 0:
        _fail(path, "not a DiT state dict: no blocks.* tensors")
    out_rows = sd["final_layer.linear.weight"].shape[0]
    if out_rows % (patch * patch):
        _fail(path, f"final_layer.linear has {out_rows} rows, not a multiple of patch^2 = {patch * patch}")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        _fail(path, "not a DiT state dict: missing 'blocks.0.mlp.fc1.weight'")
    if num_heads is None:
        num_heads = DIT_HEADS_BY_WIDTH.get(hidden)
        if num_heads is None:
            _fail(path, f"hidden size {hidden} is not a standard DiT width; pass --num-heads")
    if "pos_embed" in sd:
        tokens = sd["pos_embed"].shape[-2]
        grid = int(round(tokens ** 0.5))
        if grid * grid != tokens:
            _fail(path, f"pos_embed has {tokens} tokens, not a square grid")
        sample_size = grid * patch
        if image_size is not None and image_size // 8 != sample_size:
            _fail(path, f"--image-size {image_size} disagrees with pos_embed ({grid}x{grid} tokens = {sample_size * 8} px)")
        table = sincos_position_table(hidden, grid, grid, grid, grid).float()
        err = (sd["pos_embed"].reshape(tokens, hidden).float() - table).abs().max().item()
        notes.append("pos_embed: the standard 2D sin/cos table" if err < 1e-5 else
                     f"pos_embed: NOT the standard sin/cos table (max abs diff {err:.3g})")
    elif image_size is not None:
        sample_size = image_size // 8
    else:
        _fail(path, "no pos_embed to read the training grid from; pass --image-size (pixels, VAE factor 8)")
    return dict(
        sample_size=sample_size, patch_size=patch, in_channels=in_ch, out_channels=out_rows // (patch * patch),
        hidden_size=hidden, num_layers=depth, num_attention_heads=num_heads, mlp_ratio=fc1.shape[0] / hidden,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, position_encoding="sincos",
        position_mode="extrapolate", attention_layout=["self"] * depth, attention_scaling="none", locality="none",
        timestep_freq_shift=0, norm_eps=1e-6, mlp_norm_eps=1e-6,
    )


def read_facebook(path: Path, weights: str = "ema", num_heads=None, image_size=None) -> SourceCheckpoint:
    """A facebookresearch DiT: released raw state dict, train.py checkpoint dict, or safetensors."""
    notes: List[str] = []
    if path.suffix == ".safetensors":
        sd, fmt = load_safetensors(path), "facebook-safetensors"
    else:
        obj = torch_load_safely(path)
        if isinstance(obj, dict) and "model" in obj and isinstance(obj.get("model"), dict):
            if weights not in ("ema", "model"):
                _fail(path, f"--weights must be 'ema' or 'model', got {weights!r}")
            if weights not in obj:
                _fail(path, f"training checkpoint has no {weights!r} weights (keys: {sorted(obj)})")
            sd, fmt = obj[weights], "facebook-train-checkpoint"
            notes.append(f"training checkpoint: took the {weights!r} weights")
        else:
            sd, fmt = obj, "facebook-state-dict"
    sd = _tensor_dict(sd, path)
    if all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("stripped the DDP 'module.' prefix from every key")
    config = _facebook_config(sd, path, num_heads, image_size, notes)
    sd.pop("pos_embed", None)
    check_against_model(sd, config, path)
    return SourceCheckpoint(path, fmt, config, sd, weights_file=path, notes=notes)


#################################################################################
#                       diffusers DiTTransformer2DModel folders                 #
#################################################################################

def _read_weight_folder(folder: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Path]]:
    """Tensors of a diffusers model folder (single file or sharded), and the single file that holds them (None
    when sharded), for the provenance hash."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        sd = {}
        for shard in _shard_files(index):
            sd.update(load_safetensors(shard))
        return sd, None
    if (folder / WEIGHT_FILES[0]).exists():
        return load_safetensors(folder / WEIGHT_FILES[0]), folder / WEIGHT_FILES[0]
    if (folder / WEIGHT_FILES[1]).exists():
        return _tensor_dict(torch_load_safely(folder / WEIGHT_FILES[1]), folder / WEIGHT_FILES[1]), \
            folder / WEIGHT_FILES[1]
    _fail(folder, f"no weights file ({' or '.join(WEIGHT_FILES)})")


def _shard_files(index: Path) -> List[Path]:
    """The shard files a sharded checkpoint's index names, each checked to exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        _fail(index, "no weight_map of tensor names to shard files")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            _fail(index, f"names the shard {shard.name}, which is missing")
    return shards


def _diffusers_to_ours(d: Dict[str, torch.Tensor], depth: int, path) -> Dict[str, torch.Tensor]:
    """Explicit key map from diffusers' DiT names to DiT's; checks the per-block embedder copies agree."""
    sd, used = {}, set()

    def take(src, dst):
        if src not in d:
            _fail(path, f"missing tensor {src!r}")
        sd[dst] = d[src]
        used.add(src)

    take("pos_embed.proj.weight", "x_embedder.proj.weight")
    take("pos_embed.proj.bias", "x_embedder.proj.bias")
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2"}
    for src, dst in shared.items():
        for kind in ("weight", "bias"):
            take(f"{emb.format(0)}{src}.{kind}", f"{dst}.{kind}")
    take(f"{emb.format(0)}class_embedder.embedding_table.weight", "y_embedder.embedding_table.weight")
    for i in range(1, depth):  # diffusers keeps a copy of the embedders in every block; they must agree
        for suffix in [f"{s}.{k}" for s in shared for k in ("weight", "bias")] + ["class_embedder.embedding_table.weight"]:
            key = f"{emb.format(i)}{suffix}"
            if key in d:
                used.add(key)
                if not torch.equal(d[key], d[f"{emb.format(0)}{suffix}"]):
                    _fail(path, f"block {i}'s copy of the embedder ({suffix}) differs from block 0's; "
                                "this model has per-block embedders and one shared embedder cannot reproduce it")
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [b + f"attn1.to_{n}.{kind}" for n in "qkv"]
            for key in qkv:
                if key not in d:
                    _fail(path, f"missing tensor {key!r}")
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([d[k] for k in qkv], dim=0)  # rows q; k; v
            used.update(qkv)
            take(b + f"norm1.linear.{kind}", f"blocks.{i}.adaLN_modulation.1.{kind}")
            take(b + f"attn1.to_out.0.{kind}", f"blocks.{i}.attn.proj.{kind}")
            take(b + f"ff.net.0.proj.{kind}", f"blocks.{i}.mlp.fc1.{kind}")
            take(b + f"ff.net.2.{kind}", f"blocks.{i}.mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        take(f"proj_out_1.{kind}", f"final_layer.adaLN_modulation.1.{kind}")
        take(f"proj_out_2.{kind}", f"final_layer.linear.{kind}")
    extra = sorted(set(d) - used)
    if extra:
        _fail(path, f"{len(extra)} unexpected tensor(s) for a DiT, e.g. {extra[0]!r}")
    return sd


def read_diffusers(folder: Path) -> SourceCheckpoint:
    """A diffusers DiTTransformer2DModel, PixArtTransformer2DModel or SD3Transformer2DModel folder, or a DiT, PixArt or
    SD3 pipeline folder (its transformer/)."""
    folder = transformer_folder(folder)
    cfg = read_json(folder / "config.json")
    if cfg.get("_class_name") in DIFFUSERS_PIXART_CLASSES and cfg.get("norm_type") == "ada_norm_single":
        return read_pixart(folder, cfg)
    if cfg.get("_class_name") in DIFFUSERS_SD3_CLASSES:
        return read_sd3(folder, cfg)
    if cfg.get("_class_name") not in DIFFUSERS_DIT_CLASSES:
        _fail(folder, f"config.json describes {cfg.get('_class_name')!r}, not a DiT, PixArt or SD3 transformer")
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or cfg.get("patch_size") is None:
        _fail(folder, "only class-conditional DiTs (norm_type 'ada_norm_zero' with a patch_size) are supported")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        _fail(folder, f"activation_fn {cfg.get('activation_fn')!r} is not DiT's tanh GELU")
    if cfg.get("norm_elementwise_affine", False):
        _fail(folder, "norm_elementwise_affine=True has LayerNorm weights that DiT does not have")
    heads, head_dim, depth = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72), cfg.get("num_layers", 28)
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    weights, weights_file = _read_weight_folder(folder)
    sd = _diffusers_to_ours(weights, depth, folder)
    hidden = heads * head_dim
    config = dict(
        sample_size=cfg.get("sample_size", 32), patch_size=cfg["patch_size"], in_channels=in_ch, out_channels=out_ch,
        hidden_size=hidden, num_layers=depth, num_attention_heads=heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=cfg.get("num_embeds_ada_norm", 1000),
        position_encoding="sincos", position_mode="interpolate", attention_layout=["self"] * depth, attention_scaling="none",
        locality="none", timestep_freq_shift=1, norm_eps=1e-6, mlp_norm_eps=cfg.get("norm_eps", 1e-5),
    )
    check_against_model(sd, config, folder)
    notes = ["diffusers numerics kept: timestep features divide by (half - 1), pre-MLP LayerNorm eps "
             f"{config['mlp_norm_eps']:g}, sin/cos table interpolated at new sizes"]
    return SourceCheckpoint(folder, "diffusers", config, sd, weights_file=weights_file, notes=notes)


def read_pixart(folder: Path, cfg: Dict) -> SourceCheckpoint:
    """A diffusers PixArt-alpha/Sigma transformer folder: diffusers' key names are ours, every tensor as stored."""
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        _fail(folder, f"activation_fn {cfg.get('activation_fn')!r} is not PixArt's tanh GELU")
    if cfg.get("attention_type", "default") != "default":
        _fail(folder, f"attention_type {cfg.get('attention_type')!r} is not supported (only 'default')")
    keys = [k for k in inspect.signature(LEDiTPixArtTransformer2DModel.__init__).parameters if k != "self"]
    config = {k: cfg[k] for k in keys if k in cfg}  # diffusers' own keys; the legacy Transformer2DModel extras go
    config.update(position_encoding="sincos", attention_layout=["self"] * config.get("num_layers", 28),
                  attention_scaling="none", locality="none")
    sd, weights_file = _read_weight_folder(folder)
    check_against_model(sd, config, folder, family="pixart")
    notes = ["PixArt's sin/cos table is not stored: it is recomputed per grid (interpolation_scale "
             f"{cfg.get('interpolation_scale') or default_interpolation_scale(cfg.get('sample_size', 128))})"]
    return SourceCheckpoint(folder, "diffusers-pixart", config, sd, weights_file=weights_file, notes=notes,
                            family="pixart")


def read_sd3(folder: Path, cfg: Dict) -> SourceCheckpoint:
    """A diffusers SD3 / SD3.5 transformer folder: diffusers' key names are ours, every tensor as stored (its sin/cos
    table, cropped per size, included)."""
    keys = [k for k in inspect.signature(LEDiTSD3Transformer2DModel.__init__).parameters if k != "self"]
    config = {k: cfg[k] for k in keys if k in cfg}
    if cfg.get("pos_embed_max_size") is None:
        _fail(folder, "an SD3 transformer without pos_embed_max_size has no stored table to read")
    config.update(dual_attention_layers=list(config.get("dual_attention_layers") or ()), position_encoding="sincos",
                  attention_layout=["self"] * config.get("num_layers", 18), attention_scaling="none", locality="none")
    sd, weights_file = _read_weight_folder(folder)
    check_against_model(sd, config, folder, family="sd3")
    dual = config["dual_attention_layers"]
    notes = [f"SD3's stored table covers {cfg['pos_embed_max_size']} x {cfg['pos_embed_max_size']} patches"
             + (f"; blocks {dual} add SD3.5's image-only attention" if dual else "")]
    return SourceCheckpoint(folder, "diffusers-sd3", config, sd, weights_file=weights_file, notes=notes, family="sd3")


def read_ledit(folder: Path) -> SourceCheckpoint:
    """A folder written by this tool (surgery or fine-tuning)."""
    cfg = read_json(folder / "config.json")
    family = LEDIT_CLASS_NAMES.get(cfg.get("_class_name"), "dit")
    config = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "auto_map"}
    sd, weights_file = _read_weight_folder(folder)
    check_against_model(sd, config, folder, family=family)
    return SourceCheckpoint(folder, "ledit", config, sd, weights_file=weights_file, family=family)


#################################################################################
#                                  Entry points                                 #
#################################################################################

def read_json(path, error: type = CheckpointError) -> Dict:
    """A JSON object file; a missing, unreadable, truncated or non-object file raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path.parent}: no {path.name}" + (": not a model folder" if path.name == "config.json" else ""))
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON, truncated or damaged ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: holds a JSON {type(value).__name__}, expected an object")
    return value


def transformer_folder(folder: Path) -> Path:
    """A pipeline folder's transformer/ (refused when it has none), else the folder itself."""
    if not (folder / "model_index.json").is_file():
        return folder
    if not (folder / "transformer").is_dir():
        _fail(folder, "a pipeline folder (model_index.json) without transformer/")
    return folder / "transformer"


def load_pretrained(cls, folder, **kwargs):
    """`cls.from_pretrained(folder)`, a diffusers model; weights or a config it cannot read raise a CheckpointError
    naming the folder."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # diffusers raises OSError, ValueError, RuntimeError, safetensors' own type...
        raise CheckpointError(f"{folder}: cannot load the {cls.__name__} ({first_line(e)})") from None


def check_against_model(sd: Dict[str, torch.Tensor], config: Dict, path, family: str = "dit") -> None:
    """Keys and shapes must be exactly those of the model the config describes (of the family's class)."""
    try:
        with torch.device("meta"):
            model = MODEL_CLASSES[family](**config)
    except (TypeError, ValueError) as e:
        _fail(path, f"inconsistent model settings ({e})")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing:
        _fail(path, f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    if extra:
        _fail(path, f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            _fail(path, f"tensor {k!r} has shape {tuple(sd[k].shape)}, expected {shape}")
        if not sd[k].is_floating_point():
            _fail(path, f"tensor {k!r} has dtype {sd[k].dtype}, expected floating point")


def resolve_path(source: str) -> Path:
    """A local path as is; a hub id downloaded where the network allows."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "transformer/*", "*.md"]))
        except Exception as e:
            raise CheckpointError(f"{source}: not a local path, and the hub could not provide it "
                                  f"({type(e).__name__})") from e
    raise CheckpointError(f"{source}: no such file or folder")


def read_checkpoint(source: str, weights: str = "ema", num_heads: Optional[int] = None,
                    image_size: Optional[int] = None) -> SourceCheckpoint:
    """Read any supported DiT/LEDiT checkpoint by path (or hub id)."""
    path = resolve_path(source)
    if path.is_dir():
        cfg_path = path / "config.json"
        if cfg_path.exists() and read_json(cfg_path).get("_class_name") in LEDIT_CLASS_NAMES:
            return read_ledit(path)
        if (path / "model_index.json").exists() or cfg_path.exists():
            return read_diffusers(path)
        _fail(path, "folder holds neither config.json nor model_index.json: not a model folder")
    if path.stat().st_size == 0:
        _fail(path, "empty file")
    return read_facebook(path, weights=weights, num_heads=num_heads, image_size=image_size)


def build_model(ckpt: SourceCheckpoint):
    """Instantiate the model a checkpoint describes (its family's class) with its weights loaded exactly."""
    with torch.device("meta"):
        model = MODEL_CLASSES[ckpt.family](**ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    return model.float().eval()


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def describe(ckpt: SourceCheckpoint) -> Dict:
    """A plain summary of a checkpoint for `inspect` and the surgery report."""
    c = ckpt.config
    layout = c.get("attention_layout") or ["self"] * c["num_layers"]
    if ckpt.family == "dit":
        condition = {"num_classes": c["num_classes"]}
    elif ckpt.family == "sd3":
        condition = {"joint_attention_dim": c.get("joint_attention_dim"),
                     "dual_attention_layers": list(c.get("dual_attention_layers") or []),
                     "causal_text": c.get("causal_text", "all")}
    else:  # the defaults are diffusers' PixArt ones
        micro = c.get("use_additional_conditions")
        condition = {"caption_channels": c.get("caption_channels"),
                     "micro_conditions": c.get("sample_size", 128) == 128 if micro is None else micro}
    out_channels = c.get("out_channels") or c["in_channels"]
    return {
        "path": str(ckpt.path), "format": ckpt.format, "variant": ckpt.variant,
        "parameters": ckpt.num_parameters, "hidden_size": ckpt.width, "layers": c["num_layers"],
        "heads": c["num_attention_heads"], "patch_size": c["patch_size"], "sample_size": c["sample_size"],
        "in_channels": c["in_channels"], "out_channels": out_channels, **condition,
        "learn_sigma": out_channels == 2 * c["in_channels"],
        "position_encoding": c.get("position_encoding", "none"),
        "causal_blocks": [i for i, k in enumerate(layout) if k == "causal"],
        "causal_scan": c.get("causal_scan", "mask_lower_right_corner"),
        "locality": c.get("locality", "none"), "notes": list(ckpt.notes),
    }


__all__ = ["SourceCheckpoint", "read_checkpoint", "build_model", "describe", "sha256_of", "torch_load_safely",
           "check_against_model", "resolve_path", "read_json", "load_pretrained", "transformer_folder",
           "DIT_HEADS_BY_WIDTH", "MODEL_CLASSES"]
