"""Tokenizers for training data: the model directory's Hugging Face tokenizer, or the built-in
byte tokenizer (UTF-8 bytes are the tokens, vocabulary 256) with a built-in chat template."""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Protocol

from ..config import ConfigError
from .chat import builtin_chat_template, render_jinja


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character offset at which each token starts)."""
        ...

    def render_chat(self, messages: list, add_generation_prompt: bool) -> str: ...


def end_of_document(tokenizer: Tokenizer) -> list[int]:
    """What ends a document or an answer: the EOS token, or a blank line without one."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n\n")


def padding_id(tokenizer: Tokenizer) -> int:
    """The id that fills a sequence's unused tail (its label is always masked)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


class ByteTokenizer:
    """The built-in tokenizer: UTF-8 bytes are the tokens (vocabulary 256, no downloads)."""

    vocab_size = 256
    eos_token_id = None
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids, starts = [], []
        for offset, char in enumerate(text):
            encoded = char.encode("utf-8")
            ids += encoded
            starts += [offset] * len(encoded)
        return ids, starts

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list, add_generation_prompt: bool) -> str:
        return render_jinja(builtin_chat_template(), messages, add_generation_prompt)

    def fingerprint(self) -> str:
        return "byte:" + builtin_chat_template()


class HFTokenizer:
    """A transformers tokenizer behind the same small interface."""

    def __init__(self, tokenizer, directory: str) -> None:
        self._tok = tokenizer
        self.directory = directory
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        if not self._tok.is_fast:
            raise ConfigError(f"the tokenizer in {self.directory} is a slow tokenizer; chat data needs a fast one (tokenizer.json).")
        out = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], [start for start, _ in out["offset_mapping"]]

    def render_chat(self, messages: list, add_generation_prompt: bool) -> str:
        if not self._tok.chat_template:
            raise ConfigError(
                f"the tokenizer in {self.directory} has no chat template: add one (chat_template in "
                "tokenizer_config.json or chat_template.jinja) or use data.format: prompt_completion."
            )
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def fingerprint(self) -> str:
        """The tokenizer's files, for the data cache key."""
        digest = hashlib.sha256()
        for name in sorted(os.listdir(self.directory)):
            if name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                with open(os.path.join(self.directory, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
        return "hf:" + digest.hexdigest()


def load_tokenizer(model_dir: Optional[str]) -> Tokenizer:
    """The model directory's tokenizer when it has one, else the built-in byte tokenizer."""
    if model_dir and any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer  # deferred on purpose: optional and heavy (the "hf" extra)

        return HFTokenizer(AutoTokenizer.from_pretrained(model_dir, local_files_only=True), model_dir)
    return ByteTokenizer()
