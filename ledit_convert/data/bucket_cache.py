# A latent cache in aspect-ratio buckets: what `cache-latents --buckets` writes and fine-tuning reads.
#
# Layout of a bucketed cache folder (latents.py describes the square one, whose tensors these extend):
#   chunk_00000/                   one chunk per `shard_size` source images, written in one go:
#     bucket_512x384.safetensors     the chunk's items in one bucket: `mean`, `std` [n, C, h, w] (and
#                                    `mean_flip` / `std_flip`), `labels` [n], `original` [n, 2] (the image's
#                                    height, width), `crop` [n, 4] (top, left, resized height, resized width: the
#                                    bucket's box in the resized image), `text_row` [n] (its caption's row)
#     text.safetensors               captioned data: the chunk's captions, encoded once each (`text_<field>`), one
#                                    row per image, whatever buckets and resolutions its items went to
#     manifest.json                  written LAST: the chunk's files and the images it covers (by their names in
#                                    the dataset), cached, unreadable or too small; its absence marks an unfinished
#                                    chunk, whose files a rerun replaces
#   empty_prompt.safetensors       captioned data: the empty prompt's tokens (caption dropout)
#   index.json                     written last: settings, buckets and every chunk's shards and counts
# A rerun over the same folder resumes an interrupted run and, when the source folder has grown, encodes only the
# images no manifest names: extending a cache never re-encodes what it holds.
import json
import os
import re
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .buckets import Bucket, BucketedImages
from .images import _DECODE_ERRORS, size_of
from .latents import (CACHE_FORMAT, EMPTY_PROMPT_FILE, INDEX_FILE, CachedLatentsDataset, _stored, _text_id,
                      _write_atomic)
from ..errors import ConfigError, DataError, OutputExistsError

CHUNK_DIR = "chunk_{:05d}"
CHUNK_NAME = re.compile(r"chunk_\d{5}")
MANIFEST = "manifest.json"
TEXT_SHARD = "text.safetensors"


def bucket_file(bucket: Bucket) -> str:
    return f"bucket_{bucket[0]}x{bucket[1]}.safetensors"


def is_bucketed_cache(folder) -> bool:
    """True if the folder holds chunks of a bucketed cache (complete or not)."""
    return os.path.isdir(folder) and any(n.startswith("chunk_") for n in os.listdir(folder))


def _settings(groups: Dict[int, List[Bucket]], align: int, crop: str, max_upscale: float, seed: int, vae_id: str,
              flip_variants: bool, storage_dtype: torch.dtype, text_id: str) -> Dict:
    """What every chunk of one cache shares; a rerun with other settings must start over (--overwrite)."""
    return {"groups": {str(r): [list(b) for b in bs] for r, bs in groups.items()}, "align": align, "crop": crop,
            "max_upscale": float(max_upscale), "seed": seed, "vae": vae_id, "flip_variants": bool(flip_variants),
            "storage_dtype": str(storage_dtype).removeprefix("torch."), "text": text_id}


