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
Those parameters carry ``tp_partial_grad = True``.

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


def _add_matmul_(out: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor, alpha: float = 1.0) -> None:
    """out += alpha · left @ right_tᵀ over the token dimension, in place (no out-sized temporary)."""
    out.view(-1, out.shape[-1]).addmm_(_tokens(left), right_t.t(), alpha=alpha)


def _add_lora_dx_(dx: torch.Tensor, dh: torch.Tensor, a: torch.Tensor, scale: float, mask) -> None:
    """dx += mask ⊙ (scale · dh A), in place when there is no dropout mask."""
    if mask is None:
        _add_matmul_(dx, dh, a.t(), alpha=scale)
    else:
        dx += dh.matmul(a).mul_(scale) * mask


def _unpack(factors: tuple, spec: FusedSpec):
    """(A, B, B-bias or None, dropout mask or None) per adapter from the flat factor list."""
    n = len(spec.scalings)
    return [tuple(factors[4 * k : 4 * k + 4]) for k in range(n)]


class ColumnParallelLoRA(torch.autograd.Function):
    """y_i = x W_iᵀ + b_i + Σ_adapters s·(mask⊙x) Aᵀ B_iᵀ + s·b_B,i, with the collectives of
    a frozen ColumnParallelLinear only (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: FusedSpec, *factors):
        x_full = _all_gather_seq(x, spec) if spec.sequence_parallel else x
        out = F.linear(x_full, weight, bias)
        hs = []
        for (a, b, b_bias, mask), scale in zip(_unpack(factors, spec), spec.scalings):
            x_lora = x_full if mask is None else x_full * mask
            h = F.linear(x_lora, a).mul_(scale)
            _add_matmul_(out, h, b)
            if b_bias is not None:
                out.add_(b_bias, alpha=scale)
            hs.append(h)
        keep = not spec.sequence_parallel or spec.keep_gathered_input
        ctx.spec = spec
        ctx.save_for_backward(x_full if keep else x, weight, *hs, *factors)
        return out

    @staticmethod
    def backward(ctx, dy):
        spec: FusedSpec = ctx.spec
        x_saved, weight, *rest = ctx.saved_tensors
        n = len(spec.scalings)
        hs, factors = rest[:n], rest[n:]
        regather = spec.sequence_parallel and not spec.keep_gathered_input
        if regather:  # issue the all-gather first; the dgrad matmul below overlaps it
            x_full, work = _all_gather_seq(x_saved, spec, async_op=True)
        else:
            x_full, work = x_saved, None
        need_dx = ctx.needs_input_grad[0]
        dx = dy.matmul(weight) if need_dx else None
        dy_t = _tokens(dy)
        grads = []
        lora_inputs = []
        for (a, b, b_bias, mask), h, scale in zip(_unpack(factors, spec), hs, spec.scalings):
            dh = dy.matmul(b)  # r-sized, partial over TP
            if need_dx:
                _add_lora_dx_(dx, dh, a, scale, mask)
            d_b = dy_t.T.matmul(_tokens(h))
            d_bias = dy_t.sum(0) * scale if b_bias is not None else None
            grads.append([None, d_b, d_bias, None])
            lora_inputs.append((dh, mask))
        if work is not None:
            work.wait()
        for grad, (dh, mask), scale in zip(grads, lora_inputs, spec.scalings):
            x_lora = _tokens(x_full if mask is None else x_full * mask)
            grad[0] = _tokens(dh).T.matmul(x_lora).mul_(scale)  # dA_i: partial, summed per step
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
        partial = F.linear(x, weight)
        hs = []
        for (a, b, _bias, mask), scale in zip(_unpack(factors, spec), spec.scalings):
            x_lora = x if mask is None else x * mask
            h = F.linear(x_lora, a).mul_(scale)
            _add_matmul_(partial, h, b)
            hs.append(h)
        out = _reduce_scatter_seq(partial, spec) if spec.sequence_parallel else _all_reduce(partial, spec)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, *hs, *factors)
        return out

    @staticmethod
    def backward(ctx, dy):
        spec: FusedSpec = ctx.spec
        x, weight, *rest = ctx.saved_tensors
        n = len(spec.scalings)
        hs, factors = rest[:n], rest[n:]
        if spec.sequence_parallel:
            dy = _all_gather_seq(dy, spec)  # the base's own backward collective
        need_dx = ctx.needs_input_grad[0]
        dx = dy.matmul(weight) if need_dx else None
        dy_t = _tokens(dy)
        flat = []
        for (a, b, _bias, mask), h, scale in zip(_unpack(factors, spec), hs, spec.scalings):
            dh = dy.matmul(b).mul_(scale)
            if need_dx:
                _add_lora_dx_(dx, dh, a, 1.0, mask)
            x_lora = _tokens(x if mask is None else x * mask)
            d_a = _tokens(dh).T.matmul(x_lora)
            d_b = dy_t.T.matmul(_tokens(h))  # partial over TP, summed per step
            flat += [d_a, d_b, None, None]
        return (dx, None, None, *flat)
