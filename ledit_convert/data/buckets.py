"""Aspect-ratio buckets: the (height, width) each image trains at, and batches that never mix shapes.

A bucket spec names one or more *groups* of buckets, each at one nominal resolution (its buckets' area is at most
resolution^2):

    "512"                  buckets generated at ~512^2 pixels, aspect ratios 1:4 .. 4:1, sides multiples of `align`
    "256,384"              two groups: every image is cached (and trained) once per group that it reaches
    "pixart-1024"          PixArt's own table (diffusers' ASPECT_RATIO_1024_BIN; also pixart-256/512/2048)
    "sd3-1024"             the sizes SD3 / SD3.5 were trained and are sampled at around 1 megapixel
    "512x384,384x512"      explicit sizes, one group (its resolution: the square root of its largest area, rounded
                           to a multiple of `align`)

Each image goes, per group, to the bucket whose aspect ratio is closest to its own (in log space, so 2:1 and 1:2
are as far from 1:1), is resized to cover it (never enlarged more than `max_upscale`; too small images are
skipped in that group) and cropped to it, centred or at a seeded random offset. `align` is the VAE's downsampling
times the patch size, so every bucket is a whole number of tokens.
"""
import math
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .images import MAX_CONSECUTIVE_SKIPS, _DECODE_ERRORS, cover_crop, cover_size, image_to_tensor, size_of

Bucket = Tuple[int, int]  # (height, width) in pixels
MAX_RATIO = 4.0  # generated buckets span aspect ratios 1:4 .. 4:1, as PixArt's tables do

# SD3's ~1 megapixel training and sampling sizes (height, width), portrait and landscape
SD3_1024 = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
            (1536, 640), (640, 1536)]


#################################################################################
#                              Which buckets exist                              #
#################################################################################

