"""A fail-fast arrival check through the process group's store, before a collective that only
some ranks might call.

A collective called on some ranks only waits in its first communication until the process
group's timeout (by default 30 minutes on gloo, 10 on NCCL) and names nobody.
:func:`all_arrive` runs first on the ranks that call: it needs nothing from the ranks that do
not, works on any backend (gloo, NCCL: it uses the c10d store, not the process group), and ends
the same way on every calling rank: all return, or all raise a
:class:`~dist_lora.errors.ConfigError` naming the ranks that did not arrive (or the rank that
refused the call and why).

Protocol, per call ``n`` of ``name`` on this process (keys under ``dist_lora/<name>/<n>/``;
``n`` counts this process's calls, so it is the same on ranks that call equally often):

- each calling rank sets its arrival key ``<rank>`` and adds 1 to the counter ``arrived``;
- the rank whose add returns the world size writes the verdict ``go``;
- a rank that refuses the call (its own argument check failed) writes the verdict
  ``refused`` with its reason instead of counting, and returns at once (it raises its own error);
- the others wait up to ``timeout`` seconds for the verdict; one that times out lists the ranks
  whose arrival key is missing and writes the verdict ``missing``.

The verdict is written with ``compare_set`` (first writer wins), so every calling rank reads
the same one, also when a rank arrives just as another gives up; a rank arriving after a
verdict other than ``go`` reads it at once and raises too. Cost: about five small store
requests per calling rank; a call that returns ``go`` deletes the previous call's keys, so a
run keeps at most one call's keys (plus those of calls that failed).

After a failed call the ranks that did not call it are one call behind: their next call
meets the old verdict and fails too. The error means a bug in which ranks call the
collective; fix it rather than retry.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from ..errors import ConfigError

_CALLS: dict[str, int] = {}  # name -> calls made by this process


def all_arrive(name: str, timeout: float, refusal: Optional[str] = None) -> None:
    """Return once every rank of the default process group has called ``all_arrive(name, ...)``
    for the same (n-th) time; else raise a ConfigError on every calling rank, within about
    ``timeout`` seconds of the first arrival, naming the ranks that did not arrive.

    ``refusal``: this rank will not take part (the reason, e.g. its argument check's message).
    The other calling ranks raise a ConfigError quoting it; this rank returns at once and raises
    its own error. Without ``torch.distributed`` (or with one rank) there is nothing to wait for.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    call = _CALLS[name] = _CALLS.get(name, 0) + 1
    store = _default_store()
    prefix = f"dist_lora/{name}/{call}/"
    store.set(prefix + str(rank), "")
    if refusal is not None:
        store.compare_set(prefix + "verdict", "", json.dumps({"refused": rank, "reason": refusal}))
        return
    last = store.add(prefix + "arrived", 1) == world
    verdict = _decide(store, prefix, rank, world, timeout, last)
    if verdict.get("go"):
        _delete_previous(store, name, call, rank, last)
        return
    if "refused" in verdict:
        raise ConfigError(f"{name} was refused on rank {verdict['refused']}: {verdict['reason']}")
    raise ConfigError(
        f"{name} was not called on ranks {verdict['missing']} within {verdict['timeout']:g} s (rank "
        f"{verdict['by']} waited that long for them): it is a collective, every rank of the default "
        "process group must call it with the same arguments. Call it on every rank (also on those "
        "that get no result), or pass a larger timeout if some ranks reach it later."
    )


def _decide(store: dist.Store, prefix: str, rank: int, world: int, timeout: float, last: bool) -> dict:
    """The call's verdict: written by this rank if it is the last to arrive or gives up first,
    else the one another rank wrote."""
    if last:
        return json.loads(store.compare_set(prefix + "verdict", "", json.dumps({"go": True})))
    while True:
        try:
            store.wait([prefix + "verdict"], timedelta(seconds=timeout))
            return json.loads(store.get(prefix + "verdict"))
        except RuntimeError:  # timed out (a DistStoreError; a FileStore's is a plain RuntimeError)
            # name the ranks whose arrival key is missing
            missing = [r for r in range(world) if not store.check([prefix + str(r)])]
        if missing:  # else every rank arrived just now: the verdict is on its way
            mine = json.dumps({"missing": missing, "by": rank, "timeout": timeout})
            return json.loads(store.compare_set(prefix + "verdict", "", mine))


def _delete_previous(store: dist.Store, name: str, call: int, rank: int, last: bool) -> None:
    """After a ``go`` every rank has left call ``call - 1``: delete its keys (each rank its own
    arrival key, the last to arrive the shared ones)."""
    if call == 1:
        return
    previous = f"dist_lora/{name}/{call - 1}/"
    store.delete_key(previous + str(rank))
    if last:
        store.delete_key(previous + "arrived")
        store.delete_key(previous + "verdict")


def _default_store() -> dist.Store:
    """The default process group's c10d store (a PrefixStore of the rendezvous store).
    ``ProcessGroup.get_group_store`` is public; older torch only has the private
    ``_get_default_store`` (same object)."""
    group = dist.group.WORLD
    if hasattr(group, "get_group_store"):
        return group.get_group_store()
    from torch.distributed.distributed_c10d import _get_default_store  # torch without get_group_store

    return _get_default_store()
