"""Instruction-tuning data: records -> samples -> packed sequences, built once and cached.

The build (``build_sequences``) reads and checks every record, tokenises, applies the
overlong rule, holds out the last ``eval_fraction`` of the samples (so evaluation samples
never share a sequence with training ones) and packs each split. ``load_sft_dataset`` keeps
the result in ``<cache_dir>/sft-<key>.safetensors``, keyed by a hash of the data files, the
tokenizer (and its chat template) and the settings; local rank 0 builds it while the other
ranks of the node wait, and a restart reuses it. Each rank then reads only the rows of its
own batches from the memory-mapped file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ConfigError
from ..io import atomic_path, atomic_write_text
from .packing import FIELDS, attention_mask, pack
from .pipeline import epoch_row
from .records import Fields, detect_format, load_records, valid_records
from .samples import IGNORE, Sample, make_sample
from .tokenizer import Tokenizer, padding_id

OVERLONG = ("truncate", "drop", "error")


@dataclass(frozen=True)
class SftSettings:
    format: Optional[str] = None
    fields: Fields = field(default_factory=Fields)
    seq_len: int = 64
    packing: bool = True
    train_on_prompt: bool = False
    overlong: str = "drop"
    eval_fraction: float = 0.1
    skip_invalid: bool = False


@dataclass
class Batch:
    """One micro-batch: [b, s] tensors; ``document_ids`` None for a stream of raw text."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, item) -> "Batch":
        """A Batch, or the (tokens, labels) pair of a raw-text PackedDataset, as a Batch."""
        return item if isinstance(item, Batch) else cls(*item)

    def loss_mask(self) -> torch.Tensor:
        """1.0 where the label is trained, 0.0 where it is IGNORE."""
        return (self.labels != IGNORE).float()

    def trained_tokens(self) -> torch.Tensor:
        return (self.labels != IGNORE).sum()

    def attention_mask(self) -> Optional[torch.Tensor]:
        return None if self.document_ids is None else attention_mask(self.document_ids)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.position_ids), move(self.document_ids))


def _length_summary(lengths: list[int]) -> str:
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"min {ordered[0]}, median {pick(0.5)}, p90 {pick(0.9)}, max {ordered[-1]}"


def _fit(samples: list[Sample], settings: SftSettings, path: str) -> tuple[list[Sample], dict]:
    """Apply the overlong rule and drop samples left with nothing to train on."""
    n = settings.seq_len
    over = [s for s in samples if len(s) > n]
    if over and settings.overlong == "error":
        raise ConfigError(
            f"{path}: {len(over)} samples are longer than data.seq_len={n} ({_length_summary([len(s) for s in over])}); "
            "raise data.seq_len or set data.overlong to drop or truncate."
        )
    kept = [Sample(s.inputs[:n], s.labels[:n]) if len(s) > n else s for s in samples
            if len(s) <= n or settings.overlong == "truncate"]
    trainable = [s for s in kept if any(label != IGNORE for label in s.labels)]
    if not trainable:
        raise ConfigError(
            f"{path}: no sample is left to train on: {len(over)} of {len(samples)} are longer than data.seq_len={n} "
            f"(lengths {_length_summary([len(s) for s in samples])}); raise data.seq_len or set data.overlong: truncate."
        )
    stats = {"samples": len(samples), "overlong": len(over), "without_labels": len(kept) - len(trainable)}
    return trainable, stats


def build_sequences(path: str, tokenizer: Tokenizer, settings: SftSettings, show_progress: bool = True) -> tuple[dict, dict]:
    """({"train.tokens": ..., "eval.labels": ...}, statistics)."""
    data = load_records(path)
    if len(data) == 0:
        raise ConfigError(f"data file {path} holds no records.")
    fmt = settings.format or detect_format(data[0], settings.fields)
    records = valid_records(data, path, fmt, settings.fields, settings.skip_invalid)
    samples = [make_sample(r, fmt, tokenizer, settings.fields, settings.train_on_prompt)
               for _, r in tqdm(records, total=len(data), desc="tokenising", disable=not show_progress)]
    samples, stats = _fit(samples, settings, path)
    stats.update(format=fmt, skipped_invalid=len(data) - stats["samples"])
    n_eval = max(1, round(len(samples) * settings.eval_fraction)) if settings.eval_fraction > 0 else 0
    if len(samples) - n_eval < 1:
        raise ConfigError(f"{path}: {len(samples)} usable samples leave none for training with data.eval_fraction={settings.eval_fraction}.")
    tensors = {}
    for split, part in (("train", samples[: len(samples) - n_eval]), ("eval", samples[len(samples) - n_eval :])):
        for name, value in pack(part, settings.seq_len, settings.packing, padding_id(tokenizer)).items():
            tensors[f"{split}.{name}"] = value
    tensors["eval.present"] = torch.tensor([n_eval > 0])
    padded = (tensors["train.document_ids"] < 0).sum().item()
    stats.update(train_sequences=len(tensors["train.tokens"]), pad_fraction=padded / tensors["train.tokens"].numel())
    return tensors, stats


def cache_key(path: str, tokenizer: Tokenizer, settings: SftSettings) -> str:
    """sha256 over the data files' bytes, the tokenizer's fingerprint and the settings."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    digest.update(tokenizer.fingerprint().encode())
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for name in files:
        digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _build_into(target: str, path: str, tokenizer: Tokenizer, settings: SftSettings) -> None:
    error = target + ".error"
    if os.path.exists(error):
        os.remove(error)
    try:
        tensors, stats = build_sequences(path, tokenizer, settings)
    except ConfigError as e:
        atomic_write_text(error, str(e))  # the waiting ranks raise the same message
        raise
    with atomic_path(target) as tmp:
        save_file(tensors, tmp, metadata={"stats": json.dumps(stats)})


def _wait_for(target: str, started: float, poll: float = 0.2) -> None:
    error = target + ".error"
    while not os.path.exists(target):
        if os.path.exists(error) and os.path.getmtime(error) >= started - 5:
            with open(error) as f:
                raise ConfigError(f.read())
        time.sleep(poll)


class SftDataset:
    """Packed sequences from the cache file; ``batch`` reads only the rows it returns."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._handle = safe_open(file, "pt")
        self.stats = json.loads(self._handle.metadata()["stats"])
        self.sizes = {split: self._handle.get_slice(f"{split}.tokens").get_shape()[0] for split in ("train", "eval")}
        if not self._handle.get_tensor("eval.present").item():
            self.sizes["eval"] = 0
        self.seq_len = self._handle.get_slice("train.tokens").get_shape()[1]

    def __len__(self) -> int:
        return self.sizes["train"]

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        rows = [epoch_row(i, self.sizes[split]) for i in range(index * batch_size, (index + 1) * batch_size)]
        parts = {name: torch.cat([self._handle.get_slice(f"{split}.{name}")[r : r + 1] for r in rows]) for name in FIELDS}
        return Batch(parts["tokens"], parts["labels"], parts["position_ids"], parts["document_ids"])


def load_sft_dataset(path: str, tokenizer: Tokenizer, settings: SftSettings, cache_dir: str) -> SftDataset:
    """Build (local rank 0) or wait for (other ranks) the cached sequences, then open them."""
    started = time.time()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"sft-{cache_key(path, tokenizer, settings)}.safetensors")
    if not os.path.exists(target):
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _build_into(target, path, tokenizer, settings)
        else:
            _wait_for(target, started)
    return SftDataset(target)