def _read_manifests(folder: str, settings: Dict) -> List[Dict]:
    """The finished chunks' manifests; unfinished chunk folders (no manifest, or still named `.partial`) are removed
    (their images are encoded again)."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (name.startswith("chunk_") and os.path.isdir(path)):
            continue
        manifest = os.path.join(path, MANIFEST)
        if not CHUNK_NAME.fullmatch(name) or not os.path.isfile(manifest):
            shutil.rmtree(path)
            continue
        try:
            with open(manifest, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{manifest}: unreadable chunk manifest ({e})") from None
        if record.get("settings") != settings:
            changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
            raise ConfigError(f"{folder}: was cached with other settings ({', '.join(changed) or 'format'}); "
                              f"pass --overwrite to rebuild it")
        record["dir"] = name
        found.append(record)
    return found


@torch.no_grad()
def cache_bucketed_latents(dataset, vae, output_dir, groups: Dict[int, List[Bucket]], align: int,
                           crop: str = "center", max_upscale: float = 1.0, seed: int = 0, batch_size: int = 32,
                           shard_size: int = 4096, flip_variants: bool = True, device="cpu",
                           dtype: torch.dtype = torch.float32, progress: Optional[Callable[[int, int], None]] = None,
                           storage_dtype: torch.dtype = torch.float16, num_workers: int = 0,
                           vae_id: Optional[str] = None, overwrite: bool = False, text_encoder=None) -> dict:
    """Encode an image dataset (images.py's folders and HF datasets) into a bucketed latent cache; returns the
    index. Images the folder already holds in finished chunks are not encoded again."""
    output_dir = os.fspath(output_dir)
    for name, value, least in (("--shard-size", shard_size, 1), ("--batch-size", batch_size, 1),
                               ("--num-workers", num_workers, 0)):
        if value < least:
            raise ConfigError(f"{name} {value} must be at least {least}")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not is_bucketed_cache(output_dir) and not overwrite:
        raise OutputExistsError(f"{output_dir}: holds other files, not a bucketed cache (pass --overwrite to "
                                f"replace a cache, or choose an empty folder)")
    if overwrite and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):  # only what a cache writes: never a user's other files
            path = os.path.join(output_dir, name)
            if name.startswith("chunk_") and os.path.isdir(path):
                shutil.rmtree(path)
            elif name in (INDEX_FILE, EMPTY_PROMPT_FILE) or name.startswith("latents_"):
                os.remove(path)
    captioned = getattr(dataset, "captions", None) is not None
    if captioned != (text_encoder is not None):
        raise DataError("a captioned dataset is cached with a text encoder, a class-labelled one without"
                        if captioned else "a text encoder was given, but the dataset has no captions")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if align % factor:
        raise ConfigError(f"bucket alignment {align} is not a multiple of the VAE's downsampling {factor}")
    vae = vae.to(device=device).eval()
    if vae.dtype != dtype:
        vae = vae.to(dtype=dtype)
    vae_id = vae_id or getattr(vae.config, "_name_or_path", "") or "unknown"
    settings = _settings(groups, align, crop, max_upscale, seed, vae_id, flip_variants, storage_dtype,
                         _text_id(text_encoder))
    created = not os.path.exists(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    index_path = os.path.join(output_dir, INDEX_FILE)
    manifests = _read_manifests(output_dir, settings)
    done = {k for m in manifests for k in m["images"]}
    todo = [j for j in range(len(dataset)) if dataset.key(j) not in done]
    empty_text = text_encoder.encode([""]) if text_encoder is not None else {}
    if todo and os.path.exists(index_path):
        os.remove(index_path)  # the folder reads as incomplete until the new chunks are in
    next_chunk = 1 + max((int(m["dir"][6:]) for m in manifests), default=-1)
    for k, start in enumerate(range(0, len(todo), shard_size)):
        sources = todo[start:start + shard_size]
        manifests.append(_write_chunk(dataset, sources, vae, output_dir, CHUNK_DIR.format(next_chunk + k), groups,
                                      settings, crop, max_upscale, seed, batch_size, num_workers, flip_variants,
                                      device, dtype, storage_dtype, text_encoder, empty_text, progress,
                                      start, len(todo)))
    if text_encoder is not None:
        empty = {k: _stored(k, v[0], storage_dtype) for k, v in empty_text.items()}
        _write_atomic(os.path.join(output_dir, EMPTY_PROMPT_FILE), lambda tmp: save_file(empty, tmp))
    index = _index(manifests, settings, vae, dataset, text_encoder, empty_text)
    if index["count"] == 0:  # nothing to train on: leave no cache behind that says otherwise
        shutil.rmtree(output_dir) if created else [shutil.rmtree(os.path.join(output_dir, m["dir"]))
                                                   for m in manifests]
        raise DataError(f"{output_dir}: no image fits a bucket ({index['unreadable']} unreadable, "
                        f"{index['too_small']} too small for every bucket; allow enlarging with --max-upscale)")
    _write_atomic(index_path, lambda tmp: open(tmp, "w").write(json.dumps(index, indent=2)))
    return index


def _write_chunk(dataset, sources, vae, output_dir, name, groups, settings, crop, max_upscale, seed, batch_size,
                 num_workers, flip_variants, device, dtype, storage_dtype, text_encoder, empty_text, progress,
                 done_before, total) -> Dict:
    """Encode the images `sources` into one chunk folder (written as `.partial`, renamed when whole)."""
    final = os.path.join(output_dir, name)
    tmp = final + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    placed = BucketedImages(dataset, groups, crop, max_upscale, seed, only=sources)
    keys = [dataset.key(j) for j in sources]
    # the items in bucket order, batched within their bucket; decoded by the loader's workers
    order = np.argsort(placed.bucket_of_item, kind="stable")
    batches = [chunk.tolist() for b in sorted(set(placed.bucket_of_item.tolist()))
               for items in [order[placed.bucket_of_item[order] == b]]
               for chunk in np.array_split(items, -(-len(items) // batch_size))]
    loader = torch.utils.data.DataLoader(_Unflipped(placed), batch_sampler=batches, num_workers=num_workers)
    parts: Dict[int, Dict[str, list]] = {}
    kept: Dict[int, List[int]] = {}
    undecodable = set()  # images whose header read but whose data did not decode: left out, like unreadable ones
    encoded = 0
    for items, (x, ok) in zip(batches, loader):
        b = int(placed.bucket_of_item[items[0]])
        keep = ok.tolist()
        undecodable |= {int(placed.source[i]) for i, k in zip(items, keep) if not k}
        x = x[ok]
        encoded += len(items)
        if len(x):
            batch = torch.cat([x, x.flip(-1)]) if flip_variants else x  # one VAE call for both views
            dist = vae.encode(batch.to(device=device, dtype=dtype)).latent_dist
            mean, std = dist.mean.to(storage_dtype).cpu(), dist.std.to(storage_dtype).cpu()
            got = parts.setdefault(b, {k: [] for k in ("mean", "std", "mean_flip", "std_flip")})
            got["mean"].append(mean[:len(x)])
            got["std"].append(std[:len(x)])
            if flip_variants:
                got["mean_flip"].append(mean[len(x):])
                got["std_flip"].append(std[len(x):])
            kept.setdefault(b, []).extend(i for i, k in zip(items, keep) if k)
        if progress is not None:
            progress(done_before + len(sources) * encoded // max(len(placed), 1), total)
    # the images with at least one encoded item: each gets its caption's row
    readable = sorted({int(placed.source[i]) for items in kept.values() for i in items})
    text_row = {j: r for r, j in enumerate(readable)}
    files, counts = [], {}
    for b, got in sorted(parts.items()):
        items = np.array(kept[b], dtype=np.int64)
        tensors = {k: torch.cat(v).contiguous() for k, v in got.items() if v}
        tensors["labels"] = torch.from_numpy(np.asarray(placed.labels)[items].astype(np.int64))
        tensors["original"] = torch.from_numpy(placed.original[items].astype(np.int32))
        tensors["crop"] = torch.from_numpy(placed.crop_box[items].astype(np.int32))
        tensors["text_row"] = torch.tensor([text_row[int(placed.source[i])] for i in items], dtype=torch.int64)
        bucket = placed.buckets[b]
        save_file(tensors, os.path.join(tmp, bucket_file(bucket)))
        files.append(bucket_file(bucket))
        counts[bucket_file(bucket)] = {"bucket": list(bucket), "group": placed.group_of_bucket[b], "count": len(items)}
    if text_encoder is not None and readable:
        rows = {}
        for s in range(0, len(readable), batch_size):
            for field, value in text_encoder.encode([dataset.captions[j] for j in readable[s:s + batch_size]]).items():
                rows.setdefault(field, []).append(_stored(field, value, storage_dtype))
        save_file({f"text_{f}": torch.cat(v) for f, v in rows.items()}, os.path.join(tmp, TEXT_SHARD))
        files.append(TEXT_SHARD)
    if progress is not None:
        progress(done_before + len(sources), total)
    cached = {dataset.key(j) for j in readable}
    unreadable = [dataset.key(j) for j in sources if placed.sizes[j] is None or j in undecodable]
    manifest = {"settings": settings, "images": keys, "unreadable": unreadable,
                "too_small": [k for k in keys if k not in cached and k not in set(unreadable)],
                "too_small_per_resolution": {str(r): n for r, n in placed.too_small.items()},
                "shards": counts, "text": TEXT_SHARD if TEXT_SHARD in files else None}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.replace(tmp, final)
    manifest["dir"] = name
    return manifest


def _index(manifests, settings, vae, dataset, text_encoder, empty_text) -> Dict:
    shards = [{"file": f"{m['dir']}/{name}", "text": f"{m['dir']}/{m['text']}" if m["text"] else None, **info}
              for m in manifests for name, info in sorted(m["shards"].items())]
    text = None
    if text_encoder is not None:
        text = {"encoder": text_encoder.source, "width": text_encoder.width, "max_length": text_encoder.max_length,
                "fields": sorted(empty_text)}
    return {"format": CACHE_FORMAT, "version": 2, "bucketed": True, "settings": settings,
            "count": sum(s["count"] for s in shards), "images": sum(len(m["images"]) for m in manifests),
            "unreadable": sum(len(m["unreadable"]) for m in manifests),
            "too_small": sum(len(m["too_small"]) for m in manifests), "shards": shards,
            "too_small_per_resolution": {r: sum(m["too_small_per_resolution"][r] for m in manifests)
                                         for r in settings["groups"]},
            "scaling_factor": float(getattr(vae.config, "scaling_factor", None) or 0.18215),
            "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
            "latent_channels": int(vae.config.latent_channels),
            "flip_variants": settings["flip_variants"], "storage_dtype": settings["storage_dtype"],
            "classes": list(getattr(dataset, "classes", []) or []), "text": text}


class _Unflipped(torch.utils.data.Dataset):
    """Bucketed items as the cache encodes them: unflipped pixels of each item's own image, and whether it decoded
    (an image whose header read but whose data does not decode gives zeros and False: it is left out and named)."""

    def __init__(self, placed: BucketedImages):
        self.placed = placed

    def __len__(self) -> int:
        return len(self.placed)

    def __getitem__(self, i: int):
        j = int(self.placed.source[i])
        try:
            image = self.placed.base.decode(j)
        except _DECODE_ERRORS as e:
            self.placed.base._record_skip(j, e)  # logged with the file's name, in the worker that read it
            return torch.zeros(3, *self.placed.bucket(i)), False
        return self.placed.crop(i, image), True


class BucketedLatents(CachedLatentsDataset):
    """Reads a bucketed cache lazily: items in shard order, `bucket_of_item` / `group_of_bucket` for the batch
    sampler, and each item's original size for its micro-conditions."""

    def __init__(self, folder, random_flip: bool = True):
        self.folder = os.fspath(folder)
        index_path = os.path.join(self.folder, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise DataError(f"{self.folder}: bucketed cache is incomplete (no {INDEX_FILE}; caching was interrupted) "
                            f"- run the caching again to resume it")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("format") != CACHE_FORMAT or not index.get("bucketed"):
                raise ValueError("not a bucketed ledit-latents index")
            shards = index["shards"]
            self.groups = {int(r): [tuple(b) for b in bs] for r, bs in index["settings"]["groups"].items()}
            self.align = int(index["settings"]["align"])
            self.scaling_factor = float(index["scaling_factor"])
            self.shift_factor = float(index["shift_factor"])
            self.flip_variants = bool(index["flip_variants"])
            self.text = index.get("text")
            channels = int(index["latent_channels"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{index_path}: not a valid bucketed cache index ({e})") from None
        self.classes = list(index.get("classes", []))
        if random_flip and not self.flip_variants:
            raise DataError(f"{self.folder}: cached without flip variants; rebuild with flips or use random_flip=False")
        self.random_flip = random_flip
        self.resolution = None  # many: see `groups`
        self.buckets = sorted({tuple(s["bucket"]) for s in shards}, key=lambda b: (b[0] * b[1], b))
        self.group_of_bucket = [0] * len(self.buckets)
        self.latent_sizes = [(0, 0)] * len(self.buckets)  # (h, w) of each bucket's latents
        self.shard_files, self.text_files = [], []
        labels, buckets, text_rows, originals, text_shard = [], [], [], [], []
        for s in shards:
            path = os.path.join(self.folder, s["file"])
            try:
                with safe_open(path, framework="pt") as f:
                    shard = {k: f.get_tensor(k) for k in ("labels", "original", "text_row")}
                    latent_size = tuple(f.get_slice("mean").get_shape()[-2:])
            except Exception as e:  # missing, truncated or foreign file
                raise DataError(f"{path}: unreadable latent shard ({type(e).__name__}: {e})") from None
            if len(shard["labels"]) != s["count"]:
                raise DataError(f"{path}: holds {len(shard['labels'])} latents, {INDEX_FILE} says {s['count']}")
            b = self.buckets.index(tuple(s["bucket"]))
            self.group_of_bucket[b] = int(s["group"])
            self.latent_sizes[b] = latent_size
            self.shard_files.append(path)
            if s.get("text") and s["text"] not in self.text_files:
                self.text_files.append(s["text"])
            labels.append(shard["labels"].numpy())
            originals.append(shard["original"].numpy())
            text_rows.append(shard["text_row"].numpy())
            buckets.append(np.full(s["count"], b))
            text_shard.append(np.full(s["count"], self.text_files.index(s["text"]) if s.get("text") else -1))
        self.text_files = [os.path.join(self.folder, t) for t in self.text_files]
        empty = np.zeros(0, np.int64)
        self.labels = np.concatenate(labels).astype(np.int64) if labels else empty
        self.bucket_of_item = np.concatenate(buckets).astype(np.int64) if buckets else empty
        self.original = np.concatenate(originals) if originals else np.zeros((0, 2), np.int64)
        self._text_rows = np.concatenate(text_rows) if text_rows else empty
        self._text_shard = np.concatenate(text_shard) if text_shard else empty
        self._starts = np.concatenate([[0], np.cumsum([s["count"] for s in shards])])
        self.latent_shape = (channels, *self.latent_sizes[0]) if self.buckets else (channels, 0, 0)
        self._handles, self._text_handles = {}, {}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_text_handles": {}}

    def bucket(self, index: int) -> Bucket:
        return self.buckets[int(self.bucket_of_item[index])]

    def _size(self, index: int) -> torch.Tensor:
        return size_of(*self.original[index])

    def _text_row(self, index: int):
        shard = int(self._text_shard[index])
        if shard not in self._text_handles:
            self._text_handles[shard] = safe_open(self.text_files[shard], framework="pt")
        return self._text_handles[shard], int(self._text_rows[index])

