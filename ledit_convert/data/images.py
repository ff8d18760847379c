# Training data sources for fine-tuning: image folders, Hugging Face datasets, cached VAE latents.
#
# Every source yields `Sample(x, label, skipped, size)`; the default DataLoader collate keeps the named
# fields. `skipped` counts unreadable files passed over to produce the item, so a loop can sum it
# across batches even when the reading happens in worker processes (each worker also logs the path).
# `size` is the (height, width) PixArt-alpha's micro-conditions name: the training size for square
# crops, the image's original size for aspect-ratio buckets (as PixArt trained its multi-aspect models).
# Image preprocessing follows DiT's train.py: ADM center crop, random horizontal flip, [-1, 1];
# bucketed data (buckets.py) resizes to cover its bucket the same way and crops to it.
import io
import json
import logging
import os
import re
from importlib import resources
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, first_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SYNSET_PATTERN = re.compile(r"n\d{8}")
HF_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
# a run of unreadable files this long means a broken dataset, not a few bad files
MAX_CONSECUTIVE_SKIPS = 100
# PIL's own failures on bad files: truncated data, unknown format, bad headers, oversized images
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class Sample(NamedTuple):
    """One training item: x (C, H, W) float32, its class label, unreadable files passed over to get it, and the
    (height, width) its micro-conditions name (float32 (2,))."""

    x: torch.Tensor
    label: int
    skipped: int
    size: torch.Tensor


class CaptionSample(NamedTuple):
    """One text-to-image training item read from images: x (C, H, W) float32 and its caption."""

    x: torch.Tensor
    caption: str
    skipped: int
    size: torch.Tensor


class EncodedSample(NamedTuple):
    """One text-to-image training item read from a cache: the latent and its caption's encoded tokens
    {"embeds": (T, D), "mask": (T,)}."""

    x: torch.Tensor
    text: Dict[str, torch.Tensor]
    skipped: int
    size: torch.Tensor


def size_of(height: float, width: float) -> torch.Tensor:
    """A sample's `size` field."""
    return torch.tensor([float(height), float(width)])


#################################################################################
#                                 Transforms                                    #
#################################################################################

def cover_size(height: int, width: int, bucket_height: int, bucket_width: int) -> Tuple[int, int, int]:
    """How `cover_crop` resizes a height x width image to cover the bucket: (BOX halvings, resized height, resized
    width). It halves while the halved image still covers the bucket, then scales to just cover it."""
    halvings = 0
    while width >= 2 * bucket_width and height >= 2 * bucket_height:
        width, height, halvings = width // 2, height // 2, halvings + 1
    scale = max(bucket_height / height, bucket_width / width)
    return halvings, max(bucket_height, round(height * scale)), max(bucket_width, round(width * scale))


