# A procedurally generated, class-conditional image set that renders at any resolution.
#
# Why: resolution extrapolation needs training data whose "same image" exists at every size, so a
# small replication can train at one resolution and judge another. Each item is one coloured shape
# on a soft vertical gradient; class k is (shape k, colour k). All scene parameters are drawn once
# per (seed, index) and are resolution-independent:
#   - the centre is in normalised canvas coordinates ([0, 1] x [0, 1], x right, y down);
#   - the size is a radius relative to the canvas's SHORTER side, and the object keeps its own
#     aspect: a wider canvas shows the same round circle at the same relative position with more
#     background beside it, never a stretched one;
#   - the background gradient runs over the normalised height.
# Centres keep every object inside any canvas: its extent in normalised units is
# radius * short / side <= radius, and centres are drawn at least radius * EXTENT + MARGIN from
# each edge. Rendering is analytic: signed distance functions in the object's frame, converted to
# pixels, give each pixel a coverage ramp one pixel wide (a box-filter approximation), so a large
# render area-averaged down matches a small render to within a grey level or two.
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..data.images import Sample, size_of
from ..errors import ConfigError, OutputExistsError

SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond", "star", "cross")
COLOURS = {  # saturated object colours, each far (> 100 RGB units) from the dark slate background
    "red": (220, 45, 45), "blue": (45, 95, 235), "green": (50, 185, 70), "yellow": (235, 205, 40),
    "magenta": (205, 55, 205), "cyan": (40, 205, 215), "orange": (245, 135, 30), "white": (238, 238, 238),
}
CLASSES = tuple(zip(SHAPES, COLOURS))  # class k = (SHAPES[k], list(COLOURS)[k])
MAX_CLASSES = len(CLASSES)
RADIUS_RANGE = (0.16, 0.30)  # object radius / shorter side: 32-60% of the short side across
ROTATION_DEG = 15.0  # small rotations only, so the plus and the cross stay distinct classes
EXTENT = 1.1  # every shape lies within 1.1 radii of its centre (the square's corners reach 1.06)
MARGIN = 0.03  # free border, normalised, so objects never touch the canvas edge
BACKGROUND_TOP, BACKGROUND_BOTTOM = (40, 44, 56), (88, 94, 108)
BRIGHTNESS_JITTER, COLOUR_JITTER = 14.0, 12.0  # per-image variation in RGB units


def class_names(num_classes: int) -> list:
    """Names like '00_circle_red' that sort in class order (ImageFolderDataset labels by sorted name)."""
    return [f"{k:02d}_{shape}_{colour}" for k, (shape, colour) in enumerate(CLASSES[:num_classes])]


