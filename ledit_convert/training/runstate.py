"""What a fine-tuning run needs to stop and resume exactly: data order, RNG states, EMA, checkpoints."""
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..data.images import Sample
from ..conversion.checkpoints import read_json
from ..errors import ConfigError

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = re.compile(r"^step_(\d{8})$")


#################################################################################
#                       Data order that survives a restart                       #
#################################################################################

class ResumableSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) keys: a seeded permutation per epoch, sharded by rank, starting anywhere."""

    def __init__(self, num_items: int, seed: int, rank: int = 0, world_size: int = 1, consumed: int = 0):
        if num_items < world_size:
            raise ConfigError(f"the dataset has {num_items} items, fewer than the {world_size} processes")
        self.num_items, self.seed, self.rank, self.world = num_items, seed, rank, world_size
        self.per_rank = num_items // world_size  # drop the remainder so every rank sees as many items
        self.consumed = consumed  # keys this rank has already handed out

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.consumed
        while True:
            epoch, offset = divmod(position, self.per_rank)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_items, generator=g)[: self.per_rank * self.world]
            for index in order[self.rank::self.world][offset:].tolist():
                yield epoch, index
            position = (epoch + 1) * self.per_rank

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2 ** 62


class SeededItems(torch.utils.data.Dataset):
    """Item randomness (flip, latent posterior sample) drawn from (seed, epoch, index): worker- and resume-proof."""

    def __init__(self, dataset, seed: int, random_flip: bool):
        self.dataset, self.seed, self.random_flip = dataset, seed, random_flip
        self.latents = hasattr(dataset, "posterior")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Sample:
        epoch, index = key
        g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & (2 ** 63 - 1))
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        return self.dataset.sample(index, flip, g) if self.latents else self.dataset.load(index, flip)


def training_loader(dataset, recipe, micro_batch: int, rank: int, world: int, consumed: int,
                    pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The endless training loader of one process, resuming after `consumed` items. A bucketed dataset (one with
    `bucket_of_item`) is batched by data.buckets.BucketBatchSampler, so a batch never mixes shapes."""
    items = SeededItems(dataset, recipe.seed, recipe.random_flip)
    common = dict(num_workers=recipe.num_workers, pin_memory=pin_memory, persistent_workers=recipe.num_workers > 0,
                  generator=torch.Generator().manual_seed(recipe.seed))  # keeps worker seeding off the global RNG
    if getattr(dataset, "bucket_of_item", None) is None:
        if recipe.bucket_resolutions or recipe.bucket_weights:
            raise ConfigError("bucket_resolutions / bucket_weights choose among a bucketed data's resolutions; this "
                              "data is square (cache it with --buckets, or set the recipe's buckets)")
        sampler = ResumableSampler(len(dataset), recipe.seed, rank, world, consumed)
        return torch.utils.data.DataLoader(items, batch_size=micro_batch, sampler=sampler, drop_last=True, **common)
    from ..data.buckets import BucketBatchSampler
    batches = BucketBatchSampler(dataset.bucket_of_item, dataset.group_of_bucket, micro_batch, recipe.seed, rank, world,
                                 consumed // micro_batch, short=recipe.bucket_short,
                                 only=recipe.bucket_resolutions or None, weights=recipe.bucket_weights or None)
    unseen = batches.never_trained()
    if unseen and rank == 0:
        logger.warning("%d item(s) sit in buckets smaller than one global batch (%d) and are never trained on; "
                       "set bucket_short: pad to train them", unseen, micro_batch * world)
    return torch.utils.data.DataLoader(items, batch_sampler=batches, **common)


#################################################################################
#                                      EMA                                      #
#################################################################################

@torch.no_grad()
def update_ema(ema_params: List[torch.Tensor], params: List[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, on device, no host sync. Sharded (FSDP2) pairs update this process's
    slices, the only part of either it holds, in one foreach op like unsharded ones."""
    from .sharding import local_shards
    ema_params, params = local_shards(ema_params), local_shards(params)
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(params, ema_params)], 1.0 - decay)


#################################################################################
#                                  RNG states                                   #
#################################################################################

def rng_state(step_generator: torch.Generator) -> Dict:
    """Every RNG this process draws from, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "step_generator": step_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict, step_generator: torch.Generator) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    step_generator.set_state(state["step_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def checkpoint_root(output_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (a partial one is never named step_*)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name))


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """`latest` -> the newest complete checkpoint (None if there is none); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"{resume}: not a fine-tuning checkpoint (no state.json)")
    return path


def partial_dir(output_dir: Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is renamed to step_*."""
    return checkpoint_root(output_dir) / f".partial_step_{step:08d}"


def finish_checkpoint(output_dir: Path, step: int, keep: int) -> Path:
    """Rename a fully written checkpoint into place, then drop the oldest beyond `keep`."""
    final = checkpoint_root(output_dir) / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial_dir(output_dir, step), final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_state(folder: Path, state: Dict) -> None:
    """state.json, written last inside the partial folder."""
    (folder / "state.json").write_text(json.dumps(state, indent=2))


def read_state(folder: Path) -> Dict:
    """state.json of a checkpoint; a missing or damaged one is a CheckpointError naming it."""
    return read_json(folder / "state.json")