def cover_crop(image: Image.Image, height: int, width: int, top: Optional[int] = None,
               left: Optional[int] = None) -> Image.Image:
    """ADM's crop, to any size: BOX-halve while the halved image still covers height x width, BICUBIC to just cover
    it (`cover_size`), crop at (top, left) of the resized image (default: the middle)."""
    halvings, new_height, new_width = cover_size(image.size[1], image.size[0], height, width)
    for _ in range(halvings):
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    image = image.resize((new_width, new_height), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (new_height - height) // 2 if top is None else top
    left = (new_width - width) // 2 if left is None else left
    return Image.fromarray(arr[top: top + height, left: left + width])


def center_crop_arr(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop: BOX-halve while the short side >= 2x, BICUBIC to the short side, crop the middle."""
    return cover_crop(image, resolution, resolution)


def image_to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1], optionally mirrored left-right."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    x = (x.float() / 255.0 - 0.5) / 0.5  # ToTensor then Normalize(0.5, 0.5), in DiT's order
    return x.flip(-1) if flip else x


#################################################################################
#                               Class mappings                                  #
#################################################################################

def imagenet_synsets() -> List[str]:
    """The 1000 ImageNet-1k synset ids in class-index order (the sorted list)."""
    text = resources.files("ledit_convert.data").joinpath("imagenet_synsets.txt").read_text()
    synsets = text.split()
    assert len(synsets) == 1000 and synsets == sorted(synsets), "imagenet_synsets.txt is damaged"
    return synsets


def load_class_map(path: Union[str, os.PathLike]) -> Dict[str, int]:
    """Read a user class map: JSON {folder_name: id} or text lines "folder_name id"."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read class map ({e.strerror or e})") from None
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
            return {str(k): int(v) for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: class map is not a JSON object of name -> integer id ({e})") from None
    mapping = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected 'folder_name id', got {line.strip()!r}")
        mapping[parts[0]] = int(parts[1])
    return mapping


#################################################################################
#                               Image datasets                                  #
#################################################################################

class _ImageDataset(torch.utils.data.Dataset):
    """Shared decode / crop / flip / skip logic; subclasses say how to open item i."""

    def __init__(self, resolution: int, random_flip: bool):
        self.resolution = resolution
        self.random_flip = random_flip
        self.skipped_paths: List[str] = []  # this process only; workers report through Sample.skipped

    def _open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def _item(self, index: int, x: torch.Tensor, skipped: int, size: torch.Tensor):
        return Sample(x, int(self.labels[index]), skipped, size)

    def decode(self, index: int) -> Image.Image:
        """Image `index` fully decoded as RGB; PIL's errors on a bad file propagate (see `_DECODE_ERRORS`)."""
        with self._open(index) as opened:  # closes the file; convert forces the full decode here
            return opened.convert("RGB")

    def image_size(self, index: int) -> Optional[Tuple[int, int]]:
        """(height, width) of image `index` from its header alone, or None (logged) when it cannot be read."""
        try:
            with self._open(index) as opened:
                return opened.size[1], opened.size[0]
        except _DECODE_ERRORS as e:
            self._record_skip(index, e)
            return None

    def load(self, index: int, flip: bool = False) -> Sample:
        """Item `index`, or the next readable one if its file cannot be decoded (counted in `skipped`)."""
        tries = min(len(self), MAX_CONSECUTIVE_SKIPS)
        for skipped in range(tries):
            j = (index + skipped) % len(self)
            try:
                image = self.decode(j)
            except _DECODE_ERRORS as e:
                self._record_skip(j, e)
                continue
            x = image_to_tensor(center_crop_arr(image, self.resolution), flip)
            return self._item(j, x, skipped, size_of(self.resolution, self.resolution))
        raise DataError(f"{self._describe(index)}: {tries} unreadable images in a row"
                        + (", every image of the dataset" if tries == len(self) else "; the dataset looks corrupt"))

    def __getitem__(self, index: int) -> Sample:
        # the global RNG: DataLoader seeds it per worker, so a seeded run flips the same images
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        return self.load(index, flip)

    def _record_skip(self, index: int, error: Exception):
        where = self._describe(index)
        if where not in self.skipped_paths:
            self.skipped_paths.append(where)
            logger.warning("skipping unreadable image %s: %s", where, error)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(root: str) -> List[str]:
    """Image files under `root`, recursively, in sorted (reproducible) order; links followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return found


class _FolderDataset(_ImageDataset):
    """Image files under `self.root`, named by relative paths in `self._paths`."""

    def _open(self, index: int) -> Image.Image:
        return Image.open(self._describe(index))

    def _describe(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def key(self, index: int) -> str:
        """Image `index`'s name within the dataset (its path relative to the root): what a cache records."""
        return os.fsdecode(self._paths[index])


class ImageFolderDataset(_FolderDataset):
    """ImageNet-layout folder (one subfolder per class) or a flat folder of one class, ADM-cropped."""

    def __init__(self, root: Union[str, os.PathLike], resolution: int,
                 class_map: Union[None, str, os.PathLike, Dict[str, int]] = None, random_flip: bool = True):
        super().__init__(resolution, random_flip)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: not a readable folder")
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"{self.root}: cannot list folder ({e.strerror or e})") from None
        folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        if folders:
            self.classes, label_of = folders, self._label_ids(folders, class_map)
            files = []
            for name in folders:
                found = list_images(os.path.join(self.root, name))
                if not found:
                    logger.warning("class folder %s holds no images", os.path.join(self.root, name))
                files += [(p, label_of[name]) for p in found]
            if any(e.is_file() and _is_image(e.name) for e in entries):
                logger.warning("%s: images directly in the root are ignored next to class subfolders", self.root)
        else:  # a flat folder is one class, label 0
            self.classes = [os.path.basename(os.path.normpath(self.root))]
            files = [(e.path, 0) for e in entries if e.is_file() and _is_image(e.name)]
        if not files:
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        # numpy byte strings instead of a list of str: DataLoader workers read them without the
        # copy-on-write blow-up that refcounted Python objects cause on a 1.28M-file dataset
        self._paths = np.array([os.fsencode(os.path.relpath(p, self.root)) for p, _ in files])
        self.labels = np.array([label for _, label in files], dtype=np.int64)
        self.label_names = {v: k for k, v in label_of.items()} if folders else {0: self.classes[0]}

    def _label_ids(self, folders: List[str], class_map) -> Dict[str, int]:
        """Subfolder -> label: the user map, else ImageNet-1k ids for synset folders, else sorted order."""
        if class_map is not None:
            mapping = class_map if isinstance(class_map, dict) else load_class_map(class_map)
            missing = [f for f in folders if f not in mapping]
            if missing:
                raise DataError(f"{self.root}: class folder {missing[0]!r} is not in the class map "
                                f"({len(missing)} folders missing)")
            return {f: int(mapping[f]) for f in folders}
        if all(SYNSET_PATTERN.fullmatch(f) for f in folders):
            index = {s: i for i, s in enumerate(imagenet_synsets())}
            unknown = [f for f in folders if f not in index]
            if unknown:
                raise DataError(f"{self.root}: folder {unknown[0]!r} looks like a synset id but is not one "
                                f"of the ImageNet-1k classes; pass a class map")
            return {f: index[f] for f in folders}
        return {f: i for i, f in enumerate(folders)}


class CaptionedImageFolder(_FolderDataset):
    """Images anywhere under a folder, each with its caption in a sidecar text file of the same name
    (cat.jpg + cat.txt), ADM-cropped."""

    def __init__(self, root: Union[str, os.PathLike], resolution: int, random_flip: bool = True):
        super().__init__(resolution, random_flip)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: not a readable folder")
        files = list_images(self.root)
        if not files:
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        sidecars = [os.path.splitext(p)[0] + ".txt" for p in files]
        missing = [p for p in sidecars if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{missing[0]}: caption missing ({len(missing)} of {len(files)} images have no sidecar "
                            f".txt caption)")
        self.captions = [read_caption(p) for p in sidecars]
        self._paths = np.array([os.fsencode(os.path.relpath(p, self.root)) for p in files])
        self.labels = np.zeros(len(files), dtype=np.int64)  # one class: text models take no class ids

    def _item(self, index: int, x: torch.Tensor, skipped: int, size: torch.Tensor) -> CaptionSample:
        return CaptionSample(x, self.captions[index], skipped, size)


def read_caption(path: str) -> str:
    """A sidecar caption: the whole file, whitespace-trimmed."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read caption ({getattr(e, 'strerror', None) or e})") from None


class HFImageDataset(_ImageDataset):
    """A Hugging Face dataset (save_to_disk folder or local load_dataset source) of images and labels."""

    def __init__(self, path: Union[str, os.PathLike], resolution: int, image_column: str = "image",
                 label_column: str = "label", split: str = "train", random_flip: bool = True,
                 cache_dir: Optional[str] = None, caption_column: Optional[str] = None):
        super().__init__(resolution, random_flip)
        import datasets  # imported here: it is slow to import and only this source needs it

        self.path = os.fspath(path)
        try:
            if is_hf_saved_dataset(self.path):
                ds = datasets.load_from_disk(self.path)
            else:
                ds = datasets.load_dataset(self.path, split=split, cache_dir=cache_dir)
        except Exception as e:  # datasets raises many types; the user needs the path and the reason
            raise DataError(f"{self.path}: cannot load as a Hugging Face dataset ({first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{self.path}: no split {split!r}; splits are {sorted(ds)}")
            ds = ds[split]
        second = caption_column or label_column
        missing = [c for c in (image_column, second) if c not in ds.column_names]
        if missing:
            raise DataError(f"{self.path}: no column {missing[0]!r}; columns are {ds.column_names} "
                            f"(choose with image_column / {'caption' if caption_column else 'label'}_column)")
        self.ds = ds.select_columns([image_column, second])
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        self.captions = None
        if caption_column is not None:
            self.captions = [str(c or "").strip() for c in self.ds[caption_column]]
            if not self.captions:
                raise DataError(f"{self.path}: split {split!r} is empty")
            self.labels, self.classes = np.zeros(len(self.captions), dtype=np.int64), []
            return
        labels = self.ds.select_columns([label_column]).with_format("numpy")[:][label_column]
        if labels.dtype.kind not in "iu":
            raise DataError(f"{self.path}: label column {label_column!r} holds {labels.dtype}, not integer class ids")
        self.labels = labels.astype(np.int64)
        if len(self.labels) == 0:
            raise DataError(f"{self.path}: split {split!r} is empty")
        feature = ds.features.get(label_column)
        self.classes = list(getattr(feature, "names", None) or [])

    def _item(self, index: int, x: torch.Tensor, skipped: int, size: torch.Tensor):
        if self.captions is None:
            return super()._item(index, x, skipped, size)
        return CaptionSample(x, self.captions[index], skipped, size)

    def _open(self, index: int) -> Image.Image:
        value = self.ds[index][self.image_column]  # the Image feature decodes here, inside load's try
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        if isinstance(value, str):
            return Image.open(value)
        if isinstance(value, np.ndarray):
            return Image.fromarray(value)
        raise DataError(f"{self.path}: column {self.image_column!r} holds {type(value).__name__}, not images")

    def _describe(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def key(self, index: int) -> str:
        """Row `index`'s name within the dataset: what a cache records."""
        return str(index)


#################################################################################
#                              Opening a data path                              #
#################################################################################

class ArrayImageDataset(torch.utils.data.Dataset):
    """Images already in memory (uint8 NHWC) with labels; `.load(i, flip)` like the file-backed datasets."""

    def __init__(self, images: np.ndarray, labels, random_flip: bool = True):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise DataError(f"{len(images)} images but {len(self.labels)} labels")
        self.random_flip = random_flip
        self.resolution = images.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, flip: bool = False) -> Sample:
        """Image `index` as float CHW in [-1, 1], mirrored when `flip`."""
        x = self.images[index].permute(2, 0, 1).float() / 127.5 - 1.0
        return Sample(x.flip(-1) if flip else x, int(self.labels[index]), 0, size_of(*x.shape[-2:]))

    def __getitem__(self, index: int) -> Sample:
        return self.load(index, self.random_flip and bool(torch.rand(()) < 0.5))


def is_hf_saved_dataset(path: Union[str, os.PathLike]) -> bool:
    """True for a folder written by Dataset(Dict).save_to_disk."""
    return any(os.path.isfile(os.path.join(path, m)) for m in HF_SAVED_MARKERS)


def detect_data_kind(path: Union[str, os.PathLike]) -> str:
    """'latents' (index.json or latent shards), 'hf' (save_to_disk folder) or 'images'."""
    from .latents import is_latent_cache  # latents.py imports this module, so import late

    if not os.path.isdir(path):
        raise DataError(f"{os.fspath(path)}: not a readable folder")
    if is_latent_cache(path):
        return "latents"
    return "hf" if is_hf_saved_dataset(path) else "images"


def check_labels(labels: np.ndarray, num_classes: int, where: str, names: Optional[Dict[int, str]] = None):
    """Raise DataError if a label is outside [0, num_classes)."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        worst = int(bad.max()) if bad.max() >= num_classes else int(bad.min())
        name = f" (class {names[worst]!r})" if names and worst in names else ""
        raise DataError(f"{where}: label {worst}{name} is outside the model's {num_classes} classes "
                        f"({bad.size} samples affected)")


def open_training_data(path: Union[str, os.PathLike], resolution: int, num_classes: int, patch_size: int = 2,
                       random_flip: bool = True, class_map=None, image_column: str = "image",
                       label_column: str = "label", split: str = "train", vae_downsample: int = 8,
                       kind: str = "auto", captions: bool = False, caption_column: str = "caption",
                       buckets: Optional[str] = None, bucket_crop: str = "center", bucket_max_upscale: float = 1.0,
                       seed: int = 0):
    """Open an image folder, saved HF dataset or latent cache, checked against the model's shape and classes;
    with `captions`, their captioned kinds (sidecar .txt captions, a caption column, a cache with text). A
    bucketed cache comes in its buckets; images come in `buckets` (a bucket spec, buckets.parse_buckets) when
    given."""
    path = os.fspath(path)
    kind = detect_data_kind(path) if kind == "auto" else kind
    factor = vae_downsample * patch_size
    if kind != "latents" and (resolution <= 0 or resolution % factor):  # a cache is checked by its own shape
        raise DataError(f"resolution {resolution} is not a positive multiple of {factor} "
                        f"(VAE downsampling {vae_downsample} x patch size {patch_size})")
    if kind == "latents":
        ds = _open_cache(path, resolution, random_flip, captions, buckets)
    elif kind == "hf":
        ds = HFImageDataset(path, resolution, image_column, label_column, split, random_flip,
                            caption_column=caption_column if captions else None)
    elif kind == "images":
        ds = CaptionedImageFolder(path, resolution, random_flip) if captions else \
            ImageFolderDataset(path, resolution, class_map, random_flip)
    else:
        raise DataError(f"unknown data kind {kind!r}; expected auto, images, hf or latents")
    if buckets is not None and kind != "latents":
        from .buckets import BucketedImages, parse_buckets
        groups = parse_buckets(buckets, factor)
        if resolution not in groups:
            raise DataError(f"buckets {buckets!r} are at resolution(s) {', '.join(map(str, groups))}; set the "
                            f"recipe's resolution (the size evaluations default to) to one of them")
        ds = BucketedImages(ds, groups, bucket_crop, bucket_max_upscale, seed)
    if not captions:
        check_labels(ds.labels, num_classes, path, getattr(ds, "label_names", None))
    return ds


def _open_cache(path: str, resolution: int, random_flip: bool, captions: bool, buckets: Optional[str]):
    """A square or bucketed latent cache, checked against the training's resolution and conditioning."""
    from .bucket_cache import BucketedLatents
    from .latents import INDEX_FILE, CachedLatentsDataset
    from ..conversion.checkpoints import read_json

    index = os.path.join(path, INDEX_FILE)
    bucketed = os.path.isfile(index) and bool(read_json(index, DataError).get("bucketed"))
    if buckets is not None:
        raise DataError(f"{path}: a latent cache is bucketed (or not) when it is cached; the recipe's buckets "
                        f"{buckets!r} apply to image data (drop the key, or cache with --buckets)")
    if bucketed:
        ds = BucketedLatents(path, random_flip=random_flip)
        if resolution not in ds.groups:
            raise DataError(f"{path}: buckets were cached at resolution(s) {', '.join(map(str, ds.groups))}; set "
                            f"the recipe's resolution (the size evaluations default to) to one of them")
    else:
        ds = CachedLatentsDataset(path, random_flip=random_flip)
        if ds.resolution != resolution:
            raise DataError(f"{path}: latents were cached at resolution {ds.resolution}, training asks for {resolution}")
    if captions != (ds.text is not None):
        raise DataError(f"{path}: the cache holds {'no ' if captions else ''}encoded captions, but the model is "
                        f"{'text' if captions else 'class'}-conditional")
    return ds
