"""Aspect-ratio buckets: which buckets exist, where each image goes and how it is cropped, batches that never mix
shapes (across processes, epochs and restarts), the bucketed latent cache and fine-tuning on it."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _tiny import tiny_vae
from test_finetune import BASE, make_model
from test_sd3_text2image import sd3_pipeline  # noqa: F401 (a fixture)
from test_text2image import pixart_pipeline  # noqa: F401 (a fixture)
from ledit_convert.data.bucket_cache import BucketedLatents, cache_bucketed_latents
from ledit_convert.data.buckets import (SD3_1024, BucketBatchSampler, BucketedImages, closest_bucket,
                                        generate_buckets, parse_buckets)
from ledit_convert.data.images import CaptionedImageFolder, ImageFolderDataset, open_training_data
from ledit_convert.errors import ConfigError, DataError
from ledit_convert.training.finetune import finetune
from ledit_convert.training.recipe import load_recipe

# (height, width) of the generated images: squares, portraits, landscapes, one too small for 32 px buckets
SIZES = [(32, 32), (24, 48), (48, 24), (40, 40), (30, 60), (64, 32), (36, 36), (20, 20), (33, 47), (48, 64)]


def mixed_folder(root: Path, sizes=SIZES, classes=("a", "b"), captions=False, seed=0) -> Path:
    """Class folders (or one captioned folder) of random images of `sizes`."""
    rng = np.random.default_rng(seed)
    for c in classes:
        folder = root / c if not captions else root
        folder.mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            name = f"{c}{i}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
            if captions:
                (folder / f"{name}.txt").write_text(f"a {['red', 'blue'][i % 2]} square")
    return root


# ------------------------------------------------------------------ which buckets exist

@pytest.mark.parametrize("res,align", [(256, 16), (512, 16), (1024, 64), (32, 8)])
def test_generated_buckets_fit_the_area_align_and_come_in_both_orientations(res, align):
    buckets = generate_buckets(res, align)
    assert (res, res) in buckets
    for h, w in buckets:
        assert h % align == 0 and w % align == 0 and h * w <= res * res
        assert max(h / w, w / h) <= 4.0 and (w, h) in buckets
        # the short side is the longest that fits: one more step would exceed the area
        short, long = min(h, w), max(h, w)
        assert (short + align) * long > res * res
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)


def test_named_tables_are_pixarts_and_sd3s_own():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    pixart = parse_buckets("pixart-1024", 64)[1024]
    assert set(pixart) == {(int(h), int(w)) for h, w in ASPECT_RATIO_1024_BIN.values()}
    assert set(parse_buckets("pixart-2048", 64)[2048]) == {(int(h), int(w)) for h, w in ASPECT_RATIO_2048_BIN.values()}
    assert parse_buckets("sd3-1024", 64)[1024] == sorted(SD3_1024, key=lambda b: b[0] / b[1])
    assert all(h * w <= 1024 * 1024 * 1.25 for h, w in SD3_1024)


def test_specs_several_resolutions_explicit_sizes_and_bad_ones():
    groups = parse_buckets("256,384", 16)
    assert list(groups) == [256, 384] and (384, 384) in groups[384]
    explicit = parse_buckets("512x384, 384x512", 16)
    assert explicit == {448: [(384, 512), (512, 384)]}  # sqrt(512 * 384) = 443 -> 448; by aspect ratio
    for bad, what in (("500", "500 is not a multiple of 16"), ("512x380", "512x380 is not a multiple of 16"),
                      ("pixart-300", "pixart-256, pixart-512"), ("huge", "is not N, HxW"), (",", "names no bucket"),
                      ("512,pixart-512", "'pixart-512' is a second group at resolution 512"),
                      ("256,256x256,512x512", "256x256 is in the groups at 256 and at 512")):
        with pytest.raises(ConfigError, match=what):
            parse_buckets(bad, 16)


def test_closest_bucket_is_nearest_in_log_aspect_ratio():
    buckets = [(32, 64), (48, 48), (64, 32)]
    assert closest_bucket(100, 190, buckets) == (32, 64)
    assert closest_bucket(190, 100, buckets) == (64, 32)
    assert closest_bucket(100, 120, buckets) == (48, 48)
    # 1:2 sits exactly between 1:1 and 1:4 in log space: the tie goes to the larger area
    assert closest_bucket(50, 100, [(32, 32), (32, 128)]) == (32, 128)
    assert closest_bucket(50, 100, [(64, 64), (16, 64)]) == (64, 64)


# ------------------------------------------------------------------ where one image goes, and how

def reference_cover_crop(arr: np.ndarray, height: int, width: int, top=None, left=None) -> np.ndarray:
    """ADM's center_crop_arr written out for a height x width target: BOX-halve while both halved sides still cover
    it, BICUBIC so that it just covers, crop (centred unless told)."""
    image = Image.fromarray(arr)
    while image.size[0] // 2 >= width and image.size[1] // 2 >= height:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = max(height / image.size[1], width / image.size[0])
    size = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
    out = np.asarray(image.resize(size, resample=Image.BICUBIC))
    top = (out.shape[0] - height) // 2 if top is None else top
    left = (out.shape[1] - width) // 2 if left is None else left
    return out[top:top + height, left:left + width]


def test_bucketed_items_are_the_reference_crop_of_their_image(tmp_path):
    root = mixed_folder(tmp_path / "imgs", classes=("a",))
    base = ImageFolderDataset(root, 32, random_flip=False)
    ds = BucketedImages(base, parse_buckets("32", 8))
    assert len(ds) == len(SIZES) - 1 and ds.too_small == {32: 1}  # 20x20 would need enlarging
    for i in range(len(ds)):
        path = ds.describe(i)
        arr = np.asarray(Image.open(path).convert("RGB"))
        h, w = ds.bucket(i)
        item = ds.load(i)
        expected = reference_cover_crop(arr, h, w)
        got = ((item.x.permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
        assert got.shape == (h, w, 3) and np.array_equal(got, expected), path
        assert item.size.tolist() == list(arr.shape[:2])  # the original size, for micro-conditions
        assert closest_bucket(*arr.shape[:2], ds.buckets) == (h, w)


def test_a_square_bucket_is_adms_centre_crop():
    from ledit_convert.data.images import center_crop_arr
    rng = np.random.default_rng(1)
    for h, w in ((70, 50), (33, 129), (64, 64), (300, 200)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(np.asarray(center_crop_arr(Image.fromarray(arr), 32)), reference_cover_crop(arr, 32, 32))


def test_random_crops_are_seeded_per_image_and_inside_the_image(tmp_path):
    root = mixed_folder(tmp_path / "imgs", classes=("a",))
    base = ImageFolderDataset(root, 32, random_flip=False)
    groups = parse_buckets("32", 8)
    a, b = BucketedImages(base, groups, "random", seed=3), BucketedImages(base, groups, "random", seed=3)
    c = BucketedImages(base, groups, "random", seed=4)
    assert np.array_equal(a.crop_box, b.crop_box) and not np.array_equal(a.crop_box, c.crop_box)
    for i in range(len(a)):
        top, left, rh, rw = a.crop_box[i]
        h, w = a.bucket(i)
        assert 0 <= top <= rh - h and 0 <= left <= rw - w
        arr = np.asarray(Image.open(a.describe(i)).convert("RGB"))
        got = ((a.load(i).x.permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
        assert np.array_equal(got, reference_cover_crop(arr, h, w, top, left))


def test_enlarging_is_bounded_and_a_folder_too_small_for_every_bucket_is_one_error(tmp_path):
    root = mixed_folder(tmp_path / "imgs", sizes=[(20, 20), (24, 16)], classes=("a",))
    base = ImageFolderDataset(root, 32, random_flip=False)
    with pytest.raises(DataError, match="no image fits a bucket .*--max-upscale") as err:
        BucketedImages(base, parse_buckets("32", 8))
    assert "\n" not in str(err.value)
    allowed = BucketedImages(base, parse_buckets("32", 8), max_upscale=2.0)
    assert len(allowed) == 2


def test_an_image_that_does_not_decode_is_left_out_of_the_cache_and_named(tmp_path, caplog):
    """Its header reads (so it has a bucket, alone in it), its data does not: the cache skips it, nothing else."""
    root = mixed_folder(tmp_path / "imgs", sizes=[(32, 32)] * 4, classes=("a",))
    Image.fromarray(np.zeros((16, 64, 3), np.uint8) + 90).save(root / "a" / "cut.png")
    data = (root / "a" / "cut.png").read_bytes()
    (root / "a" / "cut.png").write_bytes(data[:len(data) // 2])
    base = ImageFolderDataset(root, 32, random_flip=False)
    index = cache_bucketed_latents(base, tiny_vae(1), tmp_path / "cache", parse_buckets("32", 8), 8)
    assert index["count"] == 4 and index["unreadable"] == 1 and "cut.png" in caplog.text
    ds = BucketedLatents(tmp_path / "cache")
    assert {ds.bucket(i) for i in range(len(ds))} == {(32, 32)}


def test_an_unreadable_file_is_skipped_with_its_name(tmp_path, caplog):
    root = mixed_folder(tmp_path / "imgs", classes=("a",))
    (root / "a" / "broken.png").write_bytes(b"not a png")
    ds = BucketedImages(ImageFolderDataset(root, 32, random_flip=False), parse_buckets("32", 8))
    assert ds.unreadable == 1 and "broken.png" in caplog.text
    assert len(ds) == len(SIZES) - 1


# ------------------------------------------------------------------ batches that never mix shapes

def toy_buckets(sizes=(8, 6, 12, 3), groups=(16, 16, 32, 32)):
    """bucket_of_item for buckets of the given sizes, and each bucket's group resolution."""
    return np.repeat(np.arange(len(sizes)), sizes), list(groups)


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batches_are_one_bucket_and_every_item_comes_once_per_epoch():
    bucket_of_item, groups = toy_buckets((8, 6, 12), (16, 16, 16))
    sampler = BucketBatchSampler(bucket_of_item, groups, 2, seed=0)
    per_epoch = 4 + 3 + 6
    batches = take(sampler, 2 * per_epoch)
    for batch in batches:
        assert len(batch) == 2 and len({bucket_of_item[i] for _, i in batch}) == 1
    for epoch in range(2):
        keys = [k for b in batches[epoch * per_epoch:(epoch + 1) * per_epoch] for k in b]
        assert {e for e, _ in keys} == {epoch} and sorted(i for _, i in keys) == list(range(26))
    first = [i for b in batches[:per_epoch] for _, i in b]
    second = [i for b in batches[per_epoch:] for _, i in b]
    assert first != second  # reshuffled within and across buckets
    assert len({bucket_of_item[b[0][1]] for b in batches[:3]}) > 1 or len({bucket_of_item[b[0][1]] for b in batches[:6]}) > 1


