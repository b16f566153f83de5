"""Count torch.distributed collectives: how many calls and how many bytes, per kind.

    with CollectiveCounter() as counter:
        train_step()
    counter.counts   # {"all_reduce": 5, "all_gather_into_tensor": 4, ...}
    counter.bytes    # payload bytes per kind (see PAYLOAD)

Libraries bind collectives at import time (megatron: ``dist_all_gather_func =
torch.distributed.all_gather_into_tensor``), so patching ``torch.distributed`` alone misses
calls. The counter replaces every reference to the original function objects in every loaded
module's namespace, and restores them on exit. Only the outermost call counts: in torch
``send`` calls ``isend`` and ``all_gather_into_tensor`` calls ``all_gather_single``, and each
is one collective. Counts are exact and deterministic, unlike times: tests assert them.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import Counter
from typing import Any, Callable

import torch
import torch.distributed as dist

# Which tensor argument's size is the payload: the reduced tensor for all-reduce/broadcast,
# the gathered output for all-gathers, the full input for reduce-scatters.
PAYLOAD: dict[str, Callable[..., list[torch.Tensor]]] = {
    "all_reduce": lambda tensor, *a, **k: [tensor],
    "broadcast": lambda tensor, *a, **k: [tensor],
    "all_gather": lambda tensor_list, tensor, *a, **k: list(tensor_list),
    "all_gather_into_tensor": lambda output, input, *a, **k: [output],
    "_all_gather_base": lambda output, input, *a, **k: [output],
    "reduce_scatter": lambda output, input_list, *a, **k: list(input_list),
    "reduce_scatter_tensor": lambda output, input, *a, **k: [input],
    "_reduce_scatter_base": lambda output, input, *a, **k: [input],
    "all_gather_single": lambda output, input, *a, **k: [output],
    "reduce_scatter_single": lambda output, input, *a, **k: [input],
    "all_to_all_single": lambda output, input, *a, **k: [input],
    "all_to_all": lambda output_list, input_list, *a, **k: list(input_list),
    "all_reduce_coalesced": lambda tensors, *a, **k: list(tensors),
    "reduce": lambda tensor, *a, **k: [tensor],
    "gather": lambda tensor, *a, **k: [tensor],
    "scatter": lambda tensor, *a, **k: [tensor],
    "barrier": lambda *a, **k: [],
    "batch_isend_irecv": lambda ops, *a, **k: [op.tensor for op in ops],
    "send": lambda tensor, *a, **k: [tensor],
    "recv": lambda tensor, *a, **k: [tensor],
    "isend": lambda tensor, *a, **k: [tensor],
    "irecv": lambda tensor, *a, **k: [tensor],
}


class CollectiveCounter:
    """Context manager counting collective calls (``counts``) and payload bytes (``bytes``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._patched: list[tuple[dict, str, Any]] = []
        self._depth = threading.local()

    def _wrap(self, name: str, original: Callable) -> Callable:
        payload = PAYLOAD[name]

        @functools.wraps(original)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            if depth == 0:
                self.counts[name] += 1
                self.bytes[name] += sum(t.numel() * t.element_size() for t in payload(*args, **kwargs))
            self._depth.value = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.value = depth

        return counted

    def __enter__(self) -> "CollectiveCounter":
        originals = {getattr(dist, name): name for name in PAYLOAD if hasattr(dist, name)}
        wrappers = {fn: self._wrap(name, fn) for fn, name in originals.items()}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                try:
                    wrapper = wrappers.get(value)
                except TypeError:  # unhashable value
                    continue
                if wrapper is not None:
                    self._patched.append((namespace, attr, value))
                    namespace[attr] = wrapper
        return self

    def __exit__(self, *exc: object) -> None:
        for namespace, attr, original in reversed(self._patched):
            namespace[attr] = original
        self._patched.clear()

    def reset(self) -> None:
        self.counts.clear()
        self.bytes.clear()

    @property
    def total_calls(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())
