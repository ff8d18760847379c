# Interpretable structure measures for the shapes set (shapes.py): is there ONE compact object, and
# is it the right class?
#
# Why: a model that extrapolates resolution badly tends to repeat content - a lattice of objects, a
# tiled scene - and FID on a small synthetic set cannot say so in words. object_stats counts
# objects: it estimates the background from the border pixels, calls a pixel foreground when its
# colour is far from that background, labels 4-connected components, and applies two tests:
#   single object: exactly one component covers >= min_object of the canvas AND it holds
#     >= min_mass of all foreground pixels (specks, lattices and duplicates fail);
#   compact: that main component fills >= min_fill of its bounding box (the set's shapes fill
#     0.39-1.0: star ~0.4, triangle ~0.46, plus/diamond ~0.5, circle ~0.78, square up to 1), its
#     box aspect is within [1/max_aspect, max_aspect] (the set: 0.8-1.33), it covers at most
#     max_object of the canvas, and it does not touch the canvas edge (real objects keep a margin;
#     a pattern that runs off the canvas is a texture, not an object).
# The thresholds are fitted to shapes.py's renders at 16-64 px, not universal constants.
# ShapeClassifier is a tiny CNN trained on real renders; its accuracy on generated images says
# whether the object has its class's shape and colour.
from typing import Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .shapes import ShapesDataset

FOREGROUND_DISTANCE = 48.0  # RGB distance from the background; objects sit > 100 away, gradients < 15


#################################################################################
#                          Segmentation and components                          #
#################################################################################

def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def estimate_background(image: np.ndarray, border: int = 2) -> np.ndarray:
    """Background colour at every pixel: a per-channel plane a + b*y + c*x fitted robustly to the border."""
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ring = np.zeros((h, w), bool)
    ring[:border], ring[-border:], ring[:, :border], ring[:, -border:] = True, True, True, True
    design = np.stack([np.ones(ring.sum()), yy[ring] / h, xx[ring] / w], 1)  # a plane covers flat and linear gradients
    values = image[ring].astype(np.float64)
    keep = np.ones(len(values), bool)
    for _ in range(3):  # refit without border pixels that an object (or noise) covers
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        residual = np.linalg.norm(values - design @ coef, axis=1)
        keep = residual <= max(3.0 * np.median(residual), 8.0)
        if keep.sum() < 3:
            keep[:] = True
            break
    full = np.stack([np.ones(h * w), yy.ravel() / h, xx.ravel() / w], 1)
    return (full @ coef).reshape(h, w, 3)


