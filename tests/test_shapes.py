"""The procedural shapes set: one scene at every resolution, balanced labels, aspect-correct objects, folders."""
import numpy as np
import pytest
import torch

from ledit_convert.data.images import ImageFolderDataset, Sample
from ledit_convert.errors import ConfigError, OutputExistsError
from ledit_convert.replication.shapes import (MAX_CLASSES, SHAPES, ShapesDataset, class_names, make_scene, render_scene,
                                  write_image_folder)


def area_downsample(image, factor):
    h, w, c = image.shape
    return image.astype(np.float64).reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


def object_mask(image):
    """Pixels far from the row's border colour (the gradient is vertical), independent of structure.py."""
    row_bg = image[:, :1].astype(np.float64)
    return np.linalg.norm(image.astype(np.float64) - row_bg, axis=-1) > 48


@pytest.mark.parametrize("small,factor", [((32, 32), 4), ((16, 32), 4), ((24, 16), 3)])
def test_same_scene_at_every_resolution(small, factor):
    ds = ShapesDataset(16, small, num_classes=8, seed=0)
    diffs = []
    for i in range(16):
        big = ds.render(i, small[0] * factor, small[1] * factor)
        diffs.append(np.abs(area_downsample(big, factor) - ds.render(i).astype(np.float64)).mean())
    assert max(diffs) < 1.5  # grey levels, averaged over the image
    # and the small render is not trivially close: different scenes differ by far more
    assert np.abs(ds.render(0).astype(float) - ds.render(8).astype(float)).mean() > 5


def test_labels_are_balanced_and_scenes_deterministic():
    for k in (1, 4, MAX_CLASSES):
        ds = ShapesDataset(10 * k, 16, num_classes=k)
        assert ds.labels.dtype == np.int64 and np.bincount(ds.labels).tolist() == [10] * k
        assert ds.classes == class_names(k) and sorted(ds.classes) == ds.classes
    a, b = ShapesDataset(8, 32, seed=3), ShapesDataset(8, (48, 20), seed=3)
    assert all(a.scene(i) == b.scene(i) for i in range(8))  # the scene does not depend on the resolution
    assert np.array_equal(a.render(5), ShapesDataset(8, 32, seed=3).render(5))
    assert not np.array_equal(a.render(5), ShapesDataset(8, 32, seed=4).render(5))
    assert make_scene(3, 5, 4)["label"] == 1 and a.scene(5)["shape"] == SHAPES[1]


def test_every_class_draws_its_own_shape():
    ds = ShapesDataset(MAX_CLASSES, 64, num_classes=MAX_CLASSES, seed=1)
    masks = [object_mask(ds.render(i)) for i in range(MAX_CLASSES)]
    fills = {ds.scene(i)["shape"]: m.sum() / np.prod([np.ptp(a) + 1 for a in np.nonzero(m)])
             for i, m in enumerate(masks)}
    assert fills["square"] > fills["circle"] > fills["ring"] > fills["star"]
    assert 0.70 < fills["circle"] < 0.85  # pi / 4 with edge pixels


def test_non_square_canvas_keeps_object_aspect_and_position():
    ds = ShapesDataset(8, 64, num_classes=4, seed=2)
    index = 0  # a circle
    assert ds.scene(index)["shape"] == "circle"
    cx, cy = ds.scene(index)["centre"]
    for h, w in ((64, 64), (64, 160), (160, 64)):
        mask = object_mask(ds.render(index, h, w))
        ys, xs = np.nonzero(mask)
        assert abs((np.ptp(ys) + 1) - (np.ptp(xs) + 1)) <= 1  # round, not stretched
        area = np.pi * (ds.scene(index)["radius"] * 64) ** 2  # the radius is relative to the short side
        assert abs(mask.sum() - area) < 0.06 * area
        assert abs(xs.mean() + 0.5 - cx * w) < 1 and abs(ys.mean() + 0.5 - cy * h) < 1  # normalised centre


def test_objects_never_touch_the_edge_even_on_extreme_canvases():
    ds = ShapesDataset(64, 32, num_classes=8, seed=5)
    for i in range(64):
        for h, w in ((32, 128), (128, 32), (24, 24)):
            mask = object_mask(ds.render(i, h, w))
            assert mask.any() and not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_load_matches_data_py_samples():
    ds = ShapesDataset(6, (16, 24), num_classes=3, seed=0)
    sample = ds.load(4)
    assert isinstance(sample, Sample) and sample.label == 1 and sample.skipped == 0
    assert sample.x.dtype == torch.float32 and sample.x.shape == (3, 16, 24)
    assert sample.x.min() >= -1 and sample.x.max() <= 1
    expected = torch.from_numpy(ds.render(4)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(sample.x, expected)
    assert torch.equal(ds.load(4, flip=True).x, expected.flip(-1))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch.x.shape == (3, 3, 16, 24) and batch.label.tolist() == [0, 1, 2]


def test_write_image_folder_round_trips_through_image_folder_dataset(tmp_path):
    root = write_image_folder(tmp_path / "shapes", 12, 16, num_classes=4, seed=7)
    ds = ShapesDataset(12, 16, num_classes=4, seed=7)
    folder = ImageFolderDataset(root, 16, random_flip=False)
    assert folder.classes == ds.classes and len(folder) == 12
    assert np.bincount(folder.labels).tolist() == [3] * 4
    # the folder is sorted by class, then by index: match items by (label, index)
    order = sorted(range(12), key=lambda i: (ds.labels[i], i))
    for j, i in enumerate(order):
        got = folder.load(j)
        assert got.label == ds.labels[i] and torch.allclose(got.x, ds.load(i).x, atol=1e-6)
    with pytest.raises(OutputExistsError, match="not empty"):
        write_image_folder(root, 4, 16)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="num_classes 9"):
        ShapesDataset(4, 16, num_classes=9)
    with pytest.raises(ConfigError, match="resolution"):
        ShapesDataset(4, (0, 16))
    with pytest.raises(ConfigError, match="unknown shape"):
        render_scene(dict(make_scene(0, 0, 4), shape="blob"), 8, 8)
