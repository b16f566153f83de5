"""Read documents, tokenise them, and pack the tokens into fixed-length training sequences.

Packing: documents are joined (with the tokenizer's end-of-text id between them when it has
one) into one token stream, cut into windows of ``seq_len + 1`` tokens; a window gives the
inputs ``w[:-1]`` and the next-token labels ``w[1:]``. The last ``eval_fraction`` of the
windows is held out for evaluation.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

from ..config import ConfigError
from .records import json_lines
from .tokenizer import Tokenizer, end_of_document


def builtin_corpus_path() -> str:
    return str(resources.files("dist_lora.data").joinpath("corpus.txt"))


def read_documents(path: str, text_field: str = "text") -> list[str]:
    """Documents of a ``.jsonl`` file (one JSON object per line, text under ``text_field``) or
    of a text file (paragraphs separated by blank lines). Raises a clear error for a missing
    or empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist.")
    if path.endswith(".jsonl"):
        docs = []
        for number, record in json_lines(path):
            if not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number} has no string field {text_field!r}.")
            docs.append(record[text_field])
    else:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        docs = [p.strip() for p in raw.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data file {path} contains no text.")
    return docs


def epoch_row(i: int, rows: int) -> int:
    """The row that the ``i``-th draw reads: each pass over ``rows`` rows is a fixed
    permutation (seeded by the pass number), the same on every rank and at every layout."""
    epoch, pos = divmod(i, rows)
    return int(torch.randperm(rows, generator=torch.Generator().manual_seed(epoch))[pos])


class PackedDataset:
    """Fixed-length (inputs, labels) windows over the packed token stream."""

    def __init__(self, docs: list[str], tokenizer: Tokenizer, seq_len: int, eval_fraction: float = 0.1) -> None:
        ids: list[int] = []
        for doc in docs:
            ids += tokenizer.encode(doc)
            ids += end_of_document(tokenizer)
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

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "eval": len(self.eval)}

    def batch(self, split: str, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of a split, cycling over it in a fixed shuffled order per epoch."""
        data = self.train if split == "train" else self.eval
        windows = torch.stack([data[epoch_row(i, len(data))] for i in range(index * batch_size, (index + 1) * batch_size)])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
