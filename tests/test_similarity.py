"""Similarity proxies against direct NumPy computations from their definitions, and the hand-known cases."""

import numpy as np
import pytest
import torch

from vrlab.errors import ShapeError, VrlabError
from vrlab.scores.similarity import cknna, linear_cka, measure, mutual_knn, null_calibrated, svcca


def u_centered(k):
    """Székely and Rizzo's U-centring (zero diagonal): <U(K), U(L)> / (n(n-3)) is the unbiased HSIC."""
    n = len(k)
    k = k.copy()
    np.fill_diagonal(k, 0)  # U-centring works on the off-diagonal entries
    u = (
        k
        - k.sum(0, keepdims=True) / (n - 2)
        - k.sum(1, keepdims=True) / (n - 2)
        + k.sum() / ((n - 1) * (n - 2))
    )
    np.fill_diagonal(u, 0)
    return u


def np_hsic_unbiased(k, g):
    n = len(k)
    return (u_centered(k) * u_centered(g)).sum() / (n * (n - 3))


def np_song(k, g):
    """Song et al.'s (2012) unbiased HSIC, equation 5, as written (CKNNA's masked Gram matrices are not
    symmetric, where the U-centring identity does not hold)."""
    n = len(k)
    kt, gt = k.copy(), g.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(gt, 0)
    one = np.ones(n)
    value = np.trace(kt @ gt) + (one @ kt @ one) * (one @ gt @ one) / ((n - 1) * (n - 2))
    return (value - 2 * (one @ kt @ gt @ one) / (n - 2)) / (n * (n - 3))


def np_cka(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def np_unbiased_cka(x, y):
    k, g = x @ x.T, y @ y.T
    return np_hsic_unbiased(k, g) / np.sqrt(np_hsic_unbiased(k, k) * np_hsic_unbiased(g, g))


def np_neighbours(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    out = []
    for i in range(len(x)):
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
        out.append(set(order[:k]))
    return out, sim


def np_mutual_knn(x, y, k):
    nx, _ = np_neighbours(x, k)
    ny, _ = np_neighbours(y, k)
    return float(np.mean([len(a & b) / k for a, b in zip(nx, ny, strict=True)]))


def np_cknna(x, y, k):
    nx, kx = np_neighbours(x, k)
    ny, ly = np_neighbours(y, k)

    def mask(na, nb):
        m = np.zeros((len(na), len(na)))
        for i, (a, b) in enumerate(zip(na, nb, strict=True)):
            for j in a & b:
                m[i, j] = 1
        return m

    def masked(a, b, na, nb):
        m = mask(na, nb)
        return np_song(m * a, m * b)

    return masked(kx, ly, nx, ny) / np.sqrt(masked(kx, kx, nx, nx) * masked(ly, ly, ny, ny))


def np_svcca(x, y, keep):
    def reduce(a):
        ac = a - a.mean(0)
        u, s, _ = np.linalg.svd(ac, full_matrices=False)
        r = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), keep)) + 1
        return u[:, :r] * s[:r]  # the scores on the kept directions

    a, b = reduce(x), reduce(y)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    # CCA by whitening the covariances: the singular values of Cxx^-1/2 Cxy Cyy^-1/2
    m = inv_sqrt(a.T @ a) @ (a.T @ b) @ inv_sqrt(b.T @ b)
    corr = np.linalg.svd(m, compute_uv=False)
    return float(np.mean(corr[: min(a.shape[1], b.shape[1])]))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 24))
    y = x @ rng.normal(size=(24, 40)) + 0.8 * rng.normal(size=(60, 40))  # related, not identical
    return x, y


def test_every_measure_equals_a_numpy_computation(data):
    x, y = data
    assert linear_cka(x, y) == pytest.approx(np_cka(x, y), abs=1e-6)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(np_unbiased_cka(x, y), abs=1e-6)
    k, g = x @ x.T, y @ y.T  # the two unbiased estimators agree on symmetric Gram matrices
    assert np_song(k, g) == pytest.approx(np_hsic_unbiased(k, g), rel=1e-9)
    for k in (2, 5, 10):
        assert mutual_knn(x, y, k) == pytest.approx(np_mutual_knn(x, y, k), abs=1e-6)
        assert cknna(x, y, k) == pytest.approx(np_cknna(x, y, k), abs=1e-6)
    for keep in (0.5, 0.9, 0.99):
        assert svcca(x, y, keep) == pytest.approx(np_svcca(x, y, keep), abs=1e-6)
    # float32 inputs accumulate in float64: the same values
    assert linear_cka(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(
        np_cka(x.astype(np.float32).astype(float), y.astype(np.float32).astype(float)), abs=1e-6
    )


def test_hand_known_cases():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)  # invariant to an orthogonal map
    assert linear_cka(x, x @ q, unbiased=True) == pytest.approx(1.0, abs=1e-9)
    assert mutual_knn(x, x, 5) == 1.0 and cknna(x, x, 5) == pytest.approx(1.0, abs=1e-9)
    assert svcca(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-9)
    # independent Gaussians, wide relative to n: unbiased CKA near 0, the biased one far from it
    a, b = rng.normal(size=(200, 500)), rng.normal(size=(200, 500))
    assert abs(linear_cka(a, b, unbiased=True)) < 0.02
    assert linear_cka(a, b) > 0.5


def test_null_calibrated_scores():
    rng = np.random.default_rng(2)
    x, unrelated = rng.normal(size=(80, 32)), rng.normal(size=(80, 32))
    related = x + 0.5 * rng.normal(size=(80, 32))
    for name in ("cka", "unbiased_cka", "mutual_knn", "cknna", "svcca"):
        fn = measure(name, k=5, keep=0.9)
        noise = null_calibrated(fn, x, unrelated, permutations=40, seed=0)
        signal = null_calibrated(fn, x, related, permutations=40, seed=0)
        assert abs(noise["z"]) < 3.5, (name, noise)  # within noise of 0
        assert signal["z"] > 5, (name, signal)
        assert noise["raw"] == pytest.approx(fn(x, unrelated))
    again = null_calibrated(measure("cka"), x, related, permutations=10, seed=0)
    assert again == null_calibrated(measure("cka"), x, related, permutations=10, seed=0)  # seeded


def test_svcca_warns_where_its_raw_value_means_nothing():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))  # unrelated, wide, few samples
    with pytest.warns(UserWarning, match="near 1 for any features"):
        assert svcca(a, b) > 0.9


def test_bad_inputs_are_named():
    with pytest.raises(ShapeError, match="same n samples"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(VrlabError, match="k=9 nearest neighbours"):
        mutual_knn(np.ones((9, 2)), np.ones((9, 2)), 9)
    with pytest.raises(VrlabError, match="unknown similarity measure 'rsa'"):
        measure("rsa")
    with pytest.raises(VrlabError, match="at least 4 samples"):
        linear_cka(torch.zeros(3, 2), torch.zeros(3, 2))
