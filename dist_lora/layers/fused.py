"""Communication-fused tensor-parallel LoRA: the LoRA path rides on the base layer's own
collective, forward and backward, so a LoRA layer does no collective the frozen base does not.

Notation as in :mod:`dist_lora.layers.parallel`: TP ranks i, s the scale, h = s·A x.

Column-parallel (W_i rows of W, A replicated, B_i rows of B), input x replicated or, under
sequence parallelism, sequence-sharded and all-gathered by the base:
    forward   y_i = W_i x + B_i h                                  (no collective; SP: the base's all-gather)
    backward  dx  = Σ_i (W_iᵀ dy_i + s·Aᵀ B_iᵀ dy_i)                the base's one all-reduce (SP: reduce-scatter)
              dB_i = dy_i hᵀ                                        local and complete
              dA  = Σ_i s·(B_iᵀ dy_i) xᵀ = Σ_i dA_i                 dA_i local; summed once per step
  Under SP, dA_i needs the sequence-gathered x, which a frozen base does not keep: either keep
  it from forward (``keep_gathered_input=True``: one [s, b, h] tensor per layer) or re-gather
  it in backward (default: one extra all-gather per layer in backward, issued before the dgrad
  matmul so that the two overlap).

Row-parallel (W_i columns of W, x_i features i, A_i columns of A, B replicated):
    forward   y = Σ_i (W_i x_i + B h_i),  h_i = s·A_i x_i           the base's one all-reduce (SP: reduce-scatter)
    backward  dy complete on every rank (SP: the base's all-gather)
              dx_i = W_iᵀ dy + s·A_iᵀ Bᵀ dy,  dA_i = s·(Bᵀ dy) x_iᵀ  local
              dB  = Σ_i dy h_iᵀ = Σ_i dB_i                          dB_i local; summed once per step

The per-step sums (A of column layers, B of row layers) are done by
:func:`dist_lora.parallel.grads.finalize_lora_grads` in one flattened all-reduce for all layers.
Those parameters carry ``tp_partial_grad = True`` (set by :mod:`dist_lora.layers.parallel`).

Saved for backward: the frozen weights (no copy), the r-sized h, the input the LoRA path
needs (x, or the local sequence shard under SP with re-gathering), and dropout masks only
when dropout is on. The base needs no saved input: its weight is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import math as lm


@dataclass(frozen=True)
class FusedSpec:
    """Static facts of one fused call (not tensors, so not part of autograd)."""

    group: Optional[dist.ProcessGroup]
    tp_size: int
    sequence_parallel: bool
    scalings: tuple[float, ...]
    keep_gathered_input: bool = False


def _all_reduce(t: torch.Tensor, spec: FusedSpec) -> torch.Tensor:
    if spec.tp_size > 1:
        dist.all_reduce(t, group=spec.group)
    return t


def _all_gather_seq(t: torch.Tensor, spec: FusedSpec, async_op: bool = False):
    """Concatenate the sequence shards (dim 0) of every TP rank."""
    out = torch.empty((t.shape[0] * spec.tp_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
    work = dist.all_gather_into_tensor(out, t.contiguous(), group=spec.group, async_op=async_op)
    return (out, work) if async_op else out


def _reduce_scatter_seq(t: torch.Tensor, spec: FusedSpec) -> torch.Tensor:
    out = torch.empty((t.shape[0] // spec.tp_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.reduce_scatter_tensor(out, t.contiguous(), group=spec.group)
    return out


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _base_plus_lora(x: torch.Tensor, weight: torch.Tensor, terms: list, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x Wᵀ (+ bias) + Σ_k left_k right_kᵀ over the token dimension (x's leading dims kept).

    Order matters for speed, not for the math: the r-sized products (K = r) write the fresh
    result first, and the compute-bound base GEMM accumulates into it (β = 1 inside a large
    GEMM is almost free). The other order adds each skinny product with a separate
    read-modify-write pass over the out-sized result. Used for the forward output
    (left = h, right = B) and for the input gradient (left = s·dh, right = Aᵀ, weight = Wᵀ).
    """
    x_t = _tokens(x)
    out = None
    for left, right in terms:
        if out is None:
            out = torch.mm(_tokens(left), right.t()) if bias is None else torch.addmm(bias, _tokens(left), right.t())
        else:
            out.addmm_(_tokens(left), right.t())
    if out is None:
        out = torch.mm(x_t, weight.t()) if bias is None else torch.addmm(bias, x_t, weight.t())
    else:
        out.addmm_(x_t, weight.t())
    return out.view(*x.shape[:-1], out.shape[-1])


def _factor_grad(h: torch.Tensor, dy_t: torch.Tensor) -> torch.Tensor:
    """dB = dyᵀ h, computed as (hᵀ dy)ᵀ: the same product, but the [r, T] x [T, out] layout
    runs up to 2x faster than [out, T] x [T, r] on CPU (measured, one thread, T = 1024:
    0.50 vs 1.03 ms at out = 1024, 1.36 vs 1.47 ms at out = 2816)."""
    return _tokens(h).T.matmul(dy_t).T.contiguous()  # the copy is [out, r]: negligible


def _input_grad(dy: torch.Tensor, weight: torch.Tensor, lora: list) -> torch.Tensor:
    """dx = dy W + Σ_adapters mask ⊙ (dh_s A), given (dh_s, A, mask) per adapter with dh_s the
    already scaled r-sized gradient; unmasked terms go through :func:`_base_plus_lora`."""
    dx = _base_plus_lora(dy, weight.t(), [(dh, a.t()) for dh, a, mask in lora if mask is None])
    for dh, a, mask in lora:
        if mask is not None:
            dx += dh.matmul(a) * mask
    return dx


