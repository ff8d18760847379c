"""Structure measure: one compact object per image, lattices and empty canvases rejected; shape classifier."""
from collections import deque

import numpy as np
import pytest

from ledit_convert.errors import DataError
from ledit_convert.replication.shapes import ShapesDataset, make_scene, render_scene
from ledit_convert.replication.structure import (estimate_background, label_components, object_stats, shape_accuracy,
                                     train_shape_classifier)


def bfs_labels(mask):
    """Reference 4-connected labelling: each pixel gets its component's smallest flat index."""
    h, w = mask.shape
    out = -np.ones((h, w), np.int64)
    for start in range(h * w):
        y, x = divmod(start, w)
        if not mask[y, x] or out[y, x] >= 0:
            continue
        out[y, x] = start
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and out[ny, nx] < 0:
                    out[ny, nx] = start
                    queue.append((ny, nx))
    return out


def gradient_canvas(h, w, top=(40, 44, 56), bottom=(88, 94, 108)):
    t = ((np.arange(h) + 0.5) / h)[:, None, None]
    return np.broadcast_to(np.asarray(top) * (1 - t) + np.asarray(bottom) * t, (h, w, 3)).round().astype(np.uint8)


def test_label_components_matches_bfs():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 13, 17)) < np.array([0.3, 0.5, 0.6, 0.7])[:, None, None]
    masks[3, 2:11, 8] = True  # a long spiral-free bar to join regions
    labels = label_components(masks)
    offset = np.arange(4)[:, None, None] * 13 * 17
    for i in range(4):
        ref = bfs_labels(masks[i])
        assert np.array_equal(np.where(ref >= 0, ref + offset[i], -1), labels[i])
    snake = np.zeros((1, 9, 9), bool)  # a long winding path: one component
    snake[0, ::2, :] = True
    snake[0, 1::4, -1] = snake[0, 3::4, 0] = True
    assert len(np.unique(label_components(snake)[snake])) == 1


def test_background_plane_ignores_an_object_on_the_border():
    image = gradient_canvas(32, 40).copy()
    image[:10, :6] = (230, 40, 40)  # an object touching the top-left corner
    bg = estimate_background(image)
    assert np.abs(bg - gradient_canvas(32, 40)).max() < 2


@pytest.mark.parametrize("size", [(32, 32), (48, 24), (64, 64)])
def test_real_renders_pass(size):
    images = ShapesDataset(96, size, num_classes=8, seed=11).images()
    stats = object_stats(images)
    assert stats["object_rate"] > 0.95 and stats["single_object_rate"] > 0.95
    assert stats["mean_components"] == pytest.approx(1.0, abs=0.05) and stats["empty_rate"] == 0
    assert stats["components"].shape == (96,)


def test_lattices_tilings_and_empty_canvases_fail():
    ds = ShapesDataset(8, 16, num_classes=4, seed=3)
    tiled = np.stack([np.tile(ds.render(i), (3, 3, 1)) for i in range(8)])  # a scene repeated 3 x 3
    stats = object_stats(tiled)
    assert stats["single_object_rate"] == 0 and stats["object_rate"] == 0
    assert (stats["components"] >= 4).all()  # the gradient's seams add bands of their own
    flat = [dict(ds.scene(i), background_bottom=ds.scene(i)["background_top"]) for i in range(8)]
    stats = object_stats(np.stack([np.tile(render_scene(sc, 16, 16), (3, 3, 1)) for sc in flat]))
    assert stats["single_object_rate"] == 0 and stats["components"].tolist() == [9] * 8

    lattice = np.repeat(gradient_canvas(48, 48)[None], 2, 0).copy()  # small squares on a regular grid
    for y in range(4, 48, 12):
        for x in range(4, 48, 12):
            lattice[:, y: y + 5, x: x + 5] = (235, 205, 40)
    assert object_stats(lattice)["single_object_rate"] == 0

    grid = gradient_canvas(48, 48).copy()  # connected grid lines: one component, but no object
    grid[::8] = grid[:, ::8] = (238, 238, 238)
    stripes = gradient_canvas(48, 48).copy()
    stripes[:, 10:38] = (45, 95, 235)  # a band running off the canvas
    stats = object_stats(np.stack([grid, stripes]))
    assert stats["object_rate"] == 0 and stats["compact_rate"] == 0

    empty = np.stack([gradient_canvas(32, 32), np.full((32, 32, 3), 120, np.uint8)])
    stats = object_stats(empty)
    assert stats["single_object_rate"] == 0 and stats["empty_rate"] == 1 and stats["mean_components"] == 0


def test_two_objects_fail_the_single_object_test():
    a, b = make_scene(0, 0, 4), make_scene(0, 1, 4)
    a.update(centre=(0.25, 0.3), radius=0.15)
    b.update(centre=(0.72, 0.7), radius=0.15, background_top=a["background_top"],
             background_bottom=a["background_bottom"])
    ia, ib = render_scene(a, 48, 48), render_scene(b, 48, 48)
    bg = render_scene(dict(a, radius=1e-6), 48, 48).astype(int)
    both = np.clip(ia.astype(int) + ib.astype(int) - bg, 0, 255).astype(np.uint8)
    stats = object_stats(np.stack([both, ia]))
    assert stats["single_object"].tolist() == [False, True]
    with pytest.raises(DataError, match="uint8"):
        object_stats(both.astype(np.float32)[None])


def test_classifier_recognises_held_out_renders():
    clf = train_shape_classifier(32, 32, num_classes=4, seed=0, steps=150, num_train=1024)
    held_out = ShapesDataset(200, 32, num_classes=4, seed=12345)
    assert shape_accuracy(clf, held_out.images(), held_out.labels) > 0.9
    # larger renders are judged at the training size
    assert shape_accuracy(clf, held_out.images(64, 64)[:80], held_out.labels[:80]) > 0.9
    shuffled = np.roll(held_out.labels, 1)
    assert shape_accuracy(clf, held_out.images(), shuffled) < 0.5
