"""LoftQ: a quantised base weight plus adapters that absorb the quantisation error (PEFT's
``loftq``, peft/utils/loftq_utils.py; paper https://huggingface.co/papers/2310.08659).

With W [out, in] (fp32), s the adapter's scaling, r its rank and T = loftq_iter:

  R₀ = W
  for t = 1..T:   Q = dequant(quant(R_{t-1}))              (bitsandbytes NF4, blocksize 64)
                  s·B·A = rank-r SVD truncation of W - Q    (A = sqrt(S_r/s) Vh_r, B = U_r sqrt(S_r/s))
                  R_t = W - s·B·A
  base weight ← Q (dequantised, in W's dtype), adapters A, B.

Scaling: PEFT stores B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r whatever the scaling, so its model
at init is Q + s·(W - Q)_r, which reproduces W only when s = lora_alpha / r = 1. Here s is
divided out, so the model at init is Q + (W - Q)_r for every alpha; at s = 1 both agree.

Quantisation is bitsandbytes' own NF4 (``quantize_4bit`` / ``dequantize_4bit``, CPU or GPU,
``compress_statistics=False`` as in PEFT). Only ``loftq_bits=4`` is supported: bitsandbytes
has no 2-bit quantiser, and its int8 path (PEFT's 8-bit LoftQ) needs CUDA.

Tensor parallelism: NF4 quantises the row-major flattened tensor in blocks of 64 values, each
with its own absmax. A TP shard quantised on its own gives exactly the global result when
every block lies inside one shard piece:
  column-parallel (whole rows; strided fc1: pieces of out/(t·stride) rows): (out/(t·stride))·in % 64 == 0
  row-parallel (a column block of every row):                               in/t % 64 == 0
Otherwise the layer is refused (it would quantise differently at TP=1). The residual's
rank-r SVD takes the Gram-eigh path of :mod:`dist_lora.factors.weight_driven` (in² or out² fp64
per rank, never the full weight), so results equal TP=1's up to fp rounding of the SVD; Q is
bit-identical.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .weight_driven import sharded_weight_driven_factors, weight_driven_factors

SUPPORTED_BITS = (4,)
NF4_BLOCKSIZE = 64
INSTALL_HINT = "pip install bitsandbytes==0.50.2"


def bnb_functional():
    """``bitsandbytes.functional``, or an ImportError saying how to install it."""
    try:
        import bitsandbytes.functional as F
    except ImportError as exc:
        raise ImportError(f"init_lora_weights='loftq' quantises with bitsandbytes, which is not installed: {INSTALL_HINT}") from exc
    return F


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"LoftQ here supports loftq_bits=4 (bitsandbytes NF4) only, got loftq_bits={bits!r}: bitsandbytes "
            "has no 2-bit quantiser and its int8 quantisation needs CUDA."
        )


def check_shard_blocks(out_local: int, in_local: int, layout: Optional[str], size: int, stride: int = 1, name: str = "layer") -> None:
    """Refuse a TP shard whose NF4 blocks would straddle shards (see the module docstring)."""
    if layout is None or size == 1:
        return
    if layout == "column":
        piece = (out_local // stride) * in_local
        if piece % NF4_BLOCKSIZE:
            raise ValueError(
                f"LoftQ under TP={size}: {name!r} is column-parallel with pieces of {out_local // stride} rows x "
                f"{in_local} = {piece} values, not a multiple of the NF4 block size {NF4_BLOCKSIZE}, so per-shard "
                "quantisation would differ from TP=1; use a TP size that keeps whole blocks per shard."
            )
    elif in_local % NF4_BLOCKSIZE:
        raise ValueError(
            f"LoftQ under TP={size}: {name!r} is row-parallel with {in_local} columns per shard, not a multiple "
            f"of the NF4 block size {NF4_BLOCKSIZE}, so per-shard quantisation would differ from TP=1; use a TP "
            "size that keeps whole blocks per shard."
        )


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(W)) with NF4, blocksize 64, no nested statistics (fp32)."""
    F = bnb_functional()
    q, state = F.quantize_4bit(
        weight.detach().float().contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=False
    )
    return F.dequantize_4bit(q, state).float()


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    bits: int = 4,
    iters: int = 1,
    layout: Optional[str] = None,
    group=None,
    rank: int = 0,
    size: int = 1,
    stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A part, B part, Q part) for this rank, fp32: ``weight`` is this rank's [out(_i), in(_i)]
    shard (the whole weight when ``layout`` is None)."""
    check_bits(bits)
    if iters < 1:
        raise ValueError(f"loftq_iter must be >= 1, got {iters}.")
    check_shard_blocks(weight.shape[0], weight.shape[1], layout, size, stride)
    w = weight.detach().float()
    rest = w
    for step in range(iters):
        q = nf4_roundtrip(rest)
        if layout is None:
            a, b, _ = weight_driven_factors(w - q, r, scaling, "pissa")
        else:
            a, b, _ = sharded_weight_driven_factors(w - q, r, scaling, "pissa", layout, group, rank, stride)
        if step + 1 < iters:
            rest = w - scaling * (b @ a)
    return a, b, q


# --- a model quantised with bitsandbytes -------------------------------------------------------


def dequantized_4bit(weight) -> torch.Tensor:
    """The fp32 weight a bitsandbytes ``Params4bit`` computes with, without changing it.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for its CPU
    kernel at the first inference forward, and stores the block scales (absmax) transposed
    and rounded to bf16 from then on: the layer's weight is then codes x bf16(absmax). The
    codes are unpacked on a copy and dequantised with those scales."""
    F = bnb_functional()
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        absmax = state.absmax.t().reshape(-1).float().contiguous()  # [N, K/bs] order again
        data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        state.absmax, state.nested, state.dtype = absmax, False, torch.float32
    return F.dequantize_4bit(data, state).float()