def foreground_masks(images: np.ndarray, threshold: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """Boolean (N, H, W): pixels whose colour is more than `threshold` from the estimated background."""
    images = _check_images(images)
    return np.stack([np.linalg.norm(im.astype(np.float64) - estimate_background(im), axis=-1) > threshold
                     for im in images]) if len(images) else np.zeros(images.shape[:3], bool)


def label_components(masks: np.ndarray) -> np.ndarray:
    """4-connected labels of boolean (N, H, W) masks: a component's smallest flat index, -1 off the masks."""
    masks = np.asarray(masks, bool)
    size = masks.size
    labels = np.where(masks, np.arange(size).reshape(masks.shape), size)  # `size` marks background
    while True:
        new = labels.copy()
        # take the smallest label among 4-neighbours; background carries the largest value, so it never wins
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new = np.where(masks, new, size)
        # pointer jumping: a label is a pixel of the same component, so its label is one too; this
        # collapses long chains in a few rounds instead of one pixel per round
        lookup = np.append(new.ravel(), size)
        new = lookup[lookup[new]]
        if np.array_equal(new, labels):
            return np.where(masks, labels, -1)
        labels = new


#################################################################################
#                                  The measure                                  #
#################################################################################

def _main_component_tests(labels: np.ndarray, main: int, max_aspect: float, min_fill: float,
                          max_object: float) -> bool:
    h, w = labels.shape
    ys, xs = np.nonzero(labels == main)
    if ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1:
        return False
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (box_h * box_w)
    return (min_fill <= fill and 1.0 / max_aspect <= box_w / box_h <= max_aspect
            and len(ys) <= max_object * h * w)


def object_stats(images: np.ndarray, threshold: float = FOREGROUND_DISTANCE, min_object: float = 0.01,
                 min_mass: float = 0.9, min_speck: float = 0.001, min_fill: float = 0.3,
                 max_aspect: float = 2.0, max_object: float = 0.5) -> Dict:
    """Per-image one-object and compactness tests on uint8 (N, H, W, 3) images; rates, means and per-image arrays."""
    images = _check_images(images)
    if len(images) == 0:
        raise DataError("images: object_stats needs at least one image")
    n, h, w, _ = images.shape
    masks = foreground_masks(images, threshold)
    labels = label_components(masks)
    counts = np.zeros(n, np.int64)
    single, compact = np.zeros(n, bool), np.zeros(n, bool)
    speck = max(2, int(np.ceil(min_speck * h * w)))  # anti-aliasing crumbs are not objects
    for i in range(n):
        ids, areas = np.unique(labels[i][labels[i] >= 0], return_counts=True)
        counts[i] = int((areas >= speck).sum())
        if not len(ids):
            continue
        big = areas >= min_object * h * w
        main = int(ids[np.argmax(areas)])
        single[i] = big.sum() == 1 and areas.max() >= min_mass * areas.sum()
        compact[i] = bool(big.any()) and _main_component_tests(labels[i], main, max_aspect, min_fill, max_object)
    return {
        "num_images": n,
        "single_object_rate": float(single.mean()),
        "compact_rate": float(compact.mean()),
        "object_rate": float((single & compact).mean()),  # both tests: what a real render passes
        "mean_components": float(counts.mean()),
        "mean_foreground_fraction": float(masks.mean()),
        "empty_rate": float((masks.sum((1, 2)) == 0).mean()),
        "components": counts, "single_object": single, "compact": compact,
    }


#################################################################################
#                               Class recognition                               #
#################################################################################

class ShapeClassifier(nn.Module):
    """A tiny CNN that names the class (shape + colour) of a shapes-set image at its training size."""

    def __init__(self, num_classes: int, height: int, width: int, channels: int = 16):
        super().__init__()
        self.num_classes, self.height, self.width = num_classes, height, width
        c = channels
        # strided convolutions, not pooling after full-size ones: a quarter of the compute, same accuracy here
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of float (N, 3, H, W) images in [-1, 1]."""
        return self.net(x)

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [-1, 1] at the training size (area-resampled if it differs)."""
        x = torch.from_numpy(np.ascontiguousarray(_check_images(images))).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.height, self.width):
            # judge generated images at the size the classifier knows; antialiasing keeps edges honest
            x = F.interpolate(x, (self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
        return x / 127.5 - 1.0

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Predicted class of each uint8 NHWC image."""
        was_training = self.training
        self.eval()
        out = [self(self.prepare(images[i: i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def train_shape_classifier(height: int, width: int, num_classes: int = 4, seed: int = 0, steps: int = 300,
                           batch_size: int = 64, num_train: int = 2048, lr: float = 3e-3) -> ShapeClassifier:
    """Train a ShapeClassifier on `num_train` real renders (ShapesDataset seed `seed`); seconds on CPU at 32-64 px."""
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps {steps} and batch_size {batch_size} must be at least 1")
    data = ShapesDataset(num_train, (height, width), num_classes, seed=seed, random_flip=False)
    images, labels = data.images(), torch.from_numpy(data.labels)
    with torch.random.fork_rng(devices=[]):  # seeded init and batches without touching the caller's RNG
        torch.manual_seed(seed)
        model = ShapeClassifier(num_classes, height, width)
        x_all = model.prepare(images)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (batch_size,))
            x = x_all[idx]
            flip = torch.rand(batch_size) < 0.5  # mirrored scenes are scenes of the same class
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def shape_accuracy(classifier: ShapeClassifier, images: np.ndarray, labels: np.ndarray,
                   batch_size: int = 256) -> float:
    """Fraction of uint8 NHWC images the classifier assigns to their intended class."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise DataError(f"shape_accuracy: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError("shape_accuracy: no images")
    return float((classifier.predict(images, batch_size) == labels).mean())
