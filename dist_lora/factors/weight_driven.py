"""PiSSA and OLoRA: adapters initialised from the base weight (PEFT's ``pissa_init`` /
``olora_init`` formulas, peft/tuners/lora/layer.py).

With W [out, in] (fp32) and s the adapter's scaling:

  "pissa"            W = U S Vh (full SVD);           A = diag(sqrt(S_r/s)) Vh_r,  B = U_r diag(sqrt(S_r/s))
  "pissa_niter_<N>"  U_r, S_r, V_r = svd_lowrank(W, q=r, niter=N) (randomised; seeded from the
                     adapter's init seed so that it is reproducible), then as above
  "olora"            Q, R = qr(W) (reduced);          A = R[:r],  B = Q[:, :r]

and the base weight becomes W - s·B·A, so the model's output at init is unchanged.

Unsharded layers (nn.Linear / Conv1D) use :func:`weight_driven_factors` (PEFT's exact calls);
megatron parallel layers use :func:`sharded_weight_driven_factors` below.
"""

from __future__ import annotations

import torch

from ..config import InitKind
from ..parallel.collectives import all_gather, all_reduce, broadcast_from_first


def _weight_driven_kind(init: str) -> InitKind:
    """``init`` read as a PiSSA / OLoRA method, or ValueError."""
    kind = InitKind.of(init)
    if not kind.weight_driven:
        raise ValueError(f"init_lora_weights must be 'pissa', 'pissa_niter_<N>' or 'olora', got {init!r}.")
    return kind


@torch.no_grad()
def weight_driven_factors(
    weight: torch.Tensor, r: int, scaling: float, init: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], residual W - s·B·A), all fp32, for an [out, in] ``weight``."""
    kind = _weight_driven_kind(init)
    w = weight.detach().to(torch.float32)
    if kind.method == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        if kind.niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                u_r, s_r, v_r = torch.svd_lowrank(w, q=r, niter=kind.niter)
            vh_r = v_r.t()
        root = torch.sqrt(s_r / scaling)
        a = (root[:, None] * vh_r).contiguous()
        b = (u_r * root[None, :]).contiguous()
    residual = w - scaling * (b @ a)
    return a, b, residual


# --- tensor-parallel shards ----------------------------------------------------------------
#
# A parallel layer (at any TP size, TP=1 included, so that every TP size runs the same
# algorithm) passes its weight shard, its layout and its TP group:
#
#   "column"  W_i = rows of W [out_i, in] (megatron's strided split allowed: the SVD/QR
#             below never needs the global row order);
#             A replicated [r, in], B sharded like the rows [out_i, r].
#   "row"     W_i = columns of W [out, in_i] (contiguous split); A sharded [r, in_i],
#             B replicated [out, r].
#
# PiSSA / pissa_niter_<N> (exact for every N: the randomised svd_lowrank is NOT used under
# TP; a parallel layer always takes this exact Gram-eigh path):
#   column  G = WᵀW = Σ_i W_iᵀW_i (in×in, fp64, one all-reduce); eigh(G) = V S² Vᵀ;
#           U_i = W_i V_r S_r⁻¹ (local).                          memory: in² fp64 per rank
#   row     G = WWᵀ = Σ_i W_iW_iᵀ (out×out, fp64, one all-reduce); eigh(G) = U S² Uᵀ;
#           Vh_i = S_r⁻¹ U_rᵀ W_i (local).                         memory: out² fp64 per rank
#   The replicated eigenvectors get a deterministic sign (largest-|.| entry of each column
#   positive) and are broadcast from the group's first rank, so they are bit-identical.
#   The Gram matrix squares the condition number: singular values far below
#   sqrt(eps_fp64)·S_max lose relative accuracy. The leading r (those PiSSA keeps) agree
#   with torch.linalg.svd to ~1e-6 relative on fp32 weights.
# OLoRA:
#   column  TSQR: W_i = Q_i R_i (local), all-gather the R_i (t·k×in, k = min(out_i, in)),
#           [R_1; ...; R_t] = Q' R; Q's block i = Q_i Q'_i.           memory: t·k·in per rank
#   row     Q_r R_rr = W[:, :r] (the first r columns, gathered: out×r per rank);
#           R_r,i = Q_rᵀ W_i (local): R[:r] = Q_rᵀ W.
#   diag(R) is made non-negative, so Q and R are unique (PEFT/LAPACK's QR may differ from
#   these by the sign of a component; s·B·A is the same).
# None of these gathers the full weight on a rank.


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, idx[None, :]))
    signs[signs == 0] = 1
    return vectors * signs


def _top_eigen(gram: torch.Tensor, r: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors [n, r], singular values [r]) of the r largest eigenvalues of a Gram matrix."""
    return eigen_range(gram, 0, r, group)


def eigen_range(gram: torch.Tensor, start: int, stop: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs ``start:stop`` of a Gram matrix in descending order of eigenvalue:
    (vectors [n, stop - start], singular values sqrt(eigenvalue) [stop - start]), with
    deterministic signs, broadcast from the group's first rank (bit-identical everywhere)."""
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(-1)
    vecs = _fix_signs(evecs[:, start:stop].contiguous())
    sing = evals[start:stop].clamp_min(0).sqrt().contiguous()
    return broadcast_from_first(vecs, group), broadcast_from_first(sing, group)


@torch.no_grad()
def sharded_weight_driven_factors(
    shard: torch.Tensor, r: int, scaling: float, init: str, layout: str, group=None, rank: int = 0, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (A part, B part, residual W_i - s·(B·A)_i), fp32, for a TP weight shard."""
    kind = _weight_driven_kind(init)
    if layout not in ("column", "row"):
        raise ValueError(f"layout must be 'column' or 'row', got {layout!r}.")
    w = shard.detach().to(torch.float64)
    if kind.method == "olora":
        if layout == "column":
            q_loc, r_loc = torch.linalg.qr(w)
            k = r_loc.shape[0]
            q2, r_full = torch.linalg.qr(torch.cat(all_gather(r_loc, group), dim=0))
            q_i = q_loc @ q2[rank * k : (rank + 1) * k]
            r_full = broadcast_from_first(r_full.contiguous(), group)
            signs = torch.sign(torch.diagonal(r_full))
            signs[signs == 0] = 1
            a, b = signs[:r, None] * r_full[:r], q_i[:, :r] * signs[None, :r]
        else:
            if stride != 1:
                raise NotImplementedError("init_lora_weights='olora' on a strided row-parallel weight is not supported.")
            cols = torch.cat(all_gather(w[:, : min(r, w.shape[1])].contiguous(), group), dim=1)[:, :r]
            q, rr = torch.linalg.qr(cols)
            signs = torch.sign(torch.diagonal(rr))
            signs[signs == 0] = 1
            q = broadcast_from_first((q * signs[None, :]).contiguous(), group)
            a, b = q.t() @ w, q
    else:  # PiSSA, exact whatever pissa_niter_<N> says (see above)
        if layout == "column":
            v, s = _top_eigen(all_reduce(w.t() @ w, group), r, group)
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            u_i = (w @ v) * inv[None, :]
            root = torch.sqrt(s / scaling)
            a, b = root[:, None] * v.t(), u_i * root[None, :]
        else:
            u, s = _top_eigen(all_reduce(w @ w.t(), group), r, group)
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            vh_i = inv[:, None] * (u.t() @ w)
            root = torch.sqrt(s / scaling)
            a, b = root[:, None] * vh_i, u * root[None, :]
    a, b = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
    residual = shard.detach().to(torch.float32) - scaling * (b @ a)
    return a, b, residual