def _lora_down(x: torch.Tensor, adapters: list) -> list[torch.Tensor]:
    """h = s · A (mask ⊙ x) per adapter, the r-sized intermediates (``adapters`` as
    ``zip(_unpack(...), scalings)``)."""
    return [F.linear(x if mask is None else x * mask, a).mul_(scale) for (a, _, _, mask), scale in adapters]


def _unpack(factors: tuple, spec: FusedSpec):
    """(A, B, B-bias or None, dropout mask or None) per adapter from the flat factor list."""
    n = len(spec.scalings)
    return [tuple(factors[4 * k : 4 * k + 4]) for k in range(n)]


def _saved(ctx) -> tuple:
    """(spec, input, weight, the r-sized h per adapter, the flat factor list) as forward saved them."""
    spec: FusedSpec = ctx.spec
    x, weight, *rest = ctx.saved_tensors
    n = len(spec.scalings)
    return spec, x, weight, rest[:n], rest[n:]


class ColumnParallelLoRA(torch.autograd.Function):
    """y_i = x W_iᵀ + b_i + Σ_adapters s·(mask⊙x) Aᵀ B_iᵀ + s·b_B,i, with the collectives of
    a frozen ColumnParallelLinear only (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: FusedSpec, *factors):
        x_full = _all_gather_seq(x, spec) if spec.sequence_parallel else x
        adapters = list(zip(_unpack(factors, spec), spec.scalings))
        hs = _lora_down(x_full, adapters)
        out = _base_plus_lora(x_full, weight, [(h, b) for h, ((_, b, _, _), _) in zip(hs, adapters)], bias)
        for (_, _, b_bias, _), scale in adapters:
            if b_bias is not None:
                out.add_(lm.scaled_bias(b_bias, scale))
        keep = not spec.sequence_parallel or spec.keep_gathered_input
        ctx.spec = spec
        ctx.save_for_backward(x_full if keep else x, weight, *hs, *factors)
        return out

    @staticmethod
    def backward(ctx, dy):
        spec, x_saved, weight, hs, factors = _saved(ctx)
        regather = spec.sequence_parallel and not spec.keep_gathered_input
        if regather:  # issue the all-gather first; the dgrad matmul below overlaps it
            x_full, work = _all_gather_seq(x_saved, spec, async_op=True)
        else:
            x_full, work = x_saved, None
        dy_t = _tokens(dy)
        grads, lora = [], []
        for (a, b, b_bias, mask), h, scale in zip(_unpack(factors, spec), hs, spec.scalings):
            dh = dy.matmul(b).mul_(scale)  # s·B_iᵀ dy_i: r-sized, partial over TP
            d_b = _factor_grad(h, dy_t)
            d_bias = dy_t.sum(0) * scale if b_bias is not None else None
            grads.append([None, d_b, d_bias, None])
            lora.append((dh, a, mask))
        need_dx = ctx.needs_input_grad[0]
        dx = _input_grad(dy, weight, lora) if need_dx else None
        if work is not None:
            work.wait()
        for grad, (dh, _, mask) in zip(grads, lora):
            x_lora = _tokens(x_full if mask is None else x_full * mask)
            grad[0] = _tokens(dh).T.matmul(x_lora)  # dA_i: partial, summed per step
        if need_dx:  # the base layer's one collective carries the LoRA term too
            dx = _reduce_scatter_seq(dx, spec) if spec.sequence_parallel else _all_reduce(dx, spec)
        d_bias_base = dy_t.sum(0) if ctx.needs_input_grad[2] else None
        flat = [g for grad in grads for g in grad]
        return (dx, None, d_bias_base, None, *flat)


class RowParallelLoRA(torch.autograd.Function):
    """y = Σ_i (x_i W_iᵀ + Σ_adapters s·(mask⊙x_i) A_iᵀ Bᵀ), reduced over TP by the base's
    own all-reduce (reduce-scatter under SP). Biases are added by the caller after the sum."""

    @staticmethod
    def forward(ctx, x, weight, spec: FusedSpec, *factors):
        adapters = list(zip(_unpack(factors, spec), spec.scalings))
        hs = _lora_down(x, adapters)
        partial = _base_plus_lora(x, weight, [(h, b) for h, ((_, b, _, _), _) in zip(hs, adapters)])
        out = _reduce_scatter_seq(partial, spec) if spec.sequence_parallel else _all_reduce(partial, spec)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, *hs, *factors)
        return out

    @staticmethod
    def backward(ctx, dy):
        spec, x, weight, hs, factors = _saved(ctx)
        if spec.sequence_parallel:
            dy = _all_gather_seq(dy, spec)  # the base's own backward collective
        dy_t = _tokens(dy)
        flat, lora = [], []
        for (a, b, _bias, mask), h, scale in zip(_unpack(factors, spec), hs, spec.scalings):
            dh = dy.matmul(b).mul_(scale)
            x_lora = _tokens(x if mask is None else x * mask)
            d_a = _tokens(dh).T.matmul(x_lora)
            d_b = _factor_grad(h, dy_t)  # partial over TP, summed per step
            flat += [d_a, d_b, None, None]
            lora.append((dh, a, mask))
        dx = _input_grad(dy, weight, lora) if ctx.needs_input_grad[0] else None
        return (dx, None, None, *flat)
