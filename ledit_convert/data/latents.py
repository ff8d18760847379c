# Cached VAE latents: encode a dataset once, train many epochs without the VAE.
#
# Layout of a cache folder:
#   latents_00000.safetensors ...  tensors `mean`, `std` [n, C, h, w] (posterior of each image),
#                                  `labels` [n] int64, and `mean_flip` / `std_flip` for the mirrored
#                                  image when flip variants are cached. Header metadata records
#                                  which dataset indices the shard covers, so an interrupted run resumes.
#                                  A captioned dataset's shards also hold its text encoder's token fields as
#                                  `text_<field>`: `text_embeds` [n, T, D] (storage dtype) with `text_mask`
#                                  [n, T] uint8 (PixArt) or `text_pooled` [n, P] (SD3), and
#                                  empty_prompt.safetensors the empty prompt's (caption dropout), so no text
#                                  encoder runs while training.
#   index.json                     written LAST: its absence marks an incomplete cache.
# We store the posterior (mean, std) rather than one sample so each epoch draws a fresh sample, as
# DiT does with `latent_dist.sample()`. Mirrored images are encoded separately because the VAE is
# not flip-equivariant: flipping a latent is not the latent of the flipped image.
# Storage is float16 by default: it halves the disk (ImageNet with flips: ~42 GB instead of ~84 GB)
# and its rounding (relative 2^-11, ~0.001 on a scaled latent) sits an order of magnitude below the
# smallest noise the model is trained on (sqrt(1 - abar_0) = 0.01); pass storage_dtype=float32 to
# keep the VAE's output exactly.
import json
import math
import os
from typing import Callable, Dict, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .images import EncodedSample, Sample, size_of
from ..errors import ConfigError, DataError, OutputExistsError

INDEX_FILE = "index.json"
SHARD_NAME = "latents_{:05d}.safetensors"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
CACHE_FORMAT = "ledit-latents"
_STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def is_latent_cache(folder) -> bool:
    """True if the folder holds an index.json or latent shards (complete or not)."""
    if os.path.isfile(os.path.join(folder, INDEX_FILE)):
        return True
    return any((n.startswith("latents_") and n.endswith(".safetensors")) or n.startswith("chunk_")
               for n in os.listdir(folder))


class _Unflipped(torch.utils.data.Dataset):
    """The dataset's items without random flips: the cache stores both orientations explicitly."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        return self.dataset.load(self.start + i, flip=False)


def _write_atomic(path: str, write: Callable[[str], None]):
    """Write a cache file through a temporary one; the cache folder itself appears with its first finished file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never a partial one


def _shard_metadata(start, stop, resolution, vae_id, flip_variants, storage_dtype, count, text_id=""):
    return {"format": CACHE_FORMAT, "start": str(start), "stop": str(stop), "resolution": str(resolution),
            "vae": str(vae_id), "flip_variants": str(bool(flip_variants)),
            "storage_dtype": str(storage_dtype).removeprefix("torch."), "count": str(count), "text": text_id}


def _text_id(text_encoder) -> str:
    """What a shard's text tokens came from: encoder, width and token count (a change rebuilds the shard)."""
    if text_encoder is None:
        return ""
    return f"{text_encoder.source or 'unknown'}|{text_encoder.width}|{text_encoder.max_length}"


