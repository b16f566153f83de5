"""Run a function on N CPU ranks (gloo + megatron parallel state) and collect the results.

Ranks are forked, so modules imported by the test process (torch, megatron: ~4 s) are
reused: a 2-rank run costs well under a second instead of seconds per spawned interpreter.
Each call rendezvouses on a fresh port that the OS picks.

Each rank: ``torch.set_num_threads(1)``, gloo process group, :func:`apply_cpu_compat`,
``initialize_model_parallel(tp, pp, ep, etp)``, ``model_parallel_cuda_manual_seed(1234)`` and
``torch.manual_seed(1234)``, then ``fn(*args, **kwargs)``; its return value comes back pickled
(tensors by value), and model parallel and the process group are torn down.

A rank that raises fails the call with its traceback; ranks still running a grace period
after an error, or when ``timeout`` expires (a hung collective), are killed, and the error
names them and shows where each was stuck.
"""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from dist_lora.parallel.cpu_compat import apply_cpu_compat

SEED = 1234
ERROR_GRACE_S = 3.0  # after one rank fails, how long the others get to report their own error
STACK_SIGNAL = signal.SIGUSR1  # makes a rank write its Python stack (faulthandler)
PG_MARGIN_S = 30.0  # how much longer than ``timeout`` the ranks' process group waits in a collective
TEARDOWN_S = 10.0  # how long a rank that reported gets to tear down before it is killed


class DistributedError(RuntimeError):
    """A rank raised, died, or did not finish in time; the message holds the details."""


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    stack_dir: str,
    tp: int,
    pp: int,
    ep: int,
    etp: int | None,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: Any,
) -> None:
    # Never collect objects inherited from the parent: their finalizers may wait for threads
    # that exist only in the parent (a TCPStore's does), which hangs the rank.
    gc.freeze()
    # Before killing a hung rank the parent asks for its stack; the file stays open until exit.
    faulthandler.register(STACK_SIGNAL, file=open(os.path.join(stack_dir, f"rank{rank}"), "w"))
    torch.set_num_threads(1)  # the ranks share the machine's few cores
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        # the group's own timeout outlasts the harness's deadline, so that a hung collective is
        # always reported by the harness (with every rank's stack), never raced by gloo's timeout
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout + PG_MARGIN_S))
        apply_cpu_compat()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            create_gloo_process_groups=False,  # the default groups are gloo already
        )
        model_parallel_cuda_manual_seed(SEED)
        torch.manual_seed(SEED)
        message = (rank, True, pickle.dumps(fn(*args, **kwargs)))
    except BaseException:
        message = (rank, False, traceback.format_exc())
    results.put(message)
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    timeout: float = 120,
    args: tuple = (),
    kwargs: dict | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked ranks; return their results by rank.

    ``fn`` and its arguments need not be picklable (they are inherited through fork); its
    return value must be. ``ep`` / ``etp``: megatron's expert-parallel and expert-tensor-parallel
    sizes (etp None: megatron's default, the TP size). Raises :class:`DistributedError` if a
    rank raises or dies, or if any rank has not finished after ``timeout`` seconds; no rank outlives the call.
    """
    from megatron.core import parallel_state

    if dist.is_initialized() or parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "the test process has a process group or megatron parallel state of its own; forked "
            "ranks would inherit it and hang. Build megatron models inside run_distributed."
        )
    ctx = mp.get_context("fork")
    port = _free_port()
    stack_dir = tempfile.TemporaryDirectory(prefix="run_distributed_")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, stack_dir.name, tp, pp, ep, etp, timeout, fn, args, kwargs or {}, results),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        _collect(procs, results, timeout, outcomes)
    finally:
        running = [rank for rank, proc in enumerate(procs) if proc.is_alive() and rank not in outcomes]
        stacks = _dump_stacks([procs[rank] for rank in running], stack_dir.name)
        for proc in procs:
            proc.join(timeout=TEARDOWN_S)  # ranks that reported are tearing down
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
        stack_dir.cleanup()

    errors = [f"rank {rank} raised:\n{tb}" for rank, (ok, tb) in sorted(outcomes.items()) if not ok]
    for rank, proc in enumerate(procs):
        if rank not in outcomes and rank not in running:
            errors.append(f"rank {rank} exited with code {proc.exitcode} without a result")
    if running:
        reason = "after another rank failed" if errors else f"within {timeout:g} s"
        errors.append(f"ranks {running} did not finish {reason} and were killed; they were at:")
        errors += stacks
    if errors:
        raise DistributedError("\n".join(errors))
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]


def _dump_stacks(procs: list[Any], stack_dir: str) -> list[str]:
    """Kill ``procs`` after asking each for its Python stack; return the stacks."""
    for proc in procs:
        os.kill(proc.pid, STACK_SIGNAL)
    time.sleep(0.5 if procs else 0)  # faulthandler writes from its signal handler
    stacks = []
    for proc in procs:
        proc.kill()
        with open(os.path.join(stack_dir, proc.name)) as f:
            stacks.append(f"{proc.name}:\n{f.read()}")
    return stacks


def _free_port() -> int:
    """A TCP port free right now; rank 0 binds it for the rendezvous store moments later.
    (The parent hosts no store itself: a TCPStore's server thread would be running at each
    fork, and its finalizer hangs if a child's garbage collector runs it.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collect(
    procs: list[Any], results: Any, timeout: float, outcomes: dict[int, tuple[bool, Any]]
) -> None:
    """Read rank messages into ``outcomes`` until all ranks reported or the timeout passed.
    Once a rank has failed (raised, or exited without a message) the others get
    ERROR_GRACE_S to report."""
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.05)
        except queue.Empty:
            if any(p.exitcode is not None for r, p in enumerate(procs) if r not in outcomes):
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            continue
        outcomes[rank] = (ok, payload)
        if not ok:
            deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