def test_short_buckets_drop_or_pad():
    bucket_of_item, groups = toy_buckets((5, 3), (16, 16))
    dropped = BucketBatchSampler(bucket_of_item, groups, 2, seed=0)  # 2 + 1 full batches, items 4, 2 left out
    assert dropped.batches_per_epoch == [3] and dropped.never_trained() == 0
    padded = BucketBatchSampler(bucket_of_item, groups, 2, seed=0, short="pad")
    assert padded.batches_per_epoch == [5]
    keys = [i for b in take(padded, 5) for _, i in b]
    assert set(keys) == set(range(8)) and len(keys) == 10  # everyone at least once, 2 repeats
    for b in take(padded, 15):
        assert len({bucket_of_item[i] for _, i in b}) == 1
    tiny, g = toy_buckets((1, 8), (16, 16))
    assert BucketBatchSampler(tiny, g, 2, seed=0).never_trained() == 1
    with pytest.raises(DataError, match="no bucket holds a full global batch of 4 .*bucket_short: pad"):
        BucketBatchSampler(*toy_buckets((3, 3), (16, 16)), 2, seed=0, world=2)


def test_processes_get_the_same_bucket_each_step_and_disjoint_items():
    bucket_of_item, groups = toy_buckets()
    ranks = [take(BucketBatchSampler(bucket_of_item, groups, 3, seed=5, rank=r, world=2), 40) for r in range(2)]
    alone = take(BucketBatchSampler(bucket_of_item, groups, 6, seed=5), 40)
    for a, b, whole in zip(*ranks, alone):
        assert bucket_of_item[a[0][1]] == bucket_of_item[b[0][1]]
        assert not {i for _, i in a} & {i for _, i in b}
        assert a + b == whole  # two processes split exactly the batch one process of twice the size draws