def _finished_shard(path: str, expected: dict) -> Optional[int]:
    """Row count of an existing shard written with the same settings, else None (rebuild it)."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a foreign or damaged file: rebuild it
        return None
    meta.setdefault("text", "")  # shards written before captioned caches existed hold class data
    same = all(meta.get(k) == v for k, v in expected.items() if k != "count")
    return int(meta["count"]) if same and "count" in meta else None


@torch.no_grad()
def cache_latents(dataset, vae, output_dir, batch_size: int = 32, shard_size: int = 4096, flip_variants: bool = True,
                  device="cpu", dtype: torch.dtype = torch.float32, progress: Optional[Callable[[int, int], None]] = None,
                  storage_dtype: torch.dtype = torch.float16, num_workers: int = 0, vae_id: Optional[str] = None,
                  overwrite: bool = False, text_encoder=None) -> dict:
    """Encode an image dataset (with `.load(i, flip)`) into sharded VAE posteriors; returns the index. With a
    `text_encoder` (text.TextEncoder), the dataset is a captioned one and its captions are encoded too."""
    output_dir = os.fspath(output_dir)
    index_path = os.path.join(output_dir, INDEX_FILE)
    if os.path.exists(index_path):
        if not overwrite:
            raise OutputExistsError(f"{output_dir}: already holds a latent cache (pass --overwrite to rebuild it)")
        os.remove(index_path)  # from here on the folder reads as incomplete until we finish
    for name, value, least in (("--shard-size", shard_size, 1), ("--batch-size", batch_size, 1),
                               ("--num-workers", num_workers, 0)):
        if value < least:
            raise ConfigError(f"{name} {value} must be at least {least}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling
    if dataset.resolution % factor:
        raise ConfigError(f"--resolution {dataset.resolution} is not a multiple of {factor}, the VAE's downsampling")
    vae = vae.to(device=device).eval()
    if vae.dtype != dtype:  # only cast when asked: diffusers warns on every dtype cast
        vae = vae.to(dtype=dtype)
    vae_id = vae_id or getattr(vae.config, "_name_or_path", "") or "unknown"
    captioned = getattr(dataset, "captions", None) is not None
    if captioned != (text_encoder is not None):
        raise DataError("a captioned dataset is cached with a text encoder, a class-labelled one without"
                        if captioned else "a text encoder was given, but the dataset has no captions")
    text_id = _text_id(text_encoder)
    # the empty prompt's fields: caption dropout's tokens, and the fields and shapes every shard stores
    empty_text = text_encoder.encode([""]) if text_encoder is not None else {}
    n = len(dataset)
    shards, total, skipped, latent_shape = [], 0, 0, None
    for k in range(math.ceil(n / shard_size)):
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        name = SHARD_NAME.format(k)
        path = os.path.join(output_dir, name)
        meta = _shard_metadata(start, stop, dataset.resolution, vae_id, flip_variants, storage_dtype, 0, text_id)
        count = None if overwrite else _finished_shard(path, meta)
        if count is None:
            tensors, skipped_here = _encode_range(dataset, vae, start, stop, batch_size, flip_variants,
                                                  device, dtype, storage_dtype, num_workers, progress, total, n,
                                                  text_encoder, empty_text)
            count = len(tensors["labels"])
            meta["count"] = str(count)
            _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
            skipped += skipped_here
        elif progress is not None:
            progress(stop, n)
        if latent_shape is None and count:
            with safe_open(path, framework="pt") as f:
                latent_shape = list(f.get_slice("mean").get_shape()[1:])
        shards.append({"file": name, "count": count, "start": start, "stop": stop})
        total += count
    if total == 0:
        raise DataError(f"{output_dir}: no readable images to cache")
    text = None
    if text_encoder is not None:
        empty = {k: _stored(k, v[0], storage_dtype) for k, v in empty_text.items()}
        _write_atomic(os.path.join(output_dir, EMPTY_PROMPT_FILE), lambda tmp: save_file(empty, tmp))
        text = {"encoder": text_encoder.source, "width": text_encoder.width, "max_length": text_encoder.max_length,
                "fields": sorted(empty)}
    index = {
        "format": CACHE_FORMAT, "version": 1, "count": total, "shards": shards, "latent_shape": latent_shape,
        "resolution": dataset.resolution, "vae": vae_id,
        "scaling_factor": float(getattr(vae.config, "scaling_factor", None) or 0.18215),
        "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        "flip_variants": bool(flip_variants), "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "classes": list(getattr(dataset, "classes", []) or []),
        # counted in this run only; images skipped by an earlier, resumed run are in their shards' absence
        "skipped": skipped,
        "text": text,  # None for class-labelled data
    }
    _write_atomic(index_path, lambda tmp: open(tmp, "w").write(json.dumps(index, indent=2)))
    return index


def _stored(field: str, value: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """A text field as a cache stores it: masks as uint8, token states in the storage dtype, on the CPU."""
    return value.to(torch.uint8 if field == "mask" else storage_dtype).cpu().contiguous()


def _encode_range(dataset, vae, start, stop, batch_size, flip_variants, device, dtype, storage_dtype,
                  num_workers, progress, done_before, n, text_encoder=None, empty_text=None):
    """Encode dataset items [start, stop) into one shard's tensors; returns (tensors, skipped count). `empty_text`
    is the text encoder's output for the empty prompt: which text fields to store, and their shapes."""
    loader = torch.utils.data.DataLoader(_Unflipped(dataset, start, stop), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    empty_text = empty_text or {}
    names = ("mean", "std", "mean_flip", "std_flip", "labels") + tuple(f"text_{k}" for k in empty_text)
    parts = {k: [] for k in names}
    skipped, done = 0, done_before
    for x, labels, skips, _ in loader:
        # an item with skips > 0 is a stand-in (the next readable image), which is also cached under
        # its own index: dropping it leaves exactly the readable images, each once
        keep = skips == 0
        skipped += int((~keep).sum())
        if text_encoder is not None:  # `labels` are captions
            captions = [c for c, k in zip(labels, keep.tolist()) if k]
            labels = torch.zeros(len(keep), dtype=torch.int64)
            if captions:
                for field, value in text_encoder.encode(captions).items():
                    parts[f"text_{field}"].append(_stored(field, value, storage_dtype))
        x, labels = x[keep], labels[keep]
        done += len(keep)
        if len(x):
            batch = torch.cat([x, x.flip(-1)]) if flip_variants else x  # one VAE call for both views
            dist = vae.encode(batch.to(device=device, dtype=dtype)).latent_dist
            mean, std = dist.mean.to(storage_dtype).cpu(), dist.std.to(storage_dtype).cpu()
            b = len(x)
            parts["mean"].append(mean[:b])
            parts["std"].append(std[:b])
            if flip_variants:
                parts["mean_flip"].append(mean[b:])
                parts["std_flip"].append(std[b:])
            parts["labels"].append(labels.to(torch.int64))
        if progress is not None:
            progress(done, n)
    if not parts["labels"]:  # every image in this range was unreadable: an empty shard keeps numbering simple
        side = dataset.resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling
        shape = (0, vae.config.latent_channels, side, side)
        parts = {k: [torch.zeros(shape, dtype=storage_dtype)] for k in parts}
        parts["labels"] = [torch.zeros(0, dtype=torch.int64)]
        for field, value in empty_text.items():
            parts[f"text_{field}"] = [_stored(field, value[:0], storage_dtype)]
    return {k: torch.cat(v).contiguous() for k, v in parts.items() if v}, skipped


def _loaded(field: str, value: torch.Tensor) -> torch.Tensor:
    """A stored text field as the model takes it: masks int64, token states float32."""
    return value.long() if field == "mask" else value.float()


class CachedLatentsDataset(torch.utils.data.Dataset):
    """Reads a latent cache lazily; each item is a fresh posterior sample x scaling_factor."""

    def __init__(self, folder, random_flip: bool = True):
        self.folder = os.fspath(folder)
        index_path = os.path.join(self.folder, INDEX_FILE)
        if not os.path.isfile(index_path):
            if os.path.isdir(self.folder) and is_latent_cache(self.folder):
                raise DataError(f"{self.folder}: latent cache is incomplete (no {INDEX_FILE}; caching was "
                                f"interrupted) - run the caching again to resume it")
            raise DataError(f"{self.folder}: not a latent cache (no {INDEX_FILE})")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("format") != CACHE_FORMAT:
                raise ValueError(f"format is {index.get('format')!r}, expected {CACHE_FORMAT!r}")
            self.shard_files = [os.path.join(self.folder, s["file"]) for s in index["shards"]]
            counts = [int(s["count"]) for s in index["shards"]]
            self.resolution = int(index["resolution"])
            self.scaling_factor = float(index["scaling_factor"])
            self.shift_factor = float(index.get("shift_factor", 0.0))
            self.flip_variants = bool(index["flip_variants"])
            self.latent_shape = tuple(index["latent_shape"])
            self.text = index.get("text")  # {"encoder", "width", "max_length", "fields"} for captioned data
            if self.text is not None:
                self.text = {"encoder": str(self.text["encoder"]), "width": int(self.text["width"]),
                             "max_length": int(self.text["max_length"]),
                             "fields": [str(f) for f in self.text.get("fields", ["embeds", "mask"])]}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index_path}: not a valid latent cache index ({e})") from None
        self.classes = list(index.get("classes", []))
        if random_flip and not self.flip_variants:
            raise DataError(f"{self.folder}: cached without flip variants; rebuild with flips or use random_flip=False")
        self.random_flip = random_flip
        labels = []
        for path, count in zip(self.shard_files, counts):
            try:
                with safe_open(path, framework="pt") as f:
                    shard_labels = f.get_tensor("labels")
            except Exception as e:  # missing, truncated or foreign file
                raise DataError(f"{path}: unreadable latent shard ({type(e).__name__}: {e})") from None
            if len(shard_labels) != count:
                raise DataError(f"{path}: holds {len(shard_labels)} latents, {INDEX_FILE} says {count}")
            labels.append(shard_labels.numpy())
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._handles = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        # open file handles cannot be pickled into DataLoader workers; each worker opens its own
        return {**self.__dict__, "_handles": {}}

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.shard_files[shard], framework="pt")
        return self._handles[shard]

    def _locate(self, index: int):
        """The open shard holding item `index` and its row there."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._handle(shard), index - int(self._starts[shard])

    def posterior(self, index: int, flip: bool = False):
        """(mean, std) of item `index` as float32 (C, h, w) tensors, read from its shard alone."""
        (handle, row), suffix = self._locate(index), "_flip" if flip else ""
        mean = handle.get_slice("mean" + suffix)[row:row + 1][0].float()
        std = handle.get_slice("std" + suffix)[row:row + 1][0].float()
        return mean, std

    def sample(self, index: int, flip: bool, generator: Optional[torch.Generator] = None):
        """A posterior sample of item `index`, scaled as the model sees latents ((z - shift) x scaling_factor): a
        Sample with its label, or for captioned data an EncodedSample with its caption's tokens."""
        mean, std = self.posterior(index, flip)
        latent = (mean + std * torch.randn(mean.shape, generator=generator) - self.shift_factor) * self.scaling_factor
        size = self._size(index)
        if self.text is None:
            return Sample(latent, int(self.labels[index]), 0, size)
        handle, row = self._text_row(index)
        text = {f: _loaded(f, handle.get_slice(f"text_{f}")[row:row + 1][0]) for f in self.text["fields"]}
        return EncodedSample(latent, text, 0, size)

    def _size(self, index: int) -> torch.Tensor:
        """The size item `index`'s micro-conditions name: the training size of a square cache."""
        return size_of(self.resolution, self.resolution)

    def _text_row(self, index: int):
        """The open file holding item `index`'s caption tokens and their row there: its own shard's row."""
        return self._locate(index)

    def null_text(self) -> Dict[str, torch.Tensor]:
        """The empty prompt's token fields (masks int64, the rest float32), for caption dropout."""
        path = os.path.join(self.folder, EMPTY_PROMPT_FILE)
        try:
            with safe_open(path, framework="pt") as f:
                return {field: _loaded(field, f.get_tensor(field)) for field in self.text["fields"]}
        except Exception as e:  # missing, truncated or foreign file
            raise DataError(f"{path}: unreadable empty-prompt tokens ({type(e).__name__}: {e})") from None

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # global RNG for the flip and the sample: seeded runs (and seeded workers) reproduce exactly
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        return self.sample(index, flip)
