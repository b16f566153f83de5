"""InitKind: what each ``init_lora_weights`` value does, the one classification of init methods.

``init_lora_weights`` values are read in PEFT's spelling (:func:`canonical_init_lora_weights`);
every other module asks :class:`InitKind` (or ``LoraConfig.init_kind``) what a value does
instead of comparing strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import ConfigError

InitValue = Union[bool, str]  # an init_lora_weights value (see InitKind for what it does)
# What each init_lora_weights method dist_lora runs does (see InitKind; "pissa_niter_<N>" is "pissa"):
#   method       (factors from, base weight after the adapter is created)
_INIT_KINDS: dict[InitValue, tuple[str, Optional[str]]] = {
    True: ("seed", None),  # A kaiming-uniform, B = 0 (PEFT's default)
    False: ("seed", None),  # A and B as nn.Linear's default init
    "gaussian": ("seed", None),
    "eva": ("data", None),  # the layers' inputs (initialize_lora_eva_weights, after injection)
    "olora": ("weight", "residual"),  # QR of W; W <- W - s·B·A
    "pissa": ("weight", "residual"),  # SVD of W; W <- W - s·B·A
    "corda": ("data", "residual"),  # SVD of W·C, C the inputs' covariance (preprocess_corda)
    "loftq": ("weight", "quantised"),  # W <- its NF4 quantisation Q, the factors absorb W - Q
}
NOT_YET_SUPPORTED_INIT: tuple[str, ...] = ("orthogonal", "mica", "lora_ga")
# init_lora_weights values understood by PEFT 0.21 (besides True / False and "pissa_niter_<N>").
INIT_METHODS = tuple(m for m in _INIT_KINDS if isinstance(m, str)) + NOT_YET_SUPPORTED_INIT
# PEFT's LoRA layer compares these with ``.lower()``; it reads every other init string as written.
_CASE_INSENSITIVE_INIT = ("gaussian", "olora", "mica")
_PISSA_NITER = re.compile(r"pissa_niter_(.*)")


def canonical_init_lora_weights(value: Any) -> InitValue:
    """``value`` in PEFT's spelling (``"OLoRA"`` -> ``"olora"``, as PEFT reads it), or ConfigError
    for a value PEFT does not understand."""
    if isinstance(value, bool) or value in INIT_METHODS:
        return value
    lower = value.lower() if isinstance(value, str) else None
    if lower in _CASE_INSENSITIVE_INIT:
        return lower
    match = _PISSA_NITER.fullmatch(value) if isinstance(value, str) else None
    if match:
        niter = match.group(1)
        if not (niter.isascii() and niter.isdigit()):
            raise ConfigError(
                f"init_lora_weights={value!r}: the number of subspace iterations must be a "
                "non-negative integer, e.g. 'pissa_niter_16'."
            )
        return value
    if lower in INIT_METHODS or (lower and _PISSA_NITER.fullmatch(lower)):
        raise ConfigError(
            f"init_lora_weights={value!r}: PEFT reads this value case-sensitively (it would fail on it); "
            f"write {lower!r}."
        )
    raise ConfigError(
        f"init_lora_weights must be True, False, one of {list(INIT_METHODS)} or 'pissa_niter_<N>', got {value!r}."
    )


@dataclass(frozen=True)
class InitKind:
    """What an ``init_lora_weights`` value does: the one classification of init methods.

    ``InitKind.of(value)`` (or ``LoraConfig.init_kind``) reads a value in PEFT's spelling
    (ConfigError otherwise, as :func:`canonical_init_lora_weights`). Its properties:

      seeded          True, False, "gaussian": factors drawn from the adapter's seed; the base
                      weight is neither read nor changed
      weight_driven   "pissa", "pissa_niter_<N>", "olora": factors from the base weight's SVD / QR
      data_driven     "eva", "corda": factors from the layers' inputs (a data pass)
      rewrites_base   PiSSA / OLoRA / CorDA (W <- W - s·B0·A0) and LoftQ (W <- its quantisation):
                      a saved adapter is only valid on the rewritten base
      convertible     PiSSA / OLoRA / CorDA: releasable as a plain rank-2r LoRA for the
                      original base (:mod:`dist_lora.checkpoint.conversion`)
      supported       not in ``NOT_YET_SUPPORTED_INIT`` (a config may name those; a new
                      adapter may not)
    """

    value: InitValue  # as PEFT spells it
    method: InitValue  # ``value``, but "pissa" for "pissa_niter_<N>"
    niter: Optional[int] = None  # N of "pissa_niter_<N>": the randomised SVD's subspace iterations

    @classmethod
    def of(cls, value: Any) -> "InitKind":
        value = canonical_init_lora_weights(value)
        match = _PISSA_NITER.fullmatch(value) if isinstance(value, str) else None
        if match:
            return cls(value, "pissa", int(match.group(1)))
        return cls(value, value)

    @property
    def _kind(self) -> tuple[Optional[str], Optional[str]]:
        return _INIT_KINDS.get(self.method, (None, None))  # NOT_YET_SUPPORTED_INIT: not classified

    @property
    def seeded(self) -> bool:
        return self._kind[0] == "seed"

    @property
    def weight_driven(self) -> bool:
        return self._kind == ("weight", "residual")

    @property
    def data_driven(self) -> bool:
        return self._kind[0] == "data"

    @property
    def rewrites_base(self) -> bool:
        return self._kind[1] is not None

    @property
    def convertible(self) -> bool:
        return self._kind[1] == "residual"

    @property
    def supported(self) -> bool:
        return self.method not in NOT_YET_SUPPORTED_INIT