def test_seeded_and_resumes_mid_epoch_exactly():
    bucket_of_item, groups = toy_buckets()
    straight = take(BucketBatchSampler(bucket_of_item, groups, 2, seed=1, weights=None), 60)
    assert straight == take(BucketBatchSampler(bucket_of_item, groups, 2, seed=1), 60)
    assert straight != take(BucketBatchSampler(bucket_of_item, groups, 2, seed=2), 60)
    for cut in (1, 7, 23, 59):
        resumed = take(BucketBatchSampler(bucket_of_item, groups, 2, seed=1, consumed=cut), 60 - cut)
        assert resumed == straight[cut:]


def test_resume_past_the_group_draws_first_chunk_and_with_padded_small_buckets_on_two_ranks():
    bucket_of_item, groups = toy_buckets((9, 1, 7, 3), (16, 16, 32, 32))
    straight = take(BucketBatchSampler(bucket_of_item, groups, 1, seed=3), 4100)
    assert take(BucketBatchSampler(bucket_of_item, groups, 1, seed=3, consumed=4095), 5) == straight[4095:]
    for rank in range(2):  # buckets of 1 and 3 items padded to global batches of 4
        whole = take(BucketBatchSampler(bucket_of_item, groups, 2, seed=3, rank=rank, world=2, short="pad"), 30)
        assert take(BucketBatchSampler(bucket_of_item, groups, 2, seed=3, rank=rank, world=2, short="pad",
                                       consumed=13), 17) == whole[13:]


