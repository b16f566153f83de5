"""Which data a job reads and how: ``open_dataset`` turns the config's data section into a
dataset with ``sizes`` and ``batch(split, index, batch_size)``.

    data.path null     the built-in corpus (text), or with data.format: messages the built-in
                       instruction set (dist_lora/data/instructions.jsonl)
    format text        documents joined into one token stream, cut into windows, every token
                       trained (continued pre-training; pipeline.PackedDataset)
    prompt_completion, messages
                       samples with loss masks, packed with document boundaries (sft.py)
"""

from __future__ import annotations

import os
from dataclasses import replace
from importlib import resources
from typing import Optional

from ..config import ConfigError
from .pipeline import PackedDataset, builtin_corpus_path, read_documents
from .records import detect_format, json_lines, load_records, valid_records
from .sft import SftDataset, load_sft_dataset
from .tokenizer import Tokenizer


def builtin_instructions_path() -> str:
    return str(resources.files("dist_lora.data").joinpath("instructions.jsonl"))


def resolve(path: Optional[str], fmt: Optional[str], fields) -> tuple[str, str]:
    """(data path, format): the built-in data for a null path, the format detected when unset."""
    if path is None:
        if fmt in (None, "text"):
            return builtin_corpus_path(), "text"
        if fmt == "messages":
            return builtin_instructions_path(), "messages"
        raise ConfigError("the built-in data is text or messages; set data.path for prompt_completion data.")
    if path.endswith(".txt"):
        if fmt not in (None, "text"):
            raise ConfigError(f"data.path {path} is plain text: data.format {fmt} needs .jsonl, .json, .parquet or a saved dataset.")
        return path, "text"
    if fmt is None:
        first = _first_record(path)
        fmt = "text" if first is None else detect_format(first, fields)
    return path, fmt


def _first_record(path: str) -> Optional[dict]:
    """The first record (None for an empty or missing file: the text reader names the problem)."""
    if path.endswith(".jsonl"):
        if not os.path.isfile(path):
            return None
        return next((record for _, record in json_lines(path)), None)
    records = load_records(path)
    return records[0] if len(records) else None


def open_dataset(section, tokenizer: Tokenizer, cache_dir: str) -> PackedDataset | SftDataset:
    """The dataset of a job's ``data`` config section (train_config.DataSection)."""
    settings = section.sft_settings()
    path, fmt = resolve(section.path, section.format, settings.fields)
    if fmt != "text":
        return load_sft_dataset(path, tokenizer, replace(settings, format=fmt), cache_dir)
    if path.endswith((".txt", ".jsonl")):
        docs = read_documents(path, section.text_field)
    else:
        docs = [r[section.text_field] for _, r in valid_records(load_records(path), path, "text", settings.fields, False)]
    return PackedDataset(docs, tokenizer, section.seq_len, section.eval_fraction)
