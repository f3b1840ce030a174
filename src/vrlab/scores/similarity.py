"""Representation-similarity proxies between two feature sets of the same n samples, `X` [n, d1] and `Y`
[n, d2], and their null-calibrated forms.

- `linear_cka`: centred kernel alignment with linear kernels (Kornblith et al., 2019), biased HSIC
  (tr(KHLH)) or, with `unbiased`, Song et al.'s unbiased HSIC estimator (which makes CKA of independent
  features near 0 at any width, where the biased one grows with width/n).
- `mutual_knn`: the mean fraction of each sample's k nearest neighbours (cosine, self excluded) shared by the
  two spaces (Huh et al., 2024, the Platonic Representation Hypothesis).
- `cknna`: CKA restricted to mutual-neighbour pairs (same paper): the unbiased HSIC of the Gram matrices
  masked to pairs in both top-k sets, normalised by the same quantity of each side with itself.
- `svcca`: SVD of each centred side down to the directions holding `keep` of its variance, then CCA between
  them; the mean canonical correlation (Raghu et al., 2017).
- `null_calibrated`: the raw value and its z-score against the distribution over random pairings of the two
  sides (rows of `Y` permuted): raw similarity grows with width and depth, the z-score does not.

Everything runs in torch on the inputs' device (GPU where present), accumulating in float64. The kNN
measures L2-normalise rows first (cosine neighbours), as the Platonic code's callers do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.errors import ShapeError, VrlabError

MEASURES = ("cka", "unbiased_cka", "mutual_knn", "cknna", "svcca")


def _pair(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ShapeError(
            f"similarity needs two [n, d] feature sets of the same n samples, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[0] < 4:
        raise VrlabError(
            f"similarity needs at least 4 samples (the unbiased HSIC divides by n-3), got {x.shape[0]}"
        )
    return x.double(), y.to(x.device).double()


def hsic(k: torch.Tensor, g: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """HSIC of two Gram matrices: biased tr(KHGH)/(n-1)^2, or Song et al.'s (2012) unbiased estimator."""
    n = k.shape[0]
    if not unbiased:
        h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
        return torch.trace(k @ h @ g @ h) / (n - 1) ** 2
    kt, lt = k.clone().fill_diagonal_(0), g.clone().fill_diagonal_(0)
    value = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 * (kt @ lt).sum() / (n - 2)
    return value / (n * (n - 3))


def linear_cka(x: Any, y: Any, unbiased: bool = False) -> float:
    """Linear CKA; `unbiased` uses the unbiased HSIC estimator."""
    x, y = _pair(x, y)
    k, g = x @ x.T, y @ y.T
    denom = torch.sqrt(hsic(k, k, unbiased) * hsic(g, g, unbiased))
    return float(hsic(k, g, unbiased) / denom) if denom > 0 else float("nan")


def _topk_mask(gram: torch.Tensor, k: int) -> torch.Tensor:
    g = gram.clone().fill_diagonal_(float("-inf"))
    idx = g.topk(k, dim=1).indices
    return torch.zeros_like(gram).scatter_(1, idx, 1.0)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k < n:
        raise VrlabError(f"k={k} nearest neighbours needs 1 <= k < n ({n} samples)")


def mutual_knn(x: Any, y: Any, k: int = 10) -> float:
    """Mean over samples of |kNN_X(i) ∩ kNN_Y(i)| / k (cosine neighbours, self excluded)."""
    x, y = _pair(x, y)
    _check_k(k, len(x))
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    both = _topk_mask(x @ x.T, k) * _topk_mask(y @ y.T, k)
    return float(both.sum(1).mean() / k)


def cknna(x: Any, y: Any, k: int = 10) -> float:
    """CKNNA: unbiased HSIC of the Gram matrices kept on mutual k-NN pairs, normalised like CKA."""
    x, y = _pair(x, y)
    _check_k(k, len(x))
    if k < 2:
        raise VrlabError("CKNNA needs k >= 2")
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    kx, ly = x @ x.T, y @ y.T

    def masked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = _topk_mask(a, k) * _topk_mask(b, k)
        return hsic(mask * a, mask * b, unbiased=True)

    denom = torch.sqrt(masked(kx, kx) * masked(ly, ly))
    return float(masked(kx, ly) / denom) if denom > 0 else float("nan")


def _reduce(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Orthonormal basis [n, r] of the centred columns' top singular directions holding `keep` of the variance."""
    xc = x - x.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    r = int(torch.searchsorted(energy, torch.tensor(keep, dtype=energy.dtype, device=energy.device))) + 1
    return u[:, : min(r, len(s))]


def svcca(x: Any, y: Any, keep: float = 0.99) -> float:
    """Mean canonical correlation between the SVD-reduced sides (each keeps `keep` of its variance)."""
    x, y = _pair(x, y)
    if not 0 < keep <= 1:
        raise VrlabError(f"svcca keep={keep} must be in (0, 1]")
    qx, qy = _reduce(x, keep), _reduce(y, keep)
    if max(qx.shape[1], qy.shape[1]) > len(x) // 2:
        # kept directions near the sample count overlap whatever the data: raw SVCCA then nears 1
        warnings.warn(  # once per place, not once per permutation of the null
            f"svcca keeps {qx.shape[1]} and {qy.shape[1]} directions of {len(x)} samples: its raw value is near 1 "
            "for any features at this size; compare the null-calibrated z, or lower proxy.keep",
            stacklevel=2,
        )
    # canonical correlations of two orthonormal bases: the singular values of their cross product
    corr = torch.linalg.svdvals(qx.T @ qy)
    return float(corr[: min(qx.shape[1], qy.shape[1])].clamp(max=1.0).mean())


def measure(name: str, **options: Any) -> Callable[[Any, Any], float]:
    """A measure by name (`MEASURES`) with its options bound (`k` for the kNN ones, `keep` for SVCCA)."""
    table: dict[str, Callable[[Any, Any], float]] = {
        "cka": lambda x, y: linear_cka(x, y, False),
        "unbiased_cka": lambda x, y: linear_cka(x, y, True),
        "mutual_knn": lambda x, y: mutual_knn(x, y, int(options.get("k", 10))),
        "cknna": lambda x, y: cknna(x, y, int(options.get("k", 10))),
        "svcca": lambda x, y: svcca(x, y, float(options.get("keep", 0.99))),
    }
    if name not in table:
        raise VrlabError(f"unknown similarity measure '{name}'; choose from {list(MEASURES)}")
    return table[name]


def null_calibrated(
    fn: Callable[[Any, Any], float], x: Any, y: Any, permutations: int = 100, seed: int = 0
) -> dict[str, float]:
    """`fn(x, y)` and its z-score against `fn(x, y[perm])` over random pairings (seeded permutations)."""
    if permutations < 2:
        raise VrlabError(f"a null distribution needs at least 2 permutations, got {permutations}")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    raw = fn(x, y)
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(len(y), generator=gen).to(y.device) for _ in range(permutations)]
    null = torch.tensor([fn(x, y[p]) for p in perms])
    mean, std = float(null.mean()), float(null.std())
    return {
        "raw": raw,
        "null_mean": mean,
        "null_std": std,
        "z": (raw - mean) / std if std > 0 else float("nan"),
        "permutations": permutations,
    }
