"""FSDP2 for the fine-tuning loop: sharded parameters, gradients, AdamW state and EMA, checkpoints and export.

    mesh = device_mesh(device, world)
    sync_adapters(model, device)                                  # LoRA: process 0's random init everywhere
    shard_model(model, mesh, "bf16", reshard_after_forward=True)  # in place, before the optimizer is built
    ema = sharded_ema(model)                                      # {name: DTensor}, fp32, beside the parameters
    save_sharded(folder, model, optimizer, ema)                   # torch.distributed.checkpoint; load_sharded
    state = gather_to_main(model, ema, is_main)                   # the EMA model, one tensor at a time

Layout. Every transformer block (the model's `_repeated_blocks` classes) is one FSDP group; the root group holds
the rest: patch embedding, locality conv, timestep/label/text embedders and the output head. Those are small and run
at the start and end of every forward, so gathering them once per step costs less than a group each.

Mixed precision. Under bf16 the gathered weights are bf16 (half the all-gather traffic and memory) and gradients are
reduce-scattered in fp32: a sum over many processes in bf16 would lose the bits the fp32 shards and AdamW keep.
Forward inputs are not cast (`cast_forward_inputs=False`): the loop's autocast does the op-level casting it does for
DDP, so a timestep stays fp32 into the sinusoidal features and the two strategies round the same weights the same way.

Two ways in. `accelerate launch` with an FSDP2 config (recipes/accelerate/) puts accelerate in FSDP mode, and a model
already sharded passes through its `prepare` untouched; accelerate does not enable FSDP on CPU-only runs, so there
(and under plain torchrun) the loop shards with `fully_shard` directly. Either way the model is sharded here, by the
same function, so both paths train, save and export identically.

Checkpoints hold tensors only (model, AdamW moments and step, EMA) and are read back through an allow-list
unpickler: torch.distributed.checkpoint stores its metadata as a pickle, and a checkpoint folder must never be able
to run code (the weights_only rule every other checkpoint here follows).
"""
import io
import pickle
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import CheckpointError, ConfigError, first_line
from ..models.compiling import repeated_blocks

SHARDED_FOLDER = "sharded"  # inside a checkpoint folder: the DCP files (.metadata, one __<rank>_0.distcp each)
PRECISIONS = {"no": None, "bf16": torch.bfloat16}  # recipe.mixed_precision -> gathered weight dtype (fp16: refused)


#################################################################################
#                                   Sharding                                    #
#################################################################################

