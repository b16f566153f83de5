"""Incremental PCA (Ross et al. 2008; scikit-learn's ``IncrementalPCA``) and EVA's
convergence test, in torch.

State after the batches X_1 .. X_t (rows are samples, d features), keeping k components:
  n_t     samples seen;   mu_t  the mean;   var_t  the per-feature variance (both fp64 sums)
  S_t, V_t  the top-k singular values / right singular vectors of the centred data seen so far,
            as the truncated update below approximates them.

Update with a batch X (n rows, batch mean m):
  first batch:  M = X - mu_1
  later:        M = [ diag(S_{t-1}) V_{t-1}ᵀ ;                       (k rows: the old data, compressed)
                      X - m ;                                        (n rows)
                      sqrt(n_{t-1}·n / n_t) · (mu_{t-1} - m) ]       (1 row: the shift of the mean)
  M = U S Vᵀ (thin SVD), signs fixed so that each row of Vᵀ has its largest-|.| entry positive;
  keep the first k rows of Vᵀ (``components``) and of S.
  explained_variance_ratio_j = S_j² / (n_t · Σ var_t)   (the share of the total variance).
The update is exact when the centred data has rank <= k (nothing is cut off); otherwise it
is the standard streaming approximation.

SVD of M: ``svd="lowrank"`` (PEFT's choice, and the default): ``torch.svd_lowrank`` with
q = 2k, 4 subspace iterations and the generator seeded with 42 (forked, so the caller's
random state is untouched): reproducible, and the same numbers as PEFT's EVA. ``svd="full"``:
LAPACK's exact thin SVD (costlier for large n, d).

Convergence (EVA): after each update, component j has converged when
  cos(v_j^new, v_j^old) >= tau,
the cosine similarity of the new and previous estimate of the same component (the sign fix
above makes the comparison meaningful).
"""

from __future__ import annotations

from typing import Optional

import torch

LOWRANK_SEED = 42
LOWRANK_NITER = 4
SVD_MODES = ("lowrank", "full")


class IncrementalPCA:
    """Top-``n_components`` principal components of a stream of [n, d] batches."""

    def __init__(self, n_components: int, svd: str = "lowrank") -> None:
        if svd not in SVD_MODES:
            raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}.")
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        self.n_components = n_components
        self.svd = svd
        self.n_samples_seen = 0
        self.mean: Optional[torch.Tensor] = None  # fp64 [d]
        self.var: Optional[torch.Tensor] = None  # fp64 [d]
        self.components: Optional[torch.Tensor] = None  # [k, d]
        self.singular_values: Optional[torch.Tensor] = None  # [k]
        self.explained_variance_ratio: Optional[torch.Tensor] = None  # [k]

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def _mean_var(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Chan et al.'s pairwise update of the mean and variance (sums in fp64)."""
        n = x.shape[0]
        total = self.n_samples_seen + n
        new_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - new_sum / n
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_m2 = centred.square().sum(dim=0, dtype=torch.float64) - correction / n
        if self.mean is None:
            return new_sum / total, new_m2 / total, total
        seen = self.n_samples_seen
        old_sum = self.mean * seen
        ratio = seen / n
        m2 = self.var * seen + new_m2 + ratio / total * (old_sum / ratio - new_sum).square()
        return (old_sum + new_sum) / total, m2 / total, total

    def _decompose(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, Vᵀ) of M, signs fixed on the rows of Vᵀ."""
        if self.svd == "full":
            _, s, vt = torch.linalg.svd(m, full_matrices=False)
        else:
            q = min(2 * self.n_components, *m.shape)
            with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
                torch.manual_seed(LOWRANK_SEED)
                _, s, v = torch.svd_lowrank(m, q=q, niter=LOWRANK_NITER)
            vt = v.mH
        idx = vt.abs().argmax(dim=1)
        signs = torch.sign(vt.gather(1, idx[:, None]))
        return s, vt * signs

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> "IncrementalPCA":
        """Fold the batch ``x`` [n, d] (n >= n_components, d >= n_components) into the estimate."""
        n, d = x.shape
        if self.n_components > d:
            raise ValueError(f"n_components={self.n_components} exceeds the number of features {d}.")
        if n < self.n_components:
            raise ValueError(f"a batch of {n} samples is too small for n_components={self.n_components}.")
        if self.mean is not None and d != self.mean.shape[0]:
            raise ValueError(f"a batch with {d} features after batches with {self.mean.shape[0]}.")
        x = x.to(torch.float32) if x.dtype not in (torch.float32, torch.float64) else x
        mean, var, total = self._mean_var(x)
        if self.components is None:
            m = (x - mean).to(x.dtype)
        else:
            batch_mean = x.mean(dim=0)
            shift = ((self.n_samples_seen / total) * n) ** 0.5 * (self.mean - batch_mean)
            m = torch.vstack((self.singular_values[:, None] * self.components, x - batch_mean, shift[None, :]))
        s, vt = self._decompose(m)
        k = self.n_components
        self.components, self.singular_values = vt[:k], s[:k]
        self.explained_variance_ratio = (s**2 / (var * total).sum())[:k]
        self.mean, self.var, self.n_samples_seen = mean, var, total
        return self


def converged_components(new: torch.Tensor, old: Optional[torch.Tensor], tau: float) -> torch.Tensor:
    """[k] bool: cos(new_j, old_j) >= tau for each component (all False without an old estimate)."""
    if old is None:
        return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
    return torch.nn.functional.cosine_similarity(new, old, dim=1) >= tau
