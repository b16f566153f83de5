"""``dist-lora inspect ADAPTER_DIR [--for ENGINE]``: what a PEFT adapter contains and whether a
serving engine would serve it as trained (the rules are :mod:`.serving`'s)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..checkpoint.peft_format import WEIGHTS_NAME
from ..config import LoraConfig
from ..layers.math import lora_scaling
from .errors import ConsolidationError, as_consolidation_error
from .serving import (
    Engine,
    engine_for,
    global_scaling,
    max_lora_rank,
    module_ranks,
    module_scalings,
    read_adapter_tensors,
    unservable,
)


@dataclasses.dataclass
class AdapterReport:
    """What an adapter holds and, with an engine, whether it serves it as trained (``problems``
    empty) and the server's minimal ``max_lora_rank``."""

    targets: list[str]
    ranks: dict[str, int]
    scalings: dict[str, float]
    dtypes: list[str]
    size_bytes: int
    engine: Optional[str] = None
    problems: list[str] = dataclasses.field(default_factory=list)
    max_lora_rank: Optional[int] = None
    target_parameters: list[str] = dataclasses.field(default_factory=list)
    parameter_ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    parameter_scalings: dict[str, float] = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        """The report as text lines."""
        out = [f"modules: {len(self.ranks)}", f"targets: {', '.join(self.targets)}",
               f"ranks: {_counts(self.ranks)}", f"scalings: {_counts(self.scalings)}",
               f"dtype: {', '.join(self.dtypes)}", f"size: {self.size_bytes} bytes"]
        if self.target_parameters:
            out.insert(2, f"target_parameters: {', '.join(self.target_parameters)} (per expert: ranks "
                          f"{_counts(self.parameter_ranks)}, scalings {_counts(self.parameter_scalings)}; the "
                          "ranks and scalings below are the target modules')")
        if self.engine is not None:
            verdict = "serves it as trained" if not self.problems else "would NOT serve it as trained"
            out.append(f"{self.engine}: {verdict}")
            out += [f"  - {problem}" for problem in self.problems]
            if self.max_lora_rank is not None:
                out.append(f"{self.engine}: set max_lora_rank >= {self.max_lora_rank}")
        return out


def inspect_adapter(adapter_dir: str | os.PathLike, target: Optional[str] = None) -> AdapterReport:
    """Read the PEFT adapter in ``adapter_dir`` and report it (see :class:`AdapterReport`)."""
    adapter_dir = os.fspath(adapter_dir)
    engine = engine_for(target) if target is not None else None
    with as_consolidation_error():
        config = LoraConfig.from_pretrained(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    ranks = module_ranks(tensors)
    parameters = sorted(config.target_parameters or [])
    # a parameter's adapter stacks its experts' (A has r·E rows): its rank and scaling are the config's
    ranks = {m: r for m, r in ranks.items() if not _owns_parameter(m, parameters)}
    scalings = module_scalings(config, ranks)
    suffixes = {m.rsplit(".", 1)[-1] for m in ranks}
    report = AdapterReport(
        targets=sorted(suffixes), ranks=ranks, scalings=scalings,
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        size_bytes=os.path.getsize(os.path.join(adapter_dir, WEIGHTS_NAME)),
    )
    report.target_parameters = parameters
    report.parameter_ranks = {p: config.rank_for(p) for p in parameters}
    report.parameter_scalings = {p: lora_scaling(config.alpha_for(p), config.rank_for(p), config.use_rslora)
                                 for p in parameters}
    if engine is None:
        return report
    report.engine = engine.name
    if report.target_parameters:  # refused whatever else holds; per-module ranks / scalings would mislead
        report.problems = unservable(config, engine, list(ranks))
        return report
    report.problems = unservable(config, engine, list(ranks)) + _scaling_problems(config, scalings, engine, target)
    try:
        report.max_lora_rank = max_lora_rank(config, ranks, engine)
    except ConsolidationError as e:
        report.problems.append(str(e))
    return report


def _owns_parameter(module: str, parameters: list[str]) -> bool:
    """Whether ``module`` (PEFT's nested wrappers' ``.base_layer`` suffixes dropped) holds one of
    the targeted ``parameters`` (full names or name ends, as PEFT matches them)."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    owners = {p.rsplit(".", 1)[0] for p in parameters}
    return any(module == o or module.endswith("." + o) for o in owners)


def _scaling_problems(config: LoraConfig, scalings: dict[str, float], engine: Engine, target: str) -> list[str]:
    """The modules whose trained scaling differs from the engine's one global scaling."""
    applied = global_scaling(config)
    wrong = sorted(m for m, s in scalings.items() if abs(s - applied) > 1e-12 * max(1.0, abs(applied)))
    if not wrong:
        return []
    return [
        f"{engine.one_scaling} applies one scaling lora_alpha/r = {applied:g} to every module (no "
        "rank_pattern/alpha_pattern); "
        f"{len(wrong)} modules were trained with another (e.g. {wrong[0]}: {scalings[wrong[0]]:g}): release the "
        f"checkpoint with dist-lora consolidate --for {target}, which folds each module's scaling into its B."
    ]


def _counts(values: dict[str, float]) -> str:
    counts: dict = {}
    for value in values.values():
        counts[value] = counts.get(value, 0) + 1
    return ", ".join(f"{value:g} x{n}" for value, n in sorted(counts.items()))
