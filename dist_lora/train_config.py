"""The training job's YAML configuration: sections, defaults, validation, overrides.

    model:    {hf_dir: null,            # a local HF checkpoint (Llama / Mistral / Qwen2 / Mixtral); null = built-in
               builtin: llama,          # the built-in tiny model when hf_dir is null: llama | mixtral (MoE)
               moe_aux_loss_coeff: null, # MoE load-balancing loss weight; null: as transformers trains the
                                        # checkpoint (router_aux_loss_coef if output_router_logits, else 0)
               attention: sdpa,         # sdpa (torch SDPA: flash / memory-efficient kernels on GPU) | megatron
               dtype: fp32}             # the frozen base: fp32 | bf16 | fp16 (loss-scaled); fp32 adapter masters
    parallel: {backend: megatron,       # megatron (TP/PP/SP/EP/DP) | fsdp2 (an HF model under FSDP2, DP = world size)
               tp: 2, pp: 1, sp: false,
               ep: 1, etp: 1}           # mixture of experts: expert-parallel size, expert-tensor-parallel size
    lora:     {...}                     # any LoraConfig field
    data:     {path: null, format: null, seq_len: 64, eval_fraction: 0.1, packing: true,
               train_on_prompt: false, overlong: drop, skip_invalid: false,
               text_field: text, prompt_field: prompt, completion_field: completion, messages_field: messages}
    optim:    {lr: 3e-3, weight_decay: 0.0, betas: [0.9, 0.999], warmup_steps: 10,
               schedule: cosine, min_lr_ratio: 0.1, grad_clip: 1.0}
    train:    {steps: 300, micro_batch_size: 8, grad_accum: 1, seed: 1234, log_interval: 10,
               eval_interval: 100, eval_batches: 4, checkpoint_interval: 100, keep_last: 2,
               out_dir: runs/train, consolidate: true, on_later_checkpoints: move_aside,
               on_nonfinite: stop, max_skipped_in_a_row: 5, device: auto, recompute: none,
               peak_tflops: null, initial_loss_scale: 65536, min_loss_scale: 1}

A key that does not exist is an error naming the nearest valid key. ``key=value`` overrides
(``train.steps=50``, ``lora.r=16``) are parsed as YAML values. Every value is checked against
one table, :data:`RULES` (key -> what it must be), before anything runs: booleans must be
``true``/``false`` (not text), numbers finite and in range. Interval and count keys use 0 for
"never" / "all": ``train.eval_interval=0`` (no evaluation), ``train.checkpoint_interval=0``
(a checkpoint at the end only), ``train.keep_last=0`` (keep every checkpoint).

``train.on_later_checkpoints`` says what a run does with complete checkpoints in
``<out_dir>/checkpoints`` that are newer than its start step (from an earlier run, or the
later steps of the run it resumes): ``move_aside`` moves them, never deleting, into
``<out_dir>/checkpoints/superseded_<timestamp>/``; ``refuse`` stops with an error naming them.
``train.on_nonfinite`` says what a non-finite loss or gradient norm does: ``stop`` ends the
run with an error (the last good checkpoint is kept, no adapter is released); ``skip`` skips
that optimizer step and counts it, and stops after ``train.max_skipped_in_a_row`` in a row.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml

from .config import ConfigError, LoraConfig
from .data import SftSettings
from .data.records import Fields
from .tiny_model import BUILTINS

LATER_CHECKPOINT_POLICIES = ("move_aside", "refuse")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class ModelSection:
    hf_dir: Optional[str] = None
    builtin: str = "llama"  # the built-in tiny model used when hf_dir is null (dist_lora.tiny_model.BUILTINS)
    moe_aux_loss_coeff: Optional[float] = None  # MoE load-balancing loss weight; None: from the HF config
    attention: str = "sdpa"  # sdpa: torch's scaled_dot_product_attention; megatron: its local attention
    dtype: str = "fp32"  # the frozen base's dtype: fp32 | bf16 | fp16 (loss-scaled); adapters keep fp32 masters


@dataclass
class ParallelSection:
    backend: str = "megatron"  # megatron: megatron-core TP/PP/SP x DP | fsdp2: the HF model under torch FSDP2
    tp: int = 1
    pp: int = 1
    sp: bool = False
    ep: int = 1  # expert parallel: the experts of each MoE layer split over ep ranks
    etp: int = 1  # expert tensor parallel: each expert split over etp ranks (1: whole experts)


@dataclass
class DataSection:
    path: Optional[str] = None
    format: Optional[str] = None  # text | prompt_completion | messages; None: from the first record
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    seq_len: int = 64
    eval_fraction: float = 0.1
    packing: bool = True
    train_on_prompt: bool = False
    overlong: str = "drop"
    skip_invalid: bool = False

    def sft_settings(self) -> SftSettings:
        """The instruction-data settings (dist_lora.data.SftSettings) of this section."""
        fields = Fields(self.text_field, self.prompt_field, self.completion_field, self.messages_field)
        return SftSettings(self.format, fields, self.seq_len, self.packing, self.train_on_prompt, self.overlong,
                           self.eval_fraction, self.skip_invalid)


@dataclass
class OptimSection:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainSection:
    steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    checkpoint_interval: int = 100
    keep_last: int = 2
    out_dir: str = "runs/train"
    consolidate: bool = True
    on_later_checkpoints: str = "move_aside"
    on_nonfinite: str = "stop"
    max_skipped_in_a_row: int = 5
    device: str = "auto"  # auto (CUDA when available) | cuda | cpu
    recompute: str = "none"  # activation recompute: none | selective | full
    peak_tflops: Optional[float] = None  # per device, for MFU (unset: no MFU)
    initial_loss_scale: float = 65536.0  # fp16 only: dynamic loss scaling (parallel/loss_scale.py)
    min_loss_scale: float = 1.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 16})
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def lora_config(self) -> LoraConfig:
        if not isinstance(self.lora, dict):
            raise ConfigError(f"config section lora must be a mapping of LoraConfig fields, got {self.lora!r}.")
        _check_keys(self.lora, [f.name for f in dataclasses.fields(LoraConfig)], "lora")
        return LoraConfig(**self.lora)

    def validate(self) -> None:
        """Check every value against :data:`RULES`, then the rules that join two keys;
        raises :class:`ConfigError` naming the key and what it must be."""
        for key, rule in RULES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not rule.test(value):
                raise ConfigError(f"{key} must be {rule.text}, got {value!r}.")
        _check_combinations(self)
        self.lora_config()  # the LoRA section, with LoraConfig's messages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Rule:
    """What one config value must be: ``test`` accepts it, ``text`` says it in an error;
    ``parse`` (optional) turns YAML text into the value first (``3e-4``, which YAML 1.1
    reads as a string, into a float)."""

    text: str
    test: Callable[[Any], bool]
    parse: Optional[Callable[[Any], Any]] = None


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _parse_number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(minimum: int, meaning: str = "", maximum: Optional[int] = None) -> Rule:
    text = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    return Rule(text + (f" ({meaning})" if meaning else ""),
                lambda v: _is_int(v) and v >= minimum and (maximum is None or v <= maximum))


def _number(text: str, test: Callable[[float], bool]) -> Rule:
    return Rule(f"a finite number {text}", lambda v: _is_finite(v) and test(v), _parse_number)


def _choice(*options: str) -> Rule:
    return Rule("one of " + ", ".join(options), lambda v: isinstance(v, str) and v in options)


def _optional(rule: Rule, meaning: str) -> Rule:
    return Rule(f"{rule.text} or null ({meaning})", lambda v: v is None or rule.test(v), rule.parse)


_BOOL = Rule("true or false", lambda v: isinstance(v, bool))
_TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
_BETAS = Rule(
    "a list of two numbers in [0, 1), e.g. [0.9, 0.999]",
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_finite(b) and 0 <= b < 1 for b in v),
    lambda v: [_parse_number(b) for b in v] if isinstance(v, (list, tuple)) else v,
)

# Every key of every section but lora (LoraConfig checks its own fields): what it must be.
RULES: dict[str, Rule] = {
    "model.hf_dir": _optional(_TEXT, "the built-in tiny model"),
    "model.builtin": _choice(*BUILTINS),
    "model.moe_aux_loss_coeff": _optional(_number(">= 0", lambda v: v >= 0), "as the HF config trains it"),
    "model.attention": _choice("sdpa", "megatron"),
    "model.dtype": _choice("fp32", "bf16", "fp16"),
    "parallel.backend": _choice("megatron", "fsdp2"),
    "parallel.tp": _integer(1),
    "parallel.pp": _integer(1),
    "parallel.sp": _BOOL,
    "parallel.ep": _integer(1),
    "parallel.etp": _integer(1),
    "data.path": _optional(_TEXT, "the built-in corpus"),
    "data.format": _optional(_choice("text", "prompt_completion", "messages"), "detected from the first record"),
    "data.text_field": _TEXT,
    "data.prompt_field": _TEXT,
    "data.completion_field": _TEXT,
    "data.messages_field": _TEXT,
    "data.packing": _BOOL,
    "data.train_on_prompt": _BOOL,
    "data.overlong": _choice("truncate", "drop", "error"),
    "data.skip_invalid": _BOOL,
    "data.seq_len": _integer(1),
    "data.eval_fraction": _number("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.lr": _number(">= 0", lambda v: v >= 0),
    "optim.weight_decay": _number(">= 0", lambda v: v >= 0),
    "optim.betas": _BETAS,
    "optim.warmup_steps": _integer(0),
    "optim.schedule": _choice("constant", "linear", "cosine"),
    "optim.min_lr_ratio": _number("in [0, 1]", lambda v: 0 <= v <= 1),
    "optim.grad_clip": _optional(_number("> 0", lambda v: v > 0), "no clipping"),
    "train.steps": _integer(1),
    "train.micro_batch_size": _integer(1),
    "train.grad_accum": _integer(1),
    "train.seed": _integer(0, maximum=2**32 - 1),
    "train.log_interval": _integer(1),
    "train.eval_interval": _integer(0, "0: no evaluation"),
    "train.eval_batches": _integer(0),
    "train.checkpoint_interval": _integer(0, "0: a checkpoint at the last step only"),
    "train.keep_last": _integer(0, "0 keeps every checkpoint"),
    "train.out_dir": _TEXT,
    "train.consolidate": _BOOL,
    "train.on_later_checkpoints": _choice(*LATER_CHECKPOINT_POLICIES),
    "train.on_nonfinite": _choice(*NONFINITE_POLICIES),
    "train.max_skipped_in_a_row": _integer(1),
    "train.device": _choice("auto", "cuda", "cpu"),
    "train.recompute": _choice("none", "selective", "full"),
    "train.peak_tflops": _optional(_number("> 0", lambda v: v > 0), "no MFU"),
    "train.initial_loss_scale": _number("> 0", lambda v: v > 0),
    "train.min_loss_scale": _number("> 0", lambda v: v > 0),
}


def _check_combinations(config: TrainConfig) -> None:
    p, t, d = config.parallel, config.train, config.data
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp needs parallel.tp > 1.")
    if p.ep > 1 and p.tp > 1 and not p.sp:
        raise ConfigError("parallel.ep > 1 with parallel.tp > 1 needs parallel.sp: true (megatron's MoE token dispatch).")
    if p.backend == "fsdp2":
        _check_fsdp2(config)
    if t.eval_interval and t.eval_batches < 1:
        raise ConfigError(
            f"train.eval_batches must be >= 1 when evaluation is on (train.eval_interval={t.eval_interval}), "
            f"got {t.eval_batches}; raise it or set train.eval_interval=0."
        )
    if t.eval_interval and d.eval_fraction == 0:
        raise ConfigError(
            "evaluation needs held-out data but data.eval_fraction is 0; set data.eval_fraction > 0 "
            "or train.eval_interval=0."
        )


def _check_fsdp2(config: TrainConfig) -> None:
    """parallel.backend=fsdp2 shards the HF model over all ranks (DP = world size): the keys of
    the megatron path that have no meaning there are refused, not ignored."""
    p, m, t = config.parallel, config.model, config.train
    if (p.tp, p.pp, p.ep, p.etp) != (1, 1, 1, 1):
        raise ConfigError(f"parallel.backend=fsdp2 shards over data parallelism only: set parallel.tp, pp, ep and "
                          f"etp to 1 (got tp={p.tp}, pp={p.pp}, ep={p.ep}, etp={p.etp}).")
    if m.attention != "sdpa":
        raise ConfigError("model.attention=megatron is megatron's attention; parallel.backend=fsdp2 runs the HF model "
                          "with its own (sdpa) attention: set model.attention=sdpa.")
    if m.dtype == "fp16":
        raise ConfigError("model.dtype=fp16 needs loss scaling, which parallel.backend=fsdp2 does not have yet; use bf16.")
    if t.recompute == "selective":
        raise ConfigError("train.recompute=selective is megatron's; with parallel.backend=fsdp2 use none or full "
                          "(full: each decoder layer recomputed in backward).")


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(given: dict, valid: list[str], where: str) -> None:
    """``where`` is the section name ("" for the top level)."""
    prefix = f"{where}." if where else ""
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key {prefix}{key}" + hint)


def _section(cls: type, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where} must be a mapping, got {values!r}.")
    _check_keys(values, [f.name for f in dataclasses.fields(cls)], where)
    parsed = {}
    for key, value in values.items():
        parse = RULES[f"{where}.{key}"].parse
        parsed[key] = parse(value) if parse else value
    return cls(**parsed)


def _lora_section(values: Any) -> Any:
    """A copy of the lora mapping; absent or empty: the default (anything else is refused by
    :meth:`TrainConfig.lora_config`)."""
    if values is None or values == {}:
        return TrainConfig().lora
    return dict(values) if isinstance(values, dict) else values


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section.")
    node[parts[-1]] = value


def load_train_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML file (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must contain a mapping of sections.")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value.")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e}).") from None
        _set_path(data, key.strip(), parsed)
    _check_keys(data, list(_SECTIONS), "")
    config = TrainConfig(
        model=_section(ModelSection, data.get("model"), "model"),
        parallel=_section(ParallelSection, data.get("parallel"), "parallel"),
        lora=_lora_section(data.get("lora")),
        data=_section(DataSection, data.get("data"), "data"),
        optim=_section(OptimSection, data.get("optim"), "optim"),
        train=_section(TrainSection, data.get("train"), "train"),
    )
    config.validate()
    return config


def describe_keys() -> str:
    """Every config key with its default and what it must be (from :data:`RULES`), for ``--help``."""
    defaults = TrainConfig()
    lines = ["config keys (section.key=value overrides any of them; lora.* takes any LoraConfig field):"]
    for key, rule in RULES.items():
        section, name = key.split(".")
        default = getattr(getattr(defaults, section), name)
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default, default_flow_style=True)
        lines.append(f"  {key}={shown.strip().removesuffix('...').strip()}: {rule.text}")
    return "\n".join(lines)