def device_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """A 1-D mesh over every process: each parameter is split world_size ways (ZeRO-3), across nodes too."""
    return init_device_mesh(device.type, (world_size,))


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 gathered weights with fp32 gradient reduction, or fp32 throughout (see the module docstring)."""
    param_dtype = PRECISIONS[mixed_precision]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                cast_forward_inputs=False)


@torch.no_grad()
def sync_adapters(model: torch.nn.Module, device: torch.device) -> int:
    """Give every process the main process's LoRA adapters (peft's `lora_` parameters); returns how many there are.

    Everything else is read from the same model folder on every process, but peft initialises the adapters from
    each process's own RNG. DDP copies process 0's module state to the others when it wraps a model; sharding does
    not, and shards of differently initialised adapters would make one adapter no process ever drew."""
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    if adapters:
        flat = torch.cat([p.reshape(-1) for p in adapters]).to(device)  # one broadcast (NCCL wants device tensors)
        torch.distributed.broadcast(flat, src=0)
        for p, value in zip(adapters, flat.split([p.numel() for p in adapters])):
            p.copy_(value.view_as(p))
    return len(adapters)


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, mixed_precision: str = "no",
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """`fully_shard` each transformer block, then the root (the model as trained: the peft wrapper under LoRA, so its
    adapters shard with their blocks). In place: the parameters become DTensor shards on the mesh's device; returns
    the model. Activation checkpointing (the model's own, per block) composes: its recompute gathers again."""
    policy = mixed_precision_policy(mixed_precision)
    for block in repeated_blocks(model):  # before any fully_shard: sharding renames the block classes
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root is never resharded after forward (torch's choice for it): its weights are the first the backward needs
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def check_launch(accelerator, recipe) -> None:
    """A ConfigError when the launch and the recipe disagree: an accelerate FSDP config that is version 1, meets a ddp
    recipe (accelerate would shard by its own policy) or asks for what the sharding here leaves to the recipe or does
    not do; or fsdp2 with a single process."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if not accelerator.is_fsdp2:
            raise ConfigError("the accelerate config launches FSDP version 1; ledit-convert shards with FSDP2: set "
                              "fsdp_version: 2 (as recipes/accelerate/fsdp2-8gpu.yaml does)")
        if recipe.distributed != "fsdp2":
            raise ConfigError(f"the accelerate config launches FSDP, but the recipe's distributed is "
                              f"{recipe.distributed!r}; set distributed=fsdp2, or launch with "
                              "recipes/accelerate/ddp-8gpu.yaml")
        if plugin.activation_checkpointing and not recipe.gradient_checkpointing:
            raise ConfigError("the accelerate config sets fsdp_activation_checkpointing, which the recipe decides "
                              "here; set gradient_checkpointing=true and fsdp_activation_checkpointing: false")
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
            raise ConfigError("the accelerate config sets fsdp_offload_params, which ledit-convert's sharding does "
                              "not do; set fsdp_offload_params: false (inspect --memory shows what fits)")
    if recipe.distributed == "fsdp2" and accelerator.num_processes < 2:
        raise ConfigError("distributed fsdp2 shards the model over processes, but this run has one; launch with "
                          "`accelerate launch --config_file recipes/accelerate/fsdp2-8gpu.yaml` (or torchrun), or set "
                          "distributed=ddp")


def prepare_sharded(accelerator, model: torch.nn.Module, optimizer):
    """(model, optimizer) through accelerate: in its FSDP2 mode it takes the sharded model as it is (the groups made
    here stay); in any other mode only the optimizer goes through, since its DDP wrap would replicate the model."""
    if accelerator.is_fsdp2:
        return accelerator.prepare(model, optimizer)
    return model, accelerator.prepare(optimizer)


#################################################################################
#                                      EMA                                      #
#################################################################################

@torch.no_grad()
def sharded_ema(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """An fp32 EMA of each trained parameter, by name, sharded exactly as the parameter is: every process keeps only
    its own slice, and frozen weights (LoRA's base) are not copied at all."""
    return {name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad}


def local_shards(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """This process's slice of each DTensor (a view: writing to it writes the DTensor); other tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


#################################################################################
#                              Sharded checkpoints                              #
#################################################################################

def _optimizer_of(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _training_state(model, optimizer, ema: Dict[str, torch.Tensor]):
    """(what a checkpoint holds, the optimizer's param_groups): the model's and AdamW's state dicts in canonical
    names (torch.distributed.checkpoint.state_dict), with the EMA. AdamW's hyperparameters are left out: the recipe
    sets them, and only tensors are stored."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, _optimizer_of(optimizer))
    return {"model": model_state, "optimizer": optim_state["state"], "ema": ema}, optim_state["param_groups"]


def _tensor_leaves(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensor_leaves(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, tree


def save_sharded(folder: Path, model, optimizer, ema: Dict[str, torch.Tensor]) -> None:
    """Model, AdamW state and EMA into `folder` with torch.distributed.checkpoint; every process calls it and writes
    its own shards. The caller makes the enclosing checkpoint atomic (runstate.partial_dir, finish_checkpoint)."""
    import torch.distributed.checkpoint as dcp
    state, _ = _training_state(model, optimizer, ema)
    stray = [name for name, leaf in _tensor_leaves(state) if not torch.is_tensor(leaf)]
    if stray:  # they would be pickled, and unpickling them is what a checkpoint must never need
        raise TypeError(f"sharded checkpoints hold tensors only; {stray[:3]} are not")
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model, optimizer, ema: Dict[str, torch.Tensor]) -> None:
    """Restore what `save_sharded` wrote into a freshly sharded model, its optimizer and EMA (every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    if not (Path(folder) / ".metadata").is_file():
        raise CheckpointError(f"{folder}: not a sharded checkpoint (no .metadata)")
    TensorsOnlyReader(folder).read_metadata()  # its one-line refusals, before DCP would wrap them in its own
    # the layout to load into: this run's own shards (AdamW's moments are created, as zeros, to be overwritten)
    state, param_groups = _training_state(model, optimizer, ema)
    try:
        dcp.load(state, storage_reader=TensorsOnlyReader(folder))
    except (Exception, dcp.CheckpointException) as e:  # the latter, a BaseException, gathers every process's failure
        cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) and e.failures else e
        what = first_line(cause)  # the type's name alone when the exception has no message
        what = what if what == type(cause).__name__ else f"{type(cause).__name__}: {what}"
        raise CheckpointError(f"{folder}: cannot restore the sharded checkpoint ({what})") from None
    # DCP loaded into the given tensors: the EMA shards are restored in place, the model and AdamW state go in here
    set_state_dict(model, _optimizer_of(optimizer), model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"], "param_groups": param_groups})


# What a DCP metadata pickle may name: its own dataclasses, tensor sizes, dtypes, layouts and the path it was saved to.
_METADATA_NAMES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING")} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                               ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's documented way to restrict globals: DCP's metadata classes and torch dtypes, nothing else."""

    def find_class(self, module, name):
        if (module, name) in _METADATA_NAMES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class TensorsOnlyReader(FileSystemReader):
    """DCP's file reader with the metadata read through `_MetadataUnpickler`. Tensors DCP reads itself with
    torch.load(weights_only=True); any other entry, which it would unpickle without restrictions, is refused
    already here: its BytesStorageMetadata is not on the allow-list."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"  # where FileSystemWriter puts it when the processes save together
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({first_line(e)})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


#################################################################################
#                                    Export                                     #
#################################################################################

@torch.no_grad()
def gather_to_main(model: torch.nn.Module, replace: Dict[str, torch.Tensor], is_main: bool
                   ) -> Optional[Dict[str, torch.Tensor]]:
    """The model's state dict with `replace` (the EMA) in place of the tensors it names, gathered in fp32 onto the
    main process's CPU one tensor at a time; other processes get None. Every process must call it (each gather is
    collective). No process holds more than its shards and one full tensor on the device; the main one also holds
    the single full model being assembled, in host memory."""
    full = model.state_dict()
    unknown = sorted(set(replace) - set(full))
    if unknown:  # the EMA would silently be the trained weights under those names
        raise RuntimeError(f"EMA tensors {unknown[:3]} name no tensor of the sharded model's state dict")
    state = {} if is_main else None
    for name, tensor in full.items():
        tensor = replace.get(name, tensor)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()  # every process joins, in the same (state-dict) order
        if is_main:
            tensor = tensor.detach().cpu()
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state
