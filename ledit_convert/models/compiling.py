"""Regional torch.compile for LEDiT and diffusers DiT transformers, and the way back to eager.

Only the repeated transformer blocks are compiled (PyTorch's "regional compilation"): every block shares one
compiled graph per attention kind, token grid, batch size and grad mode, so a 28-block DiT-XL/2 compiles about
as fast as a 1-block one, and the model's eager prelude (patchify, cached attention masks, the random conv
dilation) stays out of the graphs. Compilation is lazy: a missing C++ toolchain or an unsupported op surfaces
at the first forward (or, for the backward graph, the first backward), where callers catch it
(`is_compile_error`) and call `uncompile_blocks`.
"""
from typing import List

import torch

# torch.compile modes offered. "reduce-overhead" and "max-autotune" both turn on CUDA graphs, which are left out:
# per-block graphs replayed inside an autograd step with gradient accumulation overwrite each other's outputs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Compiled variants kept per block code object before dynamo gives up and runs it eagerly: every attention kind x
# grid x batch size x grad mode is one, across all models in the process (dynamo's default is 8).
RECOMPILE_LIMIT = 64


def repeated_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The transformer blocks of a LEDiT (its `_repeated_blocks` classes) or of a diffusers DiT, found through
    DDP and peft wrappers."""
    for module in model.modules():
        names = getattr(module, "_repeated_blocks", None)
        if names:
            return [m for m in module.modules() if type(m).__name__ in names]
        if isinstance(getattr(module, "transformer_blocks", None), torch.nn.ModuleList):  # diffusers' DiT
            return list(module.transformer_blocks)
    raise ValueError(f"{type(model).__name__} has no transformer blocks to compile")


def compile_blocks(model: torch.nn.Module, mode: str = "default", dynamic: bool = False) -> int:
    """Compile each transformer block in place (`nn.Module.compile`); returns how many were compiled.

    `mode` is one of COMPILE_MODES. `dynamic=False` specialises on the token grid: one compile per resolution,
    the fastest kernels for each.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(mode=None if mode == "default" else mode, dynamic=dynamic)
    return len(blocks)


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo `compile_blocks`: every block runs eagerly again."""
    for block in repeated_blocks(model):
        block._compiled_call_impl = None


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether any transformer block of `model` is compiled."""
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(model))


def is_compile_error(error: BaseException) -> bool:
    """Whether an exception came from torch.compile itself (dynamo tracing, a backend, inductor code generation),
    as opposed to the computation (out of memory, bad shapes), which must not be retried eagerly."""
    from torch._dynamo.exc import TorchDynamoException
    module = type(error).__module__ or ""
    return isinstance(error, TorchDynamoException) or module.startswith(("torch._dynamo", "torch._inductor"))