def test_resolution_weights_choose_the_groups_steps():
    bucket_of_item, groups = toy_buckets((40, 40, 40, 40), (16, 16, 32, 32))
    count = lambda s: np.bincount([groups[bucket_of_item[b[0][1]]] == 32 for b in take(s, 2000)], minlength=2)
    even = count(BucketBatchSampler(bucket_of_item, groups, 2, seed=0))
    assert abs(even[1] / 2000 - 0.5) < 0.05  # by default each group in proportion to its batches: equal here
    skewed = count(BucketBatchSampler(bucket_of_item, groups, 2, seed=0, only=[16, 32], weights=[3, 1]))
    assert abs(skewed[1] / 2000 - 0.25) < 0.04
    only = count(BucketBatchSampler(bucket_of_item, groups, 2, seed=0, only=[32]))
    assert only[0] == 0
    with pytest.raises(DataError, match="no bucket group 64"):
        BucketBatchSampler(bucket_of_item, groups, 2, seed=0, only=[64])


# ------------------------------------------------------------------ the bucketed cache

def test_cache_holds_each_items_latent_of_its_crop_and_metadata(tmp_path):
    root = mixed_folder(tmp_path / "imgs")
    base = ImageFolderDataset(root, 32, random_flip=False)
    groups = parse_buckets("32,16", 8)
    vae = tiny_vae(1)
    index = cache_bucketed_latents(base, vae, tmp_path / "cache", groups, 8, batch_size=3, shard_size=7,
                                   storage_dtype=torch.float32)
    placed = BucketedImages(base, groups)
    assert index["count"] == len(placed) == 2 * (2 * len(SIZES) - 1) and index["images"] == 2 * len(SIZES)
    assert index["too_small_per_resolution"] == {"32": 2, "16": 0}
    ds = BucketedLatents(tmp_path / "cache", random_flip=True)
    assert sorted(ds.groups) == [16, 32] and len(ds) == len(placed)
    seen = set()
    for i in range(len(ds)):
        h, w = ds.bucket(i)
        mean, std = ds.posterior(i)
        flipped, _ = ds.posterior(i, flip=True)
        assert mean.shape == (4, h // 4, w // 4)
        # the same image and bucket among the placed items: its crop encoded alone gives this posterior
        key = (int(ds.original[i][0]), int(ds.original[i][1]), ds.bucket(i), float(mean.sum()))
        assert key not in seen
        seen.add(key)
    j = 5
    crop = placed.load(j).x[None]
    expected = vae.encode(crop).latent_dist
    row = [i for i in range(len(ds)) if ds.bucket(i) == placed.bucket(j)
           and torch.allclose(ds.posterior(i)[0], expected.mean[0], atol=1e-5)]
    assert len(row) == 1
    torch.testing.assert_close(ds.posterior(row[0], flip=True)[0], vae.encode(crop.flip(-1)).latent_dist.mean[0],
                               atol=1e-5, rtol=1e-5)
    assert ds.sample(row[0], False).size.tolist() == list(placed.original[j])


def test_captions_are_encoded_once_per_image_whatever_its_buckets(tmp_path):
    from test_text2image import MAX_LEN
    from _tiny import save_text_encoder
    from ledit_convert.data.text import load_text_encoder
    save_text_encoder(tmp_path / "t5")
    encoder = load_text_encoder(str(tmp_path / "t5"), max_length=MAX_LEN)
    calls = []
    real = encoder.encode
    encoder.encode = lambda prompts: calls.append(len(prompts)) or real(prompts)
    root = mixed_folder(tmp_path / "imgs", classes=("x",), captions=True)
    base = CaptionedImageFolder(root, 32, random_flip=False)
    cache_bucketed_latents(base, tiny_vae(1), tmp_path / "cache", parse_buckets("32,16", 8), 8, batch_size=4,
                           text_encoder=encoder)
    assert sum(calls) == len(SIZES) + 1  # every image once (the too-small one too: it fits 16), plus the empty prompt
    ds = BucketedLatents(tmp_path / "cache")
    texts = {}
    for i in range(len(ds)):
        item = ds.sample(i, False)
        caption = base.captions[[k for k in range(len(base)) if tuple(base.image_size(k)) == tuple(ds.original[i])][0]]
        texts.setdefault(caption, item.text["embeds"])
        torch.testing.assert_close(item.text["embeds"], texts[caption])
    for caption, embeds in texts.items():
        torch.testing.assert_close(embeds, real([caption])["embeds"][0].half().float())
    assert ds.null_text()["mask"].dtype == torch.int64


def test_extending_a_cache_encodes_only_the_new_images_and_an_interrupted_chunk_is_redone(tmp_path):
    root = mixed_folder(tmp_path / "imgs", classes=("a",))
    groups = parse_buckets("32", 8)
    vae = tiny_vae(1)
    cache_bucketed_latents(ImageFolderDataset(root, 32, random_flip=False), vae, tmp_path / "cache", groups, 8,
                           shard_size=4)
    chunks = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("chunk_"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    mixed_folder(tmp_path / "imgs", sizes=[(40, 20), (28, 28)], classes=("a",), seed=9)  # overwrites a0, a1
    for i, size in enumerate([(24, 60), (44, 44)]):
        Image.new("RGB", size[::-1], (i * 90, 20, 200)).save(root / "a" / f"new{i}.png")
    encoded = []
    real = vae.encode
    vae.encode = lambda x: encoded.append(len(x)) or real(x)
    index = cache_bucketed_latents(ImageFolderDataset(root, 32, random_flip=False), vae, tmp_path / "cache", groups,
                                   8, shard_size=4)
    assert sum(encoded) == 2 * 2  # two new images, each with its mirror; a0 and a1 were cached already
    assert index["images"] == len(SIZES) + 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing already cached was rewritten
    # an interrupted chunk: files without their manifest are replaced on the next run
    last = tmp_path / "cache" / sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("chunk_"))[-1]
    (last / "manifest.json").unlink()
    (tmp_path / "cache" / "index.json").unlink()
    encoded.clear()
    again = cache_bucketed_latents(ImageFolderDataset(root, 32, random_flip=False), vae, tmp_path / "cache", groups,
                                   8, shard_size=4)
    assert sum(encoded) == 2 * 2 and again["count"] == index["count"] and len(chunks) == 3  # 10 images, 4 a chunk
    # a chunk that was renamed into place only in part: a leftover `.partial` folder, manifest and all, is redone
    (tmp_path / "cache" / "chunk_00007.partial").mkdir()
    (tmp_path / "cache" / "chunk_00007.partial" / "manifest.json").write_text("{}")
    cache_bucketed_latents(ImageFolderDataset(root, 32, random_flip=False), vae, tmp_path / "cache", groups, 8,
                           shard_size=4)
    assert not (tmp_path / "cache" / "chunk_00007.partial").exists()
    with pytest.raises(ConfigError, match="other settings \\(crop\\); pass --overwrite"):
        cache_bucketed_latents(ImageFolderDataset(root, 32, random_flip=False), vae, tmp_path / "cache", groups, 8,
                               crop="random")


def test_training_data_opens_a_bucketed_cache_only_at_one_of_its_resolutions(tmp_path):
    root = mixed_folder(tmp_path / "imgs")
    cache_bucketed_latents(ImageFolderDataset(root, 32, random_flip=False), tiny_vae(1), tmp_path / "cache",
                           parse_buckets("32", 8), 8)
    ds = open_training_data(tmp_path / "cache", 32, 2, patch_size=2, vae_downsample=4)
    assert isinstance(ds, BucketedLatents)
    with pytest.raises(DataError, match="cached at resolution\\(s\\) 32; set the recipe's resolution"):
        open_training_data(tmp_path / "cache", 64, 2, patch_size=2, vae_downsample=4)
    with pytest.raises(DataError, match="bucketed \\(or not\\) when it is cached"):
        open_training_data(tmp_path / "cache", 32, 2, patch_size=2, vae_downsample=4, buckets="32")


# ------------------------------------------------------------------ fine-tuning in buckets

def bucketed_recipe(**kw):
    return load_recipe(None, dict(BASE, resolution=16, checkpoint_every=3, random_flip=False, **kw))


def test_finetune_on_buckets_resumes_exactly_and_each_step_sees_one_shape(tmp_path, monkeypatch):
    """Pixel-space tiny LEDiT on bucketed images (align 2: patch 2, no VAE): 7 steps straight equal 4 + 3 resumed,
    and every batch the model sees has one shape, several shapes over the run."""
    import ledit_convert.training.finetune as ft
    model = make_model(tmp_path / "model", classes=2)
    root = mixed_folder(tmp_path / "imgs", sizes=[(16, 16), (12, 24), (24, 12), (16, 16), (10, 20), (20, 10)] * 2)
    shapes = []
    real = ft._step

    def spy(run, batch):
        shapes.append(tuple(batch[0].shape[-2:]))
        return real(run, batch)
    monkeypatch.setattr(ft, "_step", spy)
    recipe = dict(buckets="16", bucket_short="pad", num_workers=2)
    straight = finetune(str(model), str(root), bucketed_recipe(steps=7, **recipe), str(tmp_path / "a"))
    assert len(set(shapes)) > 1 and len(shapes) == 7
    part = finetune(str(model), str(root), bucketed_recipe(steps=4, **recipe), str(tmp_path / "b"))
    rest = finetune(str(model), str(root), bucketed_recipe(steps=7, **recipe), str(tmp_path / "b"), resume="latest")
    assert part["losses"] + rest["losses"] == straight["losses"]
    a = load_file(str(tmp_path / "a/model/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b/model/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_multi_resolution_finetune_trains_the_chosen_resolutions(tmp_path, monkeypatch):
    import ledit_convert.training.finetune as ft
    model = make_model(tmp_path / "model", classes=2)
    root = mixed_folder(tmp_path / "imgs", sizes=[(24, 24), (20, 28), (28, 20), (24, 24)] * 2)
    areas = []
    real = ft._step
    monkeypatch.setattr(ft, "_step", lambda run, batch: areas.append(batch[0].shape[-1] * batch[0].shape[-2])
                        or real(run, batch))
    finetune(str(model), str(root), bucketed_recipe(steps=12, buckets="8,16,24", bucket_resolutions=[8, 16],
                                                    bucket_weights=[1, 1], bucket_short="pad"), str(tmp_path / "run"))
    assert max(areas) <= 16 * 16 and min(areas) <= 8 * 8 and len(areas) == 12
    with pytest.raises(ConfigError, match="bucket_weights has 1 values for 2"):
        bucketed_recipe(buckets="8,16", bucket_resolutions=[8, 16], bucket_weights=[1])
    with pytest.raises(ConfigError, match="this data is square"):
        finetune(str(model), str(root), bucketed_recipe(steps=1, bucket_resolutions=[16]), str(tmp_path / "sq"))
    with pytest.raises(DataError, match="are at resolution\\(s\\) 8, 24; set the recipe's resolution"):
        finetune(str(model), str(root), bucketed_recipe(steps=1, buckets="8,24"), str(tmp_path / "r"))


def test_two_processes_train_in_buckets(tmp_path):
    """DDP over 2 CPU processes on bucketed images: each step both ranks take their halves of one global batch."""
    from test_finetune import finetune_two_processes
    model = make_model(tmp_path / "model", classes=2)
    root = mixed_folder(tmp_path / "imgs", sizes=[(16, 16), (12, 24), (24, 12)] * 3)
    finetune_two_processes(model, root, dict(BASE, resolution=16, steps=3, buckets="16", random_flip=False), tmp_path,
                           29541)
    state = json.loads((tmp_path / "run/checkpoints/step_00000003/state.json").read_text())
    assert state["num_processes"] == 2 and state["consumed_per_process"] == 3 * 2


def test_bucketed_finetune_evaluates_at_non_square_sizes(tmp_path):
    model = make_model(tmp_path / "model", classes=2)
    root = mixed_folder(tmp_path / "imgs", sizes=[(16, 16), (12, 24), (24, 12)] * 2)
    recipe = bucketed_recipe(steps=2, buckets="16", bucket_short="pad", eval_every=2, eval_samples=4, eval_steps=2,
                             eval_batch_size=4, eval_resolutions=["16x24", "24x16"],
                             eval_references=[str(root / "a")], best_metric="fid@16x24")
    finetune(str(model), str(root), recipe, str(tmp_path / "run"))
    row = json.loads((tmp_path / "run/eval.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["fid@16x24"]) and np.isfinite(row["fid@24x16"])


def test_pixart_alpha_micro_conditions_name_each_items_original_size_and_the_buckets_ratio():
    from types import SimpleNamespace
    from ledit_convert.data.images import EncodedSample
    from ledit_convert.training.families import condition
    batch = EncodedSample(torch.zeros(2, 4, 6, 10), {"embeds": torch.zeros(2, 3, 5), "mask": torch.ones(2, 3)}, torch.zeros(2),
                          torch.tensor([[300.0, 500.0], [90.0, 160.0]]))
    run = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")),
                          config=SimpleNamespace(use_additional_conditions=True), null_text={})
    micro = condition(run, batch).micro
    assert micro["resolution"].tolist() == [[300.0, 500.0], [90.0, 160.0]]  # PixArt's img_hw: the original size
    torch.testing.assert_close(micro["aspect_ratio"], torch.full((2, 1), 0.6))  # the bucket's height / width
    run.config.use_additional_conditions = False
    assert condition(run, batch).micro is None


# ------------------------------------------------------------------ end to end, per family

def test_dit_mixed_aspect_folder_to_bucketed_cache_finetune_samples_and_plain_diffusers(tmp_path):
    from typer.testing import CliRunner
    from _tiny import tiny_ledit
    from test_surgery import run_without_ledit_convert
    from ledit_convert.cli import app
    from ledit_convert.models.dit import LEDiTTransformer2DModel
    runner = CliRunner()
    tiny_ledit(layers=2).save_pretrained(tmp_path / "model")
    tiny_vae(1).save_pretrained(tmp_path / "vae")
    data = mixed_folder(tmp_path / "imgs", sizes=SIZES[:7])
    args = ["cache-latents", str(data), "--vae", str(tmp_path / "vae"), "--buckets", "32", "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "-o", str(tmp_path / "cache")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "latents of 14 images in" in result.output and "x" in result.output
    result = runner.invoke(app, ["finetune", str(tmp_path / "model"), "--data", str(tmp_path / "cache"),
                                 "--steps", "20", "--batch-size", "2", "--output-dir", str(tmp_path / "run"),
                                 "--set", "resolution=32", "--set", f"vae={tmp_path / 'vae'}", "--set",
                                 "num_workers=0", "--set", "validate_every=0", "--set", "bucket_short=pad",
                                 "--set", "trackers=[]", "--set", "checkpoint_every=10", "--mixed-precision", "no"])
    assert result.exit_code == 0, result.output
    tuned = tmp_path / "run" / "model"
    for h, w in ((24, 40), (40, 24)):
        out = tmp_path / f"s{h}x{w}"
        result = runner.invoke(app, ["sample", str(tuned), "--vae", str(tmp_path / "vae"), "--steps", "2",
                                     "--class-labels", "0,1", "--num-samples", "2", "--height", str(h), "--width",
                                     str(w), "--device", "cpu", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert np.asarray(Image.open(out / "000000_class0.png")).shape == (h, w, 3)
    ours = LEDiTTransformer2DModel.from_pretrained(tuned).eval()
    x, t, y = torch.randn(2, 4, 6, 10), torch.tensor([10, 500]), torch.tensor([0, 1])
    got = run_without_ledit_convert(tmp_path, tuned, {"x": x, "t": t, "y": y})
    with torch.no_grad():
        assert torch.equal(got["out"], ours(x, t, y).sample)


def text_family_end_to_end(tmp_path, pipeline, encoder_option, recipe, max_len, drop_in_script, steps, module):
    """surgery -> mixed-aspect captioned folder -> bucketed cache -> 20 steps -> samples at 24x40 and 64x32 -> the
    64x32 ones again from diffusers' own pipeline loading the fine-tuned folder as remote code."""
    from typer.testing import CliRunner
    from test_text2image import drop_in_images
    from ledit_convert.cli import app
    runner = CliRunner()
    model, cache, run = tmp_path / "ledit", tmp_path / "cache", tmp_path / "run"
    assert runner.invoke(app, ["surgery", str(pipeline), "-o", str(model)]).exit_code == 0
    data = mixed_folder(tmp_path / "imgs", sizes=SIZES[:7], classes=("x",), captions=True)
    result = runner.invoke(app, ["cache-latents", str(data), "--vae", str(pipeline), encoder_option, str(pipeline),
                                 "--max-length", str(max_len), "--buckets", "32", "--batch-size", "4",
                                 "--num-workers", "0", "--device", "cpu", "-o", str(cache)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", str(model), "--data", str(cache), "--recipe", str(recipe), "--steps",
                                 "20", "--batch-size", "2", "--output-dir", str(run), "--checkpoint-every", "10",
                                 "--mixed-precision", "no", "--set", "resolution=32", "--set", f"vae={pipeline}",
                                 "--set", "num_workers=0", "--set", "validate_every=0", "--set", "bucket_short=pad",
                                 "--set", "trackers=[]"])
    assert result.exit_code == 0, result.output
    tuned = run / "model"
    for h, w in ((24, 40), (64, 32)):
        out = tmp_path / f"s{h}x{w}"
        result = runner.invoke(app, ["sample", str(tuned), "--prompt", "a red square on white background",
                                     "--prompt", "a blue square", "--height", str(h), "--width", str(w), "--steps",
                                     str(steps), "--cfg-scale",
                                     "3.0", "--max-length", str(max_len), "--seed", "7", "--device", "cpu",
                                     "-o", str(out)])
        assert result.exit_code == 0, result.output
    ours = np.stack([np.asarray(Image.open(tmp_path / "s64x32" / f"{i:06d}.png")) for i in range(2)])
    assert np.asarray(Image.open(tmp_path / "s24x40" / "000000.png")).shape == (24, 40, 3)
    theirs = drop_in_images(drop_in_script, tuned, pipeline, tmp_path, module)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_pixart_mixed_aspect_end_to_end(tmp_path, pixart_pipeline):
    from test_text2image import DROP_IN, MAX_LEN, RECIPES
    text_family_end_to_end(tmp_path, pixart_pipeline, "--text-encoder", RECIPES / "ledit-pixart-sigma-512.yaml",
                           MAX_LEN, DROP_IN, 4, "modeling_ledit_pixart")  # the steps its DROP_IN samples with


def test_sd3_mixed_aspect_end_to_end(tmp_path, sd3_pipeline):
    from test_sd3_text2image import DROP_IN, MAX_LEN, RECIPES
    text_family_end_to_end(tmp_path, sd3_pipeline, "--text-encoders", RECIPES / "ledit-sd35-medium-512.yaml",
                           MAX_LEN, DROP_IN, 3, "modeling_ledit_sd3")


def test_cli_refuses_a_folder_too_small_for_every_bucket_in_one_line_and_leaves_nothing(tmp_path):
    from typer.testing import CliRunner
    from test_cli import one_line_error
    from ledit_convert.cli import app
    tiny_vae(1).save_pretrained(tmp_path / "vae")
    root = mixed_folder(tmp_path / "imgs", sizes=[(20, 20), (12, 30)], classes=("a",))
    base = ["cache-latents", str(root), "--vae", str(tmp_path / "vae"), "--buckets", "32", "--num-workers", "0",
            "--device", "cpu", "-o", str(tmp_path / "cache")]
    one_line_error(CliRunner().invoke(app, base), 4, "no image fits a bucket (0 unreadable, 2 too small")
    assert not (tmp_path / "cache").exists()
    one_line_error(CliRunner().invoke(app, base + ["--crop", "corner"]), 3, "--crop 'corner'")
    result = CliRunner().invoke(app, base + ["--max-upscale", "3"])
    assert result.exit_code == 0 and "latents of 2 images" in result.output