def generate_buckets(resolution: int, align: int, max_ratio: float = MAX_RATIO) -> List[Bucket]:
    """Buckets of area at most resolution^2 with sides multiples of `align`: for each long side from the square's up
    to an aspect ratio of `max_ratio`, the longest short side that fits the area, landscape and portrait; sorted by
    aspect ratio (height / width)."""
    if resolution % align:
        raise ConfigError(f"bucket resolution {resolution} is not a multiple of {align} (VAE downsampling x patch)")
    area, found = resolution * resolution, set()
    for long in range(resolution, int(resolution * math.sqrt(max_ratio)) + 1, align):
        short = (area // long) // align * align
        if short >= align and long / short <= max_ratio + 1e-9:
            found |= {(short, long), (long, short)}
    return sorted(found, key=lambda b: b[0] / b[1])


def _pixart_table(resolution: int) -> List[Bucket]:
    """PixArt's ASPECT_RATIO_<resolution>_BIN table as diffusers ships it (256 to 1024 with the alpha pipeline,
    2048 with the sigma one)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha, pipeline_pixart_sigma
    name = f"ASPECT_RATIO_{resolution}_BIN"
    table = getattr(pipeline_pixart_alpha, name, None) or getattr(pipeline_pixart_sigma, name, None)
    if table is None:
        raise ConfigError(f"pixart-{resolution}: PixArt's tables are pixart-256, pixart-512, pixart-1024, pixart-2048")
    return sorted({(int(h), int(w)) for h, w in table.values()}, key=lambda b: b[0] / b[1])


def parse_buckets(spec: str, align: int) -> Dict[int, List[Bucket]]:
    """A bucket spec (see the module's docstring) -> {group resolution: buckets}; every side a multiple of
    `align`. Two groups of one resolution, or one bucket in two groups, are refused: an item's group must be
    unambiguous."""
    groups: Dict[int, List[Bucket]] = {}
    explicit: List[Bucket] = []

    def add(res: int, buckets: List[Bucket], item: str):
        if res in groups:
            raise ConfigError(f"buckets {spec!r}: {item!r} is a second group at resolution {res}")
        groups[res] = buckets
    for item in (part.strip().lower() for part in str(spec).split(",")):
        if not item:
            continue
        if item.isdigit():
            add(int(item), generate_buckets(int(item), align), item)
        elif item.startswith("pixart-") and item[7:].isdigit():
            add(int(item[7:]), _pixart_table(int(item[7:])), item)
        elif item == "sd3-1024":
            add(1024, sorted(SD3_1024, key=lambda b: b[0] / b[1]), item)
        elif "x" in item and all(p.isdigit() for p in item.split("x", 1)):
            h, w = (int(p) for p in item.split("x", 1))
            explicit.append((h, w))
        else:
            raise ConfigError(f"buckets {spec!r}: {item!r} is not N, HxW, pixart-N or sd3-1024")
    if explicit:
        res = int(round(math.sqrt(max(h * w for h, w in explicit)) / align)) * align
        add(res, sorted(set(explicit), key=lambda b: b[0] / b[1]), "the HxW sizes")
    if not groups:
        raise ConfigError(f"buckets {spec!r}: names no bucket")
    seen: Dict[Bucket, int] = {}
    for res, buckets in groups.items():
        bad = [b for b in buckets if b[0] % align or b[1] % align or min(b) <= 0]
        if bad:
            raise ConfigError(f"buckets {spec!r}: {bad[0][0]}x{bad[0][1]} is not a multiple of {align} "
                              f"(VAE downsampling x patch size) on both sides")
        for b in buckets:
            if b in seen:
                raise ConfigError(f"buckets {spec!r}: {b[0]}x{b[1]} is in the groups at {seen[b]} and at {res}")
            seen[b] = res
    return dict(sorted(groups.items()))


#################################################################################
#                          Where one image goes, and how                         #
#################################################################################

def closest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's in log space; a tie goes to the larger area."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 12), -b[0] * b[1]))


def cover_scale(height: int, width: int, bucket: Bucket) -> float:
    """The factor that makes the image just cover the bucket (> 1 enlarges it)."""
    return max(bucket[0] / height, bucket[1] / width)


def resized_size(height: int, width: int, bucket: Bucket) -> Tuple[int, int]:
    """(height, width) of the image resized to cover the bucket, exactly as images.cover_crop resizes it."""
    return cover_size(height, width, *bucket)[1:]


def crop_offset(resized: Tuple[int, int], bucket: Bucket, mode: str, seed: int = 0, key: int = 0) -> Tuple[int, int]:
    """(top, left) of the bucket inside the resized image: centred, or uniformly random from (seed, key)."""
    spare_h, spare_w = resized[0] - bucket[0], resized[1] - bucket[1]
    if mode == "center":
        return spare_h // 2, spare_w // 2
    if mode != "random":
        raise ConfigError(f"crop {mode!r} is not center or random")
    rng = np.random.default_rng([seed, key])
    return int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))


def place(sizes: Dict[int, Optional[Tuple[int, int]]], groups: Dict[int, List[Bucket]], crop: str = "center",
          max_upscale: float = 1.0, seed: int = 0, names: Optional[Dict[int, str]] = None) -> Dict[str, np.ndarray]:
    """Items for the images of `sizes` ({image index: (height, width), or None when unreadable}) in every group
    they reach: arrays `source` (image index), `bucket` (index into the flattened bucket list), `crop` (top, left,
    resized height, resized width) and `original` (height, width); plus `too_small` per group (images skipped
    there). A random crop's offset is drawn from (seed, image, group), the image named by `names` (its name in the
    dataset) when given, else by its index: the same image crops the same way in every run, and in a folder that
    grew."""
    index = {(res, b): i for i, (res, b) in enumerate((res, b) for res in groups for b in groups[res])}
    rows, too_small = [], {res: 0 for res in groups}
    for source, size in sorted(sizes.items()):
        if size is None:
            continue
        h, w = size
        for g, (res, buckets) in enumerate(groups.items()):
            bucket = closest_bucket(h, w, buckets)
            if cover_scale(h, w, bucket) > max_upscale + 1e-9:
                too_small[res] += 1
                continue
            rh, rw = resized_size(h, w, bucket)
            key = zlib.crc32(names[source].encode()) if names else source
            top, left = crop_offset((rh, rw), bucket, crop, seed, key * len(groups) + g)
            rows.append((source, index[(res, bucket)], top, left, rh, rw, h, w))
    table = np.array(rows, dtype=np.int64).reshape(-1, 8)
    return {"source": table[:, 0], "bucket": table[:, 1], "crop": table[:, 2:6], "original": table[:, 6:8],
            "too_small": too_small}


def flatten(groups: Dict[int, List[Bucket]]) -> Tuple[List[Bucket], List[int]]:
    """Every group's buckets in one list, and each one's group resolution (the indexing `place` uses)."""
    buckets = [b for res in groups for b in groups[res]]
    return buckets, [res for res in groups for _ in groups[res]]


#################################################################################
#                          Batches that never mix shapes                         #
#################################################################################

class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) keys, all of one bucket, for one of `world` processes.

    Each group of buckets (one nominal resolution) is a stream of its own: per epoch, every bucket's items are
    shuffled and cut into global batches (batch_size x world); a short last batch is dropped (its items come back
    in later epochs, in other orders) or padded by repeating the bucket's first items; the global batches of all
    its buckets are shuffled together. Each step takes one global batch from a group drawn with the group
    weights (always the same group when there is one), and this process gets its slice of it: every process sees
    the same bucket at the same step, and as many steps. Everything is drawn from the seed, so the position after
    `consumed` batches is recomputed on resume, exactly.

    `group_of_bucket` names each bucket's group by its resolution; `only` (resolutions) restricts training to
    some groups and `weights` (one per `only` entry) sets their shares of the steps; by default every group
    trains, each in proportion to its batches per epoch (so one epoch of each takes about as long).
    """

    _CHUNK = 4096  # group choices drawn per seeded chunk of steps

    def __init__(self, bucket_of_item: np.ndarray, group_of_bucket: Sequence[int], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, consumed: int = 0, short: str = "drop",
                 only: Optional[Sequence[int]] = None, weights: Optional[Sequence[float]] = None):
        if short not in ("drop", "pad"):
            raise ConfigError(f"bucket_short {short!r} is not drop or pad")
        self.batch, self.seed, self.rank, self.world, self.short = batch_size, seed, rank, world, short
        self.consumed = consumed
        bucket_of_item = np.asarray(bucket_of_item, dtype=np.int64)
        self.group_of_bucket = np.asarray(group_of_bucket, dtype=np.int64)
        self.groups = sorted(set(self.group_of_bucket.tolist()))
        self.members = {b: np.flatnonzero(bucket_of_item == b) for b in range(len(self.group_of_bucket))}
        g = batch_size * world
        self.batches_per_epoch = []
        for group in self.groups:
            sizes = [len(self.members[b]) for b in np.flatnonzero(self.group_of_bucket == group)]
            self.batches_per_epoch.append(sum(n // g if short == "drop" else math.ceil(n / g) for n in sizes))
        only = list(only) if only else list(self.groups)
        missing = [r for r in only if r not in self.groups]
        if missing:
            raise DataError(f"bucket_resolutions {only}: the data has no bucket group {missing[0]} (it has "
                            f"{', '.join(map(str, self.groups))})")
        if weights is not None and len(weights) != len(only):
            raise ConfigError(f"bucket_weights {list(weights)}: one weight per bucket resolution {only}")
        share = dict(zip(only, weights)) if weights else {r: n for r, n in zip(self.groups, self.batches_per_epoch)}
        weights = np.array([float(share.get(r, 0.0)) if r in only else 0.0 for r in self.groups])
        if (weights < 0).any():
            raise ConfigError(f"bucket_weights {list(weights)} must not be negative")
        live = (weights > 0) & (np.asarray(self.batches_per_epoch) > 0)
        if not live.any():
            raise DataError(f"no bucket holds a full global batch of {g} items (batch {batch_size} x {world} "
                            f"process(es)); use bucket_short: pad or a smaller global_batch_size")
        dead = [self.groups[i] for i in np.flatnonzero((weights > 0) & ~live)]
        if dead:
            raise DataError(f"bucket group(s) {dead} hold no full global batch of {g} items; drop them from "
                            f"bucket_resolutions, use bucket_short: pad or a smaller global_batch_size")
        self.weights = weights / weights.sum()

    def never_trained(self) -> int:
        """Items of trained groups' buckets smaller than one global batch under `drop`: they are never seen (the caller
        warns)."""
        if self.short == "pad":
            return 0
        g = self.batch * self.world
        trained = {self.groups[i] for i in np.flatnonzero(self.weights > 0)}
        return sum(len(m) for b, m in self.members.items() if len(m) < g and self.group_of_bucket[b] in trained)

    def _group_choices(self, chunk: int) -> np.ndarray:
        if len(self.groups) == 1:
            return np.zeros(self._CHUNK, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 7919, chunk])
        return rng.choice(len(self.groups), size=self._CHUNK, p=self.weights)

    def _epoch(self, group: int, epoch: int) -> List[np.ndarray]:
        """Group `group`'s global batches of one epoch, in order (arrays of item indices)."""
        rng = np.random.default_rng([self.seed, group, epoch])
        g, out = self.batch * self.world, []
        for b in np.flatnonzero(self.group_of_bucket == self.groups[group]):
            items = self.members[b][rng.permutation(len(self.members[b]))]
            full = len(items) // g * g
            out += [items[i:i + g] for i in range(0, full, g)]
            if self.short == "pad" and full < len(items):  # the tail, then the bucket's first items (repeating)
                out.append(np.resize(items[full:].tolist() + items.tolist(), g))
        return [out[i] for i in rng.permutation(len(out))]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.consumed
        chunk = step // self._CHUNK
        choices = np.concatenate([self._group_choices(c) for c in range(chunk + 1)])
        taken = np.bincount(choices[:step], minlength=len(self.groups))  # batches each group gave before `step`
        cache: Dict[Tuple[int, int], List[np.ndarray]] = {}
        while True:
            group = int(choices[step]) if step < len(choices) else None
            if group is None:
                choices = np.concatenate([choices, self._group_choices(len(choices) // self._CHUNK)])
                continue
            epoch, offset = divmod(int(taken[group]), self.batches_per_epoch[group])
            if (group, epoch) not in cache:
                cache = {k: v for k, v in cache.items() if k[0] != group}  # one epoch per group in memory
                cache[(group, epoch)] = self._epoch(group, epoch)
            batch = cache[(group, epoch)][offset]
            taken[group] += 1
            step += 1
            mine = batch[self.rank * self.batch:(self.rank + 1) * self.batch]
            yield [(epoch, int(i)) for i in mine]

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2 ** 62


#################################################################################
#                             Bucketed image data                               #
#################################################################################

class BucketedImages(torch.utils.data.Dataset):
    """An image dataset (images.py's folders and HF datasets) placed in buckets: item i is image `source[i]`
    resized to cover bucket `bucket_of_item[i]` and cropped to it, with its original size as `size`. Image sizes
    come from the files' headers, read once here (for the images `only` names, by default all); an image whose
    header cannot be read is skipped (logged), and one too small for every bucket of a group is skipped in that
    group (counted in `too_small`)."""

    def __init__(self, base, groups: Dict[int, List[Bucket]], crop: str = "center", max_upscale: float = 1.0,
                 seed: int = 0, only: Optional[Sequence[int]] = None):
        self.base, self.groups, self.crop_mode, self.max_upscale = base, groups, crop, max_upscale
        self.sizes = {j: base.image_size(j) for j in (range(len(base)) if only is None else only)}
        names = {j: base.key(j) for j in self.sizes} if hasattr(base, "key") else None
        placed = place(self.sizes, groups, crop, max_upscale, seed, names)
        self.unreadable = sum(s is None for s in self.sizes.values())
        self.too_small = placed["too_small"]
        self.source, self.bucket_of_item = placed["source"], placed["bucket"]
        self.crop_box, self.original = placed["crop"], placed["original"]
        self.buckets, self.group_of_bucket = flatten(groups)
        if not len(self.source) and only is None:
            where = getattr(base, "root", None) or getattr(base, "path", "the dataset")
            raise DataError(f"{where}: no image fits a bucket ({self.unreadable} unreadable; too small for every "
                            f"bucket: {sum(self.too_small.values())} placements; allow enlarging with "
                            f"--max-upscale / bucket_max_upscale)")
        self.labels = np.asarray(base.labels)[self.source]
        self.captions = None if getattr(base, "captions", None) is None else [base.captions[j] for j in self.source]
        self.classes = list(getattr(base, "classes", []) or [])
        self.label_names = getattr(base, "label_names", None)
        self.random_flip = base.random_flip
        self.skipped_paths = base.skipped_paths
        self._same = {b: np.flatnonzero(self.bucket_of_item == b) for b in set(self.bucket_of_item.tolist())}

    def __len__(self) -> int:
        return len(self.source)

    def bucket(self, index: int) -> Bucket:
        return self.buckets[int(self.bucket_of_item[index])]

    def describe(self, index: int) -> str:
        """Where item `index`'s image comes from (a path, or dataset[row])."""
        return self.base._describe(int(self.source[index]))

    def crop(self, index: int, image, flip: bool = False) -> torch.Tensor:
        """Item `index`'s pixels from its decoded image: resized to cover its bucket, cropped at its box."""
        if (image.size[1], image.size[0]) != tuple(self.original[index]):
            raise DataError(f"{self.describe(index)}: is {image.size[1]}x{image.size[0]} now, "
                            f"{self.original[index][0]}x{self.original[index][1]} when the buckets were chosen")
        height, width = self.bucket(index)
        top, left = (int(v) for v in self.crop_box[index, :2])
        return image_to_tensor(cover_crop(image, height, width, top, left), flip)

    def load(self, index: int, flip: bool = False):
        """Item `index` in its bucket; if its image cannot be decoded, the next decodable item of the same bucket
        (counted in `skipped`), so a batch keeps one shape."""
        same = self._same[int(self.bucket_of_item[index])]
        start = int(np.searchsorted(same, index))
        tries = min(len(same), MAX_CONSECUTIVE_SKIPS)
        for skipped in range(tries):
            i = int(same[(start + skipped) % len(same)])
            j = int(self.source[i])
            try:
                image = self.base.decode(j)
            except _DECODE_ERRORS as e:
                self.base._record_skip(j, e)
                continue
            return self.base._item(j, self.crop(i, image, flip), skipped, size_of(*self.original[i]))
        raise DataError(f"{self.describe(index)}: does not decode, nor does any other image of its bucket "
                        f"{'x'.join(map(str, self.bucket(index)))} ({tries} tried); remove it, or cache the data "
                        f"(cache-latents --buckets skips it)")

    def __getitem__(self, index: int):
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        return self.load(index, flip)
