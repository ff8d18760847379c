# Training data sources for fine-tuning: image folders, Hugging Face datasets, cached VAE latents.
#
# Every source yields `Sample(x, label, skipped)`; the default DataLoader collate keeps the named
# fields. `skipped` counts unreadable files passed over to produce the item, so a loop can sum it
# across batches even when the reading happens in worker processes (each worker also logs the path).
# Image preprocessing follows DiT's train.py: ADM center crop, random horizontal flip, [-1, 1].
import io
import json
import logging
import os
import re
from importlib import resources
from typing import Dict, List, NamedTuple, Optional, Union

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
    """One training item: x (C, H, W) float32, its class label, and unreadable files passed over to get it."""

    x: torch.Tensor
    label: int
    skipped: int


class CaptionSample(NamedTuple):
    """One text-to-image training item read from images: x (C, H, W) float32 and its caption."""

    x: torch.Tensor
    caption: str
    skipped: int


class EncodedSample(NamedTuple):
    """One text-to-image training item read from a cache: the latent and its caption's encoded tokens
    {"embeds": (T, D), "mask": (T,)}."""

    x: torch.Tensor
    text: Dict[str, torch.Tensor]
    skipped: int


#################################################################################
#                                 Transforms                                    #
#################################################################################

def center_crop_arr(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop: BOX-halve while the short side >= 2x, BICUBIC to the short side, crop the middle."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return Image.fromarray(arr[top: top + resolution, left: left + resolution])


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

    def _item(self, index: int, x: torch.Tensor, skipped: int):
        return Sample(x, int(self.labels[index]), skipped)

    def load(self, index: int, flip: bool = False) -> Sample:
        """Item `index`, or the next readable one if its file cannot be decoded (counted in `skipped`)."""
        tries = min(len(self), MAX_CONSECUTIVE_SKIPS)
        for skipped in range(tries):
            j = (index + skipped) % len(self)
            try:
                with self._open(j) as opened:  # closes the file; convert forces the full decode here
                    image = opened.convert("RGB")
            except _DECODE_ERRORS as e:
                self._record_skip(j, e)
                continue
            x = image_to_tensor(center_crop_arr(image, self.resolution), flip)
            return self._item(j, x, skipped)
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

    def _item(self, index: int, x: torch.Tensor, skipped: int) -> CaptionSample:
        return CaptionSample(x, self.captions[index], skipped)


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

    def _item(self, index: int, x: torch.Tensor, skipped: int):
        if self.captions is None:
            return super()._item(index, x, skipped)
        return CaptionSample(x, self.captions[index], skipped)

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
        return Sample(x.flip(-1) if flip else x, int(self.labels[index]), 0)

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
                       kind: str = "auto", captions: bool = False, caption_column: str = "caption"):
    """Open an image folder, saved HF dataset or latent cache, checked against the model's shape and classes;
    with `captions`, their captioned kinds (sidecar .txt captions, a caption column, a cache with text)."""
    path = os.fspath(path)
    kind = detect_data_kind(path) if kind == "auto" else kind
    factor = vae_downsample * patch_size
    if kind != "latents" and (resolution <= 0 or resolution % factor):  # a cache is checked by its own shape
        raise DataError(f"resolution {resolution} is not a positive multiple of {factor} "
                        f"(VAE downsampling {vae_downsample} x patch size {patch_size})")
    if kind == "latents":
        from .latents import CachedLatentsDataset

        ds = CachedLatentsDataset(path, random_flip=random_flip)
        if ds.resolution != resolution:
            raise DataError(f"{path}: latents were cached at resolution {ds.resolution}, training asks for {resolution}")
        if captions != (ds.text is not None):
            raise DataError(f"{path}: the cache holds {'no ' if captions else ''}encoded captions, but the model is "
                            f"{'text' if captions else 'class'}-conditional")
    elif kind == "hf":
        ds = HFImageDataset(path, resolution, image_column, label_column, split, random_flip,
                            caption_column=caption_column if captions else None)
    elif kind == "images":
        ds = CaptionedImageFolder(path, resolution, random_flip) if captions else \
            ImageFolderDataset(path, resolution, class_map, random_flip)
    else:
        raise DataError(f"unknown data kind {kind!r}; expected auto, images, hf or latents")
    if not captions:
        check_labels(ds.labels, num_classes, path, getattr(ds, "label_names", None))
    return ds
