"""Shared helpers for the benchmarks: alternating timing, medians and ratios, tables, ``--json``,
saved-for-backward bytes, memory accounting and peak resident memory.

Timing rule: every benchmark runs all of its contenders in ONE process (or one torchrun job),
in alternating rounds (round k runs A B C, round k+1 runs B C A, ...), so that machine noise
(other jobs on the 2 cores) hits every contender alike. It reports per-contender medians and
two ratios: the ratio of the medians and the median of the per-round ratios (paired: A and B
of the same round). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional

import torch

DATE = "2026-11-29"


def quiet() -> None:
    """Silence known, irrelevant warnings (megatron without apex/TE, torch's renamed collectives)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing. is deprecated.*")


# --- ranks ---------------------------------------------------------------------------------


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def say(*args, **kwargs) -> None:
    """print on rank 0 only (everything prints through this under torchrun)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


# --- arguments and JSON -----------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


def add_timing_args(p: argparse.ArgumentParser, rounds: int, warmup: int = 1, threads: bool = False) -> None:
    p.add_argument("--rounds", type=int, default=rounds, help=f"timed alternating rounds (default {rounds})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds first (default {warmup})")
    if threads:
        p.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default 1: on a shared 2-core machine a 2-thread process "
                            "slows down several-fold whenever another job takes a core)")


def machine() -> dict:
    return {
        "date": DATE,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_json(path: Optional[str], results: dict, args: argparse.Namespace) -> None:
    if not path or rank() != 0:
        return
    payload = {"script": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "args": vars(args), "machine": machine()}
    payload.update(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    say(f"wrote {path}")


# --- tables --------------------------------------------------------------------------------


def table(headers: list[str], rows: Iterable[Iterable], title: str = "") -> str:
    rows = [["" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [title] if title else []
    out += [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def show(headers: list[str], rows: Iterable[Iterable], title: str = "") -> None:
    say(table(headers, list(rows), title) + "\n")


def mib(nbytes: float) -> float:
    return nbytes / 2**20


# --- timing --------------------------------------------------------------------------------


def alternate(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    sync: Optional[Callable[[], None]] = None,
    reduce_max: bool = False,
    faults: Optional[dict[str, list[int]]] = None,
) -> dict[str, list[float]]:
    """Run every step once per round, rotating the order each round; return the timed rounds'
    seconds per step name. ``sync`` (e.g. a barrier) runs before each timed step; with
    ``reduce_max`` each step's time is the slowest rank's (torchrun). A ``faults`` dict is
    filled with each timed step's minor page faults in this process (see :func:`minor_faults`)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    if faults is not None:
        faults.update({n: [] for n in names})
    for k in range(warmup + rounds):
        order = names[k % len(names) :] + names[: k % len(names)]
        this_round = {}
        for name in order:
            if sync:
                sync()
            faults_before = minor_faults()
            start = time.perf_counter()
            steps[name]()
            this_round[name] = time.perf_counter() - start
            if k >= warmup:
                times[name].append(this_round[name])
                if faults is not None:
                    faults[name].append(minor_faults() - faults_before)
        label = " (warm-up)" if k < warmup else ""
        say(f"  round {k + 1}/{warmup + rounds}{label}: " + ", ".join(f"{n} {this_round[n]:.3f}s" for n in order))
    if reduce_max:
        import torch.distributed as dist

        for name in names:
            t = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name] = t.tolist()
    return times


def minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the kernel had to map
    (and zero). A step that allocates large temporaries which the C allocator returns to the
    OS pays one per 4 KiB page, every step; a count, so exact where times are noisy."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ratio(times: dict[str, list[float]], a: str, b: str) -> dict:
    """a / b: ratio of the medians, and the median of the per-round (paired) ratios."""
    paired = [x / y for x, y in zip(times[a], times[b])]
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return {
        "ratio_of_medians": statistics.median(times[a]) / statistics.median(times[b]),
        "median_paired_ratio": statistics.median(paired),
        "paired_p25": q[0],
        "paired_p75": q[2],
        "paired_ratios": paired,
    }


def timing_summary(times: dict[str, list[float]], faults: Optional[dict[str, list[int]]] = None) -> dict:
    summary = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t} for n, t in times.items()}
    for n, f in (faults or {}).items():
        summary[n]["minor_faults"] = f
    return summary


def show_times(times: dict[str, list[float]], title: str, faults: Optional[dict[str, list[int]]] = None) -> None:
    """Medians per step; with ``faults`` (from :func:`alternate`) also the median minor page
    faults per step and the MiB of fresh pages they stand for."""
    headers = ["step", "median s", "min s", "max s", "rounds"]
    rows = [[n, statistics.median(t), min(t), max(t), len(t)] for n, t in times.items()]
    if faults:
        headers += ["minor faults / step", "fresh MiB / step"]
        page = os.sysconf("SC_PAGE_SIZE")
        rows = [row + [int(statistics.median(faults[row[0]])), mib(statistics.median(faults[row[0]]) * page)] for row in rows]
    show(headers, rows, title)


def show_ratios(ratios: dict[str, dict], targets: dict[str, tuple[str, float]], title: str) -> None:
    """``targets[name] = ("<=", 1.06)`` adds a target column and a met / MISSED verdict."""
    rows = []
    for name, r in ratios.items():
        op_value = targets.get(name)
        verdict, target = "", ""
        if op_value:
            op, value = op_value
            target = f"{op} {value}"
            ok = r["ratio_of_medians"] <= value if op == "<=" else r["ratio_of_medians"] >= value
            verdict = "met" if ok else "MISSED"
        spread = f"{r['paired_p25']:.3f}-{r['paired_p75']:.3f}"
        rows.append([name, r["ratio_of_medians"], r["median_paired_ratio"], spread, target, verdict])
    show(["ratio", "of medians", "median paired", "paired p25-p75", "target", "verdict (of medians)"], rows, title)


# --- saved-for-backward bytes ------------------------------------------------------------------


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward while the context is open.

    Uses ``torch.autograd.graph.saved_tensors_hooks``. Tensors are de-duplicated by storage
    (two saved views of one storage count once: the storage's bytes), and storages of the
    given modules' parameters and buffers are left out (weights are not activations; a frozen
    weight saved for backward costs no memory). Tensors that code stashes on ``ctx`` as plain
    attributes are not seen (megatron's linear saves its input and weight properly).
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self._storages: dict[int, int] = {}
        self.calls = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._excluded and ptr != 0:
                self._storages[ptr] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


# --- memory accounting and peak RSS ----------------------------------------------------------


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak_rss() -> int:
    """Give freed heap back to the OS, reset this process's peak RSS (Linux ``clear_refs`` 5),
    and return the current RSS: the baseline to subtract from :func:`peak_rss`."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status("VmRSS")


def peak_rss() -> int:
    return _proc_status("VmHWM")


def run_child(args: list[str]) -> dict:
    """Run this script again in a fresh interpreter with ``args``; it prints one JSON line last."""
    out = subprocess.run([sys.executable, sys.argv[0], *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def single_process_env() -> None:
    """torchrun's environment for a one-process run started with plain ``python`` (a free port)."""
    import os
    import socket

    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
