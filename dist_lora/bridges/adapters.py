"""LoRA adapters across the bridge: a fused megatron module's adapter <-> one adapter per HF part.

On a fused megatron module (``linear_qkv``, ``linear_fc1``) the adapter's A ([r, in]) is shared
by the HF parts and every row-shaped tensor (B [out, r], ``lora_B.bias``, DoRA's magnitude
[out]) holds the parts' rows in the module's fused layout. So megatron -> HF copies A to every
part and splits the rows (:func:`rows_to_hf`); HF -> megatron merges the parts' row blocks
with :func:`~dist_lora.bridges.layouts.merge_fused` of the entry's layout. The row functions
are the same ones the base weights go through.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .families import DEFAULT_MODULES
from .layouts import Attention, split_fused
from .table import ModuleTable


def rows_to_hf(
    megatron_name: str,
    num_rows: int,
    attention: Optional[Attention] = None,
    shared: bool = False,
    modules: ModuleTable = DEFAULT_MODULES,
) -> list[tuple[str, Optional[torch.Tensor]]]:
    """The HF modules a tensor of a megatron module goes to (its full TP=1 layout, ``num_rows``
    rows on dim 0), each with the indices of the rows it takes (None: the whole tensor).

    ``shared``: the tensor is the same for every HF part (a LoRA A factor), so each gets all
    of it. A fused QKV module needs ``attention`` (the model's heads, groups and head_dim).
    """
    mapped = modules.megatron(megatron_name)
    if len(mapped.hf) == 1 or shared:
        return [(hf, None) for hf in mapped.hf]
    parts = split_fused(mapped.entry.fused, torch.arange(num_rows), attention)
    return list(zip(mapped.hf, parts))


def incomplete_adapter(
    module: str, present: set[str], want: set[str], name: Callable[[str], str] = str, note: str = ""
) -> Optional[str]:
    """None when ``module``'s adapter has exactly the factor tensors ``want`` (suffixes such as
    ``lora_A.weight``), else the message naming what is missing and what is unexpected
    (``name`` turns a suffix into the name to show, ``note`` explains the unexpected)."""
    missing, extra = sorted(want - present), sorted(present - want)
    if not missing and not extra:
        return None
    problems = ([f"missing {[name(s) for s in missing]}"] if missing else []) + (
        [f"unexpected {[name(s) for s in extra]}{note}"] if extra else []
    )
    return f"module {module} has an incomplete adapter: {'; '.join(problems)}."
