"""What the factor math needs of a base weight, checked before anything changes: a float
weight (the SVD / QR / NF4 run in fp32/fp64 from it) and a rank the decomposition has."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import InitValue

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _where(name: Optional[str]) -> str:
    return f" on {name!r}" if name else ""


def check_base_dtype(dtype: torch.dtype, init: InitValue, name: Optional[str] = None, hint: str = "") -> None:
    """TypeError unless ``dtype`` is a float type the factor math reads (``name``: the module,
    ``hint``: what to do instead, both in the message)."""
    if dtype not in FLOAT_DTYPES:
        has = f"{name!r} has {dtype}" if name else f"got {dtype}"
        raise TypeError(f"init_lora_weights={init!r} needs a float32/float16/bfloat16 base weight, {has}{hint}.")


def check_rank_fits(r: int, in_features: int, out_features: int, init: InitValue, name: Optional[str] = None) -> None:
    """ValueError unless the rank-r decomposition exists: r <= min(in_features, out_features)."""
    most = min(in_features, out_features)
    if r > most:
        raise ValueError(
            f"init_lora_weights={init!r} needs r <= min(in_features, out_features) = {most}{_where(name)}, got r={r}."
        )
