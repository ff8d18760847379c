"""Training data sources: image folders, HF datasets, latent caches, and open_training_data checks."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ledit_convert.data.images import (HFImageDataset, ImageFolderDataset, Sample, center_crop_arr, imagenet_synsets,
                                open_training_data)
from ledit_convert.errors import DataError, OutputExistsError
from ledit_convert.data.latents import CachedLatentsDataset, cache_latents

RES = 16


def write_image(path, size, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_folder(root, classes=("a", "b", "c"), per_class=4, seed=0, ext=".png"):
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            size = tuple(int(s) for s in rng.integers(20, 70, 2))
            write_image(root / name / f"img{i}{ext}", size, seed * 100 + ci * 10 + i)
    return root


def reference_crop(image, resolution):
    """ADM center crop re-derived with PIL crop boxes (the module slices a numpy array)."""
    w, h = image.size
    while min(w, h) >= 2 * resolution:
        w, h = w // 2, h // 2
        image = image.resize((w, h), Image.BOX)
    s = resolution / min(w, h)
    w, h = round(w * s), round(h * s)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         layers_per_block=1, norm_num_groups=8, sample_size=RES).eval()


# ------------------------------------------------------------------ image folders

def test_folder_labels_shapes_and_range(tmp_path):
    ds = ImageFolderDataset(make_folder(tmp_path), RES)
    assert len(ds) == 12 and ds.classes == ["a", "b", "c"]
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    x, label, skipped, size = ds[5]
    assert x.shape == (3, RES, RES) and x.dtype == torch.float32 and label == 1 and skipped == 0
    assert size.tolist() == [RES, RES]  # what PixArt-alpha's micro-conditions name for a square crop
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # random pixels, averaged by the resize


def test_center_crop_matches_reference_on_non_square(tmp_path):
    for (w, h), res in [((100, 37), 16), ((37, 100), 16), ((300, 200), 32), ((17, 40), 16), ((64, 64), 16)]:
        path = write_image(tmp_path / f"{w}x{h}.png", (w, h), seed=w * h)
        image = Image.open(path).convert("RGB")
        out = center_crop_arr(image, res)
        ref = reference_crop(image, res)
        assert out.size == (res, res)
        assert np.array_equal(np.asarray(out), np.asarray(ref)), (w, h)
    # through the dataset: same pixels, mapped to [-1, 1] in float64 as (p / 255 - 0.5) / 0.5
    os.makedirs(tmp_path / "flat")
    write_image(tmp_path / "flat" / "wide.PNG", (100, 37), seed=1)
    ds = ImageFolderDataset(tmp_path / "flat", RES, random_flip=False)
    ref = np.asarray(reference_crop(Image.open(tmp_path / "flat" / "wide.PNG").convert("RGB"), RES), dtype=np.float64)
    expected = torch.from_numpy((ref / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(ds[0].x.double(), expected, atol=1e-6, rtol=0)


def test_flip(tmp_path):
    ds = ImageFolderDataset(make_folder(tmp_path), RES)
    plain, mirrored = ds.load(3, flip=False).x, ds.load(3, flip=True).x
    assert torch.equal(mirrored, plain.flip(-1)) and not torch.equal(mirrored, plain)
    torch.manual_seed(7)
    first = [ds[3].x for _ in range(20)]
    torch.manual_seed(7)
    assert all(torch.equal(a, ds[3].x) for a in first)  # reproducible under a seeded global RNG
    flips = [torch.equal(a, mirrored) for a in first]
    assert 0 < sum(flips) < 20  # both orientations occur
    assert torch.equal(ImageFolderDataset(tmp_path, RES, random_flip=False)[3].x, plain)


def test_corrupt_images_skipped_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path)
    (root / "b" / "img1_garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    good = root / "b" / "img2.png"
    write_image(root / "b" / "whole.jpg", (40, 40), seed=3)
    data = (root / "b" / "whole.jpg").read_bytes()
    (root / "b" / "img3_truncated.JPG").write_bytes(data[: len(data) // 3])
    ds = ImageFolderDataset(root, RES, random_flip=False)
    assert len(ds) == 15  # the broken files are listed; they are only found out when read
    names = [os.path.relpath(ds._describe(i), root) for i in range(len(ds))]
    garbage = names.index("b/img1_garbage.jpg")
    item = ds[garbage]
    assert item.skipped == 1 and item.label == 1
    assert torch.equal(item.x, ds[names.index("b/img2.png")].x)  # the next readable image stands in
    truncated = names.index("b/img3_truncated.JPG")
    assert ds[truncated].skipped == 1
    assert sorted(os.path.basename(p) for p in ds.skipped_paths) == ["img1_garbage.jpg", "img3_truncated.JPG"]
    assert "img1_garbage.jpg" in caplog.text
    # with worker processes the count travels in the batch
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    total = sum(int(batch.skipped.sum()) for batch in loader)
    assert total == 2 and isinstance(next(iter(loader)), Sample)
    assert good.exists()


def test_all_unreadable_is_a_data_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="unreadable images in a row"):
        ImageFolderDataset(tmp_path, RES)[0]


def test_synset_folders_use_imagenet_indices(tmp_path):
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets[999] == "n15075141"
    assert synsets.index("n02099601") == 207  # golden retriever, a well-known index
    ds = ImageFolderDataset(make_folder(tmp_path, classes=("n01440764", "n01443537", "n15075141"), per_class=1), RES)
    assert ds.labels.tolist() == [0, 1, 999]
    with pytest.raises(DataError, match="n00000001"):
        ImageFolderDataset(make_folder(tmp_path / "bad", classes=("n01440764", "n00000001"), per_class=1), RES)


def test_class_map_overrides(tmp_path):
    root = make_folder(tmp_path / "d", classes=("n01440764", "dog"), per_class=1)
    (tmp_path / "map.json").write_text(json.dumps({"n01440764": 5, "dog": 2}))
    assert ImageFolderDataset(root, RES, class_map=tmp_path / "map.json").labels.tolist() == [2, 5]
    (tmp_path / "map.txt").write_text("# name id\nn01440764 7\ndog 3\n")
    assert ImageFolderDataset(root, RES, class_map=tmp_path / "map.txt").labels.tolist() == [3, 7]
    assert ImageFolderDataset(root, RES, class_map={"dog": 0, "n01440764": 1}).labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="'n01440764' is not in the class map"):
        ImageFolderDataset(root, RES, class_map={"dog": 0})
    (tmp_path / "broken.txt").write_text("dog\n")
    with pytest.raises(DataError, match="broken.txt:1"):
        ImageFolderDataset(root, RES, class_map=tmp_path / "broken.txt")


def test_flat_folder_is_class_zero(tmp_path):
    for i, ext in enumerate([".png", ".bmp", ".webp", ".jpeg"]):
        write_image(tmp_path / f"i{i}{ext}", (30, 20), seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, RES)
    assert len(ds) == 4 and ds.labels.tolist() == [0] * 4 and ds[2].x.shape == (3, RES, RES)


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        ImageFolderDataset(tmp_path / "nope", RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        ImageFolderDataset(tmp_path / "empty", RES)
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", RES)


# ------------------------------------------------------------------ Hugging Face datasets

def save_hf(tmp_path, as_dict=False):
    import datasets

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 40, 3), dtype=np.uint8)) for i in range(5)]
    features = datasets.Features({"img": datasets.Image(), "cls": datasets.ClassLabel(names=["x", "y", "z"])})
    ds = datasets.Dataset.from_dict({"img": images, "cls": [0, 2, 1, 1, 0]}, features=features)
    path = tmp_path / "hf"
    (datasets.DatasetDict({"train": ds, "validation": ds}) if as_dict else ds).save_to_disk(str(path))
    return path, images


def test_hf_saved_dataset(tmp_path):
    path, images = save_hf(tmp_path)
    ds = HFImageDataset(path, RES, image_column="img", label_column="cls", random_flip=False)
    assert len(ds) == 5 and ds.labels.tolist() == [0, 2, 1, 1, 0] and ds.classes == ["x", "y", "z"]
    ref = np.asarray(reference_crop(images[1], RES), dtype=np.float64)
    torch.testing.assert_close(ds[1].x.double(), torch.from_numpy(ref / 127.5 - 1).permute(2, 0, 1), atol=1e-6, rtol=0)
    assert ds[1].label == 2
    with pytest.raises(DataError, match="no column 'image'; columns are"):
        HFImageDataset(path, RES)
    opened = open_training_data(path, RES, num_classes=3, image_column="img", label_column="cls")
    assert isinstance(opened, HFImageDataset)


def test_hf_dataset_dict_split(tmp_path):
    path, _ = save_hf(tmp_path, as_dict=True)
    ds = HFImageDataset(path, RES, "img", "cls", split="validation")
    assert len(ds) == 5
    with pytest.raises(DataError, match="no split 'test'"):
        HFImageDataset(path, RES, "img", "cls", split="test")


def test_hf_load_dataset_imagefolder(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    ds = HFImageDataset(root, RES, cache_dir=str(tmp_path / "cache"))  # the imagefolder builder, offline
    assert len(ds) == 6 and sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert ds[0].x.shape == (3, RES, RES)


# ------------------------------------------------------------------ latent caches

def test_cache_latents_roundtrip(tmp_path):
    images = ImageFolderDataset(make_folder(tmp_path / "imgs", per_class=3), RES)
    vae = tiny_vae()
    out = tmp_path / "lat"
    seen = []
    index = cache_latents(images, vae, out, batch_size=4, shard_size=4, storage_dtype=torch.float32,
                          progress=lambda done, n: seen.append((done, n)))
    assert sorted(os.listdir(out)) == ["index.json"] + [f"latents_{k:05d}.safetensors" for k in range(3)]
    assert index["count"] == 9 and index["latent_shape"] == [4, 8, 8] and index["resolution"] == RES
    assert index["scaling_factor"] == pytest.approx(0.18215) and index["classes"] == ["a", "b", "c"]
    assert seen[-1] == (9, 9)
    lat = CachedLatentsDataset(out)
    assert len(lat) == 9 and lat.labels.tolist() == images.labels.tolist()
    with torch.no_grad():
        x = torch.stack([images.load(i).x for i in range(9)])
        dist = vae.encode(x).latent_dist
        dist_flip = vae.encode(x.flip(-1)).latent_dist
    for i in (0, 4, 8):
        mean, std = lat.posterior(i)
        torch.testing.assert_close(mean, dist.mean[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std, dist.std[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lat.posterior(i, flip=True)[0], dist_flip.mean[i], atol=1e-5, rtol=1e-5)
    # a sample: (mean + std * eps) * scaling_factor, flip and eps from the seeded global RNG
    torch.manual_seed(11)
    item = lat[4]
    torch.manual_seed(11)
    flip = bool(torch.rand(()) < 0.5)
    mean, std = (dist_flip if flip else dist).mean[4], (dist_flip if flip else dist).std[4]
    torch.testing.assert_close(item.x, (mean + std * torch.randn(mean.shape)) * 0.18215, atol=1e-5, rtol=1e-5)
    assert item.label == images.labels[4] and item.skipped == 0
    with pytest.raises(OutputExistsError):
        cache_latents(images, vae, out)


def test_cache_float16_default_and_corrupt_skip(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    (root / "a" / "img0z.jpg").write_bytes(b"garbage")
    images = ImageFolderDataset(root, RES)
    vae = tiny_vae()
    index = cache_latents(images, vae, tmp_path / "lat", batch_size=3, shard_size=100, flip_variants=False)
    assert index["count"] == 6 and index["skipped"] == 1 and index["storage_dtype"] == "float16"
    with pytest.raises(DataError, match="without flip variants"):
        CachedLatentsDataset(tmp_path / "lat")
    lat = CachedLatentsDataset(tmp_path / "lat", random_flip=False)
    assert lat.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        mean = vae.encode(images.load(3).x[None]).latent_dist.mean[0]  # cached item 2 is file 3, b/img0.png
    torch.testing.assert_close(lat.posterior(2)[0], mean, atol=2e-3, rtol=1e-3)


def test_interrupted_cache_rejected_and_resumed(tmp_path):
    images = ImageFolderDataset(make_folder(tmp_path / "imgs", per_class=2), RES)
    out = tmp_path / "lat"
    cache_latents(images, tiny_vae(), out, batch_size=2, shard_size=2)
    os.remove(out / "index.json")  # as if the run died before the end
    for opener in (lambda: CachedLatentsDataset(out), lambda: open_training_data(out, RES, num_classes=3)):
        with pytest.raises(DataError, match="incomplete"):
            opener()
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    os.remove(out / "latents_00002.safetensors")
    index = cache_latents(images, tiny_vae(), out, batch_size=2, shard_size=2)  # resumes
    assert index["count"] == 6
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in stamps.items() if n != "latents_00002.safetensors")
    assert len(CachedLatentsDataset(out)) == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.json").write_text("{}")
    with pytest.raises(DataError, match="not a valid latent cache"):
        CachedLatentsDataset(tmp_path / "other")
    with pytest.raises(DataError, match="not a latent cache"):
        CachedLatentsDataset(tmp_path / "imgs")


# ------------------------------------------------------------------ open_training_data

def test_open_training_data_checks(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=1)
    assert isinstance(open_training_data(root, RES, num_classes=3, patch_size=2), ImageFolderDataset)
    with pytest.raises(DataError, match=r"label 2 \(class 'c'\) is outside the model's 2 classes"):
        open_training_data(root, RES, num_classes=2)
    with pytest.raises(DataError, match="resolution 24 is not a positive multiple of 16"):
        open_training_data(root, 24, num_classes=3, patch_size=2)
    assert len(open_training_data(root, 32, num_classes=3, patch_size=4)) == 3
    cache_latents(ImageFolderDataset(root, RES), tiny_vae(), tmp_path / "lat", batch_size=3)
    assert isinstance(open_training_data(tmp_path / "lat", RES, num_classes=3), CachedLatentsDataset)
    with pytest.raises(DataError, match="label 2 is outside"):
        open_training_data(tmp_path / "lat", RES, num_classes=2)
    with pytest.raises(DataError, match="cached at resolution 16"):
        open_training_data(tmp_path / "lat", 32, num_classes=3)
    with pytest.raises(DataError, match="not a readable folder"):
        open_training_data(tmp_path / "missing", RES, num_classes=3)
