"""The training job's YAML configuration: sections, defaults, validation, overrides.

    model:    {hf_dir: null}            # a local HF Llama-family checkpoint; null = built-in tiny model
    parallel: {tp: 2, pp: 1, sp: false}
    lora:     {...}                     # any LoraConfig field
    data:     {path: null, format: null, seq_len: 64, eval_fraction: 0.1, packing: true,
               train_on_prompt: false, overlong: drop, skip_invalid: false,
               text_field: text, prompt_field: prompt, completion_field: completion, messages_field: messages}
    optim:    {lr: 3e-3, weight_decay: 0.0, betas: [0.9, 0.999], warmup_steps: 10,
               schedule: cosine, min_lr_ratio: 0.1, grad_clip: 1.0}
    train:    {steps: 300, micro_batch_size: 8, grad_accum: 1, seed: 1234, log_interval: 10,
               eval_interval: 100, eval_batches: 4, checkpoint_interval: 100, keep_last: 2,
               out_dir: runs/train, consolidate: true}

A key that does not exist is an error naming the nearest valid key. ``key=value`` overrides
(``train.steps=50``, ``lora.r=16``) are parsed as YAML values.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .config import ConfigError, LoraConfig


@dataclass
class ModelSection:
    hf_dir: Optional[str] = None


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    sp: bool = False


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

    def sft_settings(self):
        """The instruction-data settings (dist_lora.data.SftSettings) of this section."""
        from .data import SftSettings
        from .data.records import Fields

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


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 16})
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def lora_config(self) -> LoraConfig:
        _check_keys(self.lora, [f.name for f in dataclasses.fields(LoraConfig)], "lora")
        return LoraConfig(**self.lora)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(given: dict, valid: list[str], where: str) -> None:
    """``where`` is the section name ("" for the top level)."""
    prefix = f"{where}." if where else ""
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key {prefix}{key}" + hint)


def _section(cls: type, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where} must be a mapping, got {values!r}.")
    valid = [f.name for f in dataclasses.fields(cls)]
    _check_keys(values, valid, where)
    section = cls(**values)
    for f in dataclasses.fields(cls):
        value = getattr(section, f.name)
        if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.{f.name} must be a number, got {value!r}.")
    return section


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
        _set_path(data, key.strip(), yaml.safe_load(value))
    _check_keys(data, list(_SECTIONS), "")
    config = TrainConfig(
        model=_section(ModelSection, data.get("model"), "model"),
        parallel=_section(ParallelSection, data.get("parallel"), "parallel"),
        lora=dict(data.get("lora") or {"r": 8, "lora_alpha": 16}),
        data=_section(DataSection, data.get("data"), "data"),
        optim=_section(OptimSection, data.get("optim"), "optim"),
        train=_section(TrainSection, data.get("train"), "train"),
    )
    config.lora_config()  # validate the LoRA section now, with LoraConfig's messages
    _validate(config)
    return config


def _validate(config: TrainConfig) -> None:
    p, t, o, d = config.parallel, config.train, config.optim, config.data
    for name, value in [("parallel.tp", p.tp), ("parallel.pp", p.pp), ("train.steps", t.steps),
                        ("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                        ("data.seq_len", d.seq_len)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    if o.schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"optim.schedule must be constant, linear or cosine, got {o.schedule!r}.")
    if d.format not in (None, "text", "prompt_completion", "messages"):
        raise ConfigError(f"data.format must be text, prompt_completion or messages (or unset), got {d.format!r}.")
    if d.overlong not in ("truncate", "drop", "error"):
        raise ConfigError(f"data.overlong must be truncate, drop or error, got {d.overlong!r}.")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction!r}.")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp needs parallel.tp > 1.")
