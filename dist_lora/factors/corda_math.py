"""CorDA's decomposition: from a layer's (sharded) weight and its input covariance to this
rank's (U_r, S_r, V_WC,r), and from those to the adapter factors. The formulas and the
tensor-parallel routes (Gram matrices, never the gathered weight) are in
:mod:`dist_lora.init.corda`'s docstring; the data pass and files are there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel.collectives import all_gather, all_reduce
from .weight_driven import eigen_range


@dataclass
class CordaEigens:
    """This rank's part of PEFT's ``eigens``: ``u`` ~ U_WC [out(_i), r] (sharded like B),
    ``s`` ~ S_WC [r], ``v`` ~ V_WC [in(_i), r] (sharded like Aᵀ)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def _damping(cov: torch.Tensor, name: str) -> float:
    """PEFT's damping factor d: 0.01, doubled until Ĉ = C + d·mean(diag C)·I passes the
    inverse test ||Ĉ Ĉ⁻¹ - I||_F < 0.05 in fp32 (fp32 as PEFT, so the same d is chosen)."""
    c32 = cov.float()
    eye32 = torch.eye(c32.shape[0])
    mean = torch.mean(torch.diag(c32))
    damp = 0.01
    for _ in range(64):
        fixed = c32 + eye32 * mean * damp
        try:
            if torch.dist(fixed @ torch.linalg.inv(fixed), eye32).item() < 0.05:
                return damp
        except RuntimeError:  # singular in fp32
            pass
        damp *= 2
    raise ValueError(f"CorDA: the covariance of {name!r} cannot be inverted even with damping (NaN, Inf or all zero?).")


def damped_covariance(cov: torch.Tensor, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(Ĉ, Ĉ⁻¹) in fp64, with PEFT's damping factor (:func:`_damping`)."""
    c64 = cov.double()
    fixed = c64 + torch.eye(c64.shape[0], dtype=torch.float64) * torch.mean(torch.diag(c64)) * _damping(cov, name)
    return fixed, torch.linalg.inv(fixed)


def _crop(k: int, r: int, method: str) -> tuple[int, int]:
    if method == "ipm":
        return 0, r
    if method == "kpm":
        return k - r, k
    raise ConfigError(f"corda_method must be 'ipm' or 'kpm', got {method!r}.")


@torch.no_grad()
def dense_corda_eigens(weight: torch.Tensor, cov: torch.Tensor, r: int, method: str, name: str = "layer") -> CordaEigens:
    """PEFT's fp32 computation for an unsharded [out, in] weight."""
    w = weight.detach().float()
    c = cov.float()
    fixed = c + torch.eye(c.shape[0]) * torch.mean(torch.diag(c)) * _damping(cov, name)
    inv = torch.linalg.inv(fixed)
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).t()
    lo, hi = _crop(s.shape[0], r, method)
    return CordaEigens(u[:, lo:hi].contiguous(), s[lo:hi].contiguous(), v[:, lo:hi].contiguous())


@torch.no_grad()
def sharded_corda_eigens(
    shard: torch.Tensor, cov: torch.Tensor, r: int, method: str, layout: str, group=None, rank: int = 0, size: int = 1, name: str = "layer"
) -> CordaEigens:
    """This rank's :class:`CordaEigens` for a TP weight shard ([out_i, in] column, [out, in_i]
    row) and the full covariance ``cov`` (in × in, identical on every rank)."""
    w = shard.detach().double()
    fixed, inv = damped_covariance(cov, name)
    if layout == "column":
        n_in, out_i = w.shape[1], w.shape[0]
        out = out_i * size
        k = min(n_in, out)
        lo, hi = _crop(k, r, method)
        m = w @ fixed
        v_m, sing = eigen_range(all_reduce(m.t() @ m, group), lo, hi, group)
        _check_positive(sing, name)
        u = (m @ v_m) / sing[None, :]
        v = inv @ v_m
    elif layout == "row":
        n_loc, out = w.shape[1], w.shape[0]
        k = min(n_loc * size, out)
        lo, hi = _crop(k, r, method)
        m = None
        for j in range(size):  # M_j = Σ_i W_i Ĉ_ij, reduced onto rank j one block at a time
            part = w @ fixed[rank * n_loc : (rank + 1) * n_loc, j * n_loc : (j + 1) * n_loc]
            if size > 1:
                dist.reduce(part, dst=dist.get_global_rank(group, j), group=group)
            if j == rank:
                m = part
        u, sing = eigen_range(all_reduce(m @ m.t(), group), lo, hi, group)
        _check_positive(sing, name)
        vh_loc = (u.t() @ m) / sing[:, None]
        vh = torch.cat(all_gather(vh_loc.contiguous(), group), dim=1)
        v = (vh @ inv).t()[rank * n_loc : (rank + 1) * n_loc]
    else:
        raise ValueError(f"layout must be 'column' or 'row', got {layout!r}.")
    return CordaEigens(u.float().contiguous(), sing.float().contiguous(), v.float().contiguous())


def _check_positive(sing: torch.Tensor, name: str) -> None:
    if not (sing > 0).all():
        raise ValueError(
            f"CorDA: {name!r}: W·C has fewer non-zero singular values than the rank asks for; "
            "lower r or use corda_method='ipm'."
        )


def corda_factors(eigens: CordaEigens, weight: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A part [r, in(_i)], B part [out(_i), r], W_i - s·B·A_i) for this rank, fp32; ``weight``
    is this rank's [out(_i), in(_i)] shard. Local: no communication."""
    root = torch.sqrt(eigens.s.float() / scaling)
    a = (eigens.v.float().t() * root[:, None]).contiguous()
    b = (eigens.u.float() * root[None, :]).contiguous()
    return a, b, weight.detach().float() - scaling * (b @ a)


def check_stored(t: torch.Tensor, shape: tuple, what: str, fix: str) -> None:
    """Refuse a stored CorDA tensor (covariance or factor) of the wrong shape, saying how to
    fix it, or one holding NaN/Inf."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}; {fix}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or Inf.")