def _check_size(resolution: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    h, w = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
    if int(h) < 1 or int(w) < 1:
        raise ConfigError(f"resolution {resolution!r}: height and width must be positive")
    return int(h), int(w)


#################################################################################
#                          Signed distances (unit frame)                        #
#################################################################################
# Distances are in units of the object radius; negative inside. Polygons use the exact polygon
# SDF (after Inigo Quilez's sdPolygon), so the coverage ramp is right at every edge.

def _sd_box(x, y, hx, hy):
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _sd_polygon(x, y, verts):
    d = (x - verts[0, 0]) ** 2 + (y - verts[0, 1]) ** 2
    sign = np.ones_like(x)
    for i in range(len(verts)):
        (vix, viy), (vjx, vjy) = verts[i], verts[i - 1]
        ex, ey, wx, wy = vjx - vix, vjy - viy, x - vix, y - viy
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        d = np.minimum(d, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        c1, c2, c3 = y >= viy, y < vjy, ex * wy > ey * wx  # winding-number crossing test
        sign = np.where((c1 & c2 & c3) | (~c1 & ~c2 & ~c3), -sign, sign)
    return sign * np.sqrt(d)


def _regular(n, radius=1.0, phase=90.0, inner=None):
    k = np.arange(2 * n if inner else n)
    angles = np.deg2rad(phase + k * 360.0 / len(k))
    radii = np.where(k % 2 == 1, inner, radius) if inner else np.full(len(k), radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


_TRIANGLE, _DIAMOND, _STAR = _regular(3, 1.0), _regular(4, 1.0), _regular(5, 1.0, inner=0.45)


def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance to a unit-radius shape at (x, y) (y up); negative inside."""
    if shape == "circle":
        return np.hypot(x, y) - 1.0
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.75) - 0.25
    if shape == "square":
        return _sd_box(x, y, 0.75, 0.75)
    if shape == "plus":
        return np.minimum(_sd_box(x, y, 1.0, 0.32), _sd_box(x, y, 0.32, 1.0))
    if shape == "cross":  # the plus turned 45 degrees
        u, v = (x + y) / np.sqrt(2), (y - x) / np.sqrt(2)
        return np.minimum(_sd_box(u, v, 1.0, 0.28), _sd_box(u, v, 0.28, 1.0))
    if shape == "triangle":
        return _sd_polygon(x, y, _TRIANGLE)
    if shape == "diamond":
        return _sd_polygon(x, y, _DIAMOND)
    if shape == "star":
        return _sd_polygon(x, y, _STAR)
    raise ConfigError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


#################################################################################
#                               Scenes and rendering                            #
#################################################################################

def make_scene(seed: int, index: int, num_classes: int) -> Dict:
    """The resolution-independent parameters of item `index` (label = index mod num_classes)."""
    rng = np.random.default_rng([seed, index])  # SeedSequence: (seed, index) pairs never collide
    label = index % num_classes
    shape, colour = CLASSES[label]
    radius = rng.uniform(*RADIUS_RANGE)
    lo = radius * EXTENT + MARGIN
    centre = rng.uniform(lo, 1.0 - lo, size=2)
    brightness = rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER)
    return {
        "label": label, "shape": shape, "colour_name": colour,
        "colour": _floats(np.clip(np.add(COLOURS[colour], rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)), 0, 255)),
        "centre": _floats(centre), "radius": float(radius),
        "rotation": float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)),
        "background_top": _floats(np.add(BACKGROUND_TOP, brightness + rng.uniform(-6, 6, 3))),
        "background_bottom": _floats(np.add(BACKGROUND_BOTTOM, brightness + rng.uniform(-6, 6, 3))),
    }


def _floats(values) -> tuple:
    return tuple(float(v) for v in values)  # plain floats: scenes print, compare and serialise cleanly


def render_scene(scene: Dict, height: int, width: int) -> np.ndarray:
    """Rasterise a scene to uint8 (height, width, 3) with one-pixel analytic anti-aliasing."""
    height, width = _check_size((height, width))
    short = min(height, width)
    ys = (np.arange(height) + 0.5)[:, None]  # pixel centres
    xs = (np.arange(width) + 0.5)[None, :]
    scale = scene["radius"] * short  # pixels per object unit
    dx = (xs - scene["centre"][0] * width) / scale
    dy = -(ys - scene["centre"][1] * height) / scale  # y up in the object frame
    theta = np.deg2rad(scene["rotation"])
    u = np.cos(theta) * dx + np.sin(theta) * dy  # rotate the sample points by -theta
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    alpha = np.clip(0.5 - shape_sdf(scene["shape"], u, v) * scale, 0.0, 1.0)[..., None]  # (H, W, 1)
    t = (ys / height)[..., None]  # (H, 1, 1): the gradient follows the normalised height
    background = np.asarray(scene["background_top"]) * (1 - t) + np.asarray(scene["background_bottom"]) * t
    image = background * (1 - alpha) + np.asarray(scene["colour"]) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """`num_items` seeded one-shape scenes at a given resolution, yielding data.images' Sample in [-1, 1]."""

    def __init__(self, num_items: int, resolution: Union[int, Tuple[int, int]], num_classes: int = 4,
                 seed: int = 0, random_flip: bool = True):
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ConfigError(f"num_classes {num_classes}: the shapes set has 1 to {MAX_CLASSES} classes")
        if num_items < 1:
            raise ConfigError(f"num_items {num_items} must be at least 1")
        self.height, self.width = _check_size(resolution)
        self.resolution = self.height if self.height == self.width else (self.height, self.width)
        self.num_classes, self.seed, self.random_flip = num_classes, seed, random_flip
        self.labels = np.arange(num_items, dtype=np.int64) % num_classes  # balanced by construction
        self.classes = class_names(num_classes)
        self.label_names = dict(enumerate(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def scene(self, index: int) -> Dict:
        """Resolution-independent parameters of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the dataset's {len(self)} items")
        return make_scene(self.seed, int(index), self.num_classes)

    def render(self, index: int, height: Optional[int] = None, width: Optional[int] = None) -> np.ndarray:
        """Item `index` as uint8 (H, W, 3) at any size (default: the dataset's resolution)."""
        return render_scene(self.scene(index), height or self.height, width or self.width)

    def load(self, index: int, flip: bool = False) -> Sample:
        """Item `index` as Sample(x (3, H, W) float32 in [-1, 1], label, skipped=0, size), optionally mirrored."""
        x = torch.from_numpy(self.render(index)).permute(2, 0, 1).float() / 127.5 - 1.0
        return Sample(x.flip(-1) if flip else x, int(self.labels[index]), 0, size_of(*x.shape[-2:]))

    def __getitem__(self, index: int) -> Sample:
        # the global RNG, as data.images does: DataLoader seeds it per worker
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        return self.load(index, flip)

    def images(self, height: Optional[int] = None, width: Optional[int] = None,
               indices: Optional[np.ndarray] = None) -> np.ndarray:
        """Several items as a uint8 (N, H, W, 3) array."""
        indices = range(len(self)) if indices is None else indices
        return np.stack([self.render(int(i), height, width) for i in indices])


def write_image_folder(root: Union[str, os.PathLike], num_items: int, resolution: Union[int, Tuple[int, int]],
                       num_classes: int = 4, seed: int = 0, overwrite: bool = False) -> str:
    """Write the set as PNGs in ImageNet layout (root/00_circle_red/000000.png ...) for `finetune --data`."""
    root = os.fspath(root)
    if os.path.isdir(root) and os.listdir(root) and not overwrite:
        raise OutputExistsError(f"{root}: folder is not empty (pass overwrite=True to write into it)")
    ds = ShapesDataset(num_items, resolution, num_classes, seed, random_flip=False)
    for name in ds.classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    width = max(6, len(str(num_items - 1)))
    for i in range(num_items):
        path = os.path.join(root, ds.classes[ds.labels[i]], f"{i:0{width}d}.png")
        Image.fromarray(ds.render(i)).save(path)
    return root
