"""Read documents, tokenise them, and pack the tokens into fixed-length training sequences.

Packing: documents are joined (with the tokenizer's end-of-text id between them when it has
one) into one token stream, cut into windows of ``seq_len + 1`` tokens; a window gives the
inputs ``w[:-1]`` and the next-token labels ``w[1:]``. The last ``eval_fraction`` of the
windows is held out for evaluation.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Optional, Protocol

import torch

from ..config import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """The built-in tokenizer: UTF-8 bytes are the tokens (vocabulary 256, no downloads)."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(model_dir: Optional[str]) -> Tokenizer:
    """The model directory's tokenizer when it has one, else the built-in byte tokenizer."""
    if model_dir and any(
        os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model")
    ):
        from transformers import AutoTokenizer

        return _HFTokenizer(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    return ByteTokenizer()


def builtin_corpus_path() -> str:
    return str(resources.files("dist_lora.data").joinpath("corpus.txt"))


def read_documents(path: str, text_field: str = "text") -> list[str]:
    """Documents of a ``.jsonl`` file (one JSON object per line, text under ``text_field``) or
    of a text file (paragraphs separated by blank lines). Raises a clear error for a missing
    or empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if path.endswith(".jsonl"):
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e}).") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number} has no string field {text_field!r}.")
            docs.append(record[text_field])
    else:
        docs = [p.strip() for p in raw.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data file {path} contains no text.")
    return docs


class PackedDataset:
    """Fixed-length (inputs, labels) windows over the packed token stream."""

    def __init__(self, docs: list[str], tokenizer: Tokenizer, seq_len: int, eval_fraction: float = 0.1) -> None:
        ids: list[int] = []
        for doc in docs:
            ids += tokenizer.encode(doc)
            ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n\n")
        windows = len(ids) // (seq_len + 1)
        if windows < 2:
            raise ValueError(
                f"the data has {len(ids)} tokens: too few for two sequences of {seq_len + 1}; "
                "add data or lower data.seq_len."
            )
        stream = torch.tensor(ids[: windows * (seq_len + 1)], dtype=torch.long).view(windows, seq_len + 1)
        n_eval = max(1, int(round(windows * eval_fraction))) if eval_fraction > 0 else 0
        if n_eval >= windows:
            raise ConfigError(
                f"data.eval_fraction={eval_fraction} holds out all {windows} sequences of {seq_len + 1} tokens, "
                "leaving none for training; lower data.eval_fraction, add data or lower data.seq_len."
            )
        self.train = stream[: windows - n_eval]
        self.eval = stream[windows - n_eval :]
        self.seq_len = seq_len

    def batch(self, split: str, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of a split, cycling over it in a fixed shuffled order per epoch."""
        data = self.train if split == "train" else self.eval
        rows = []
        for i in range(index * batch_size, (index + 1) * batch_size):
            epoch, pos = divmod(i, len(data))
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
            rows.append(data[order[pos]])
        windows = torch.stack(rows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
