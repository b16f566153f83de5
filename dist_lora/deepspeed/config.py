"""Check a DeepSpeed config before DeepSpeed acts on it.

DeepSpeed reads many settings lazily and fails late, or slowly:

- ``zero_optimization.offload_optimizer.device: cpu|nvme`` makes it use ``DeepSpeedCPUAdam``
  (a client torch optimizer is refused with ``ZeRORuntimeException``), and an ``optimizer`` of
  type Adam/AdamW without ``torch_adam`` makes it use ``FusedAdam``. Both are C++/CUDA ops:
  unless this DeepSpeed was installed with them prebuilt (``DS_BUILD_CPU_ADAM=1`` /
  ``DS_BUILD_FUSED_ADAM=1``) they are JIT-compiled inside ``deepspeed.initialize`` — about a
  minute with a compiler and ninja, a cryptic build error without them.
- ``gradient_clipping`` defaults to 1.0: a config that does not say it clips anyway.

:func:`check_ds_config` finds these before ``deepspeed.initialize`` and says what to change.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError

_ADAM_TYPES = {"adam", "adamw"}


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict (keys starting with ``_`` are comments and dropped)."""
    with open(path) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _op_prebuilt(name: str) -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(name, False))


def _ops_needed(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(op name, why) for every compiled op ``config`` makes DeepSpeed load."""
    zero = config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    optimizer = config.get("optimizer") or {}
    params = optimizer.get("params") or {}
    adam = str(optimizer.get("type", "")).lower() in _ADAM_TYPES and not params.get("torch_adam", False)
    needed = []
    if offload in ("cpu", "nvme") and int(zero.get("stage", 0)) > 0:
        needed.append(
            ("cpu_adam", f"zero_optimization.offload_optimizer.device={offload!r} (ZeRO-Offload runs DeepSpeedCPUAdam)")
        )
    elif adam:
        needed.append(("fused_adam", f"optimizer.type={optimizer['type']!r} without params.torch_adam (FusedAdam)"))
    return needed


def check_ds_config(config: dict[str, Any], allow_jit: Optional[bool] = None) -> dict[str, Any]:
    """Raise :class:`ConfigError` if ``config`` needs a DeepSpeed op this install lacks; warn
    if it does not set ``gradient_clipping``. Returns ``config`` (unchanged).

    ``allow_jit``: whether a missing op may be JIT-compiled by DeepSpeed (default: only where
    CUDA is available, the machines the fused ops are for; the CPU configs need none).
    """
    if allow_jit is None:
        allow_jit = torch.cuda.is_available()
    missing = [(op, why) for op, why in _ops_needed(config) if not _op_prebuilt(op)]
    if missing and not allow_jit:
        ops = ", ".join(f"{op!r} for {why}" for op, why in missing)
        raise ConfigError(
            f"this DeepSpeed config needs compiled op(s) {ops}, which this DeepSpeed install did not "
            "prebuild; deepspeed.initialize would try to JIT-compile them (a C++ compiler and ninja, "
            "about a minute per process). Either: remove zero_optimization.offload_optimizer (or set "
            'its device to "none") and use a torch optimizer (optimizer.params.torch_adam: true, '
            "as in configs/zero*_cpu.json); or reinstall DeepSpeed with the op prebuilt "
            "(DS_BUILD_CPU_ADAM=1 / DS_BUILD_FUSED_ADAM=1 pip install deepspeed); or pass "
            "allow_jit=True to accept the compile."
        )
    if "gradient_clipping" not in config and _is_rank0():
        warnings.warn(
            "the DeepSpeed config does not set gradient_clipping; DeepSpeed then clips the gradient "
            "norm to 1.0. Set it explicitly (0 disables clipping).",
            UserWarning,
            stacklevel=2,
        )
    return config


def _is_rank0() -> bool:
    """Warn once per job, not once per rank (before init_distributed: the launcher's RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"
