"""Read instruction-tuning records through the ``datasets`` library and check them.

Sources: a ``.jsonl`` / ``.json`` file, a ``.parquet`` file or a folder of them, or a folder
written by ``Dataset.save_to_disk``. Formats (``data.format``; detected from the first record
when unset):

    text               {"text": "..."}
    prompt_completion  {"prompt": "...", "completion": "..."}
    messages           {"messages": [{"role": "user", "content": "..."}, ...]}

Every record is checked before anything is tokenised; a bad one is reported with its file and
line (JSON Lines) or row, or skipped and counted with ``skip_invalid`` where the issue is the
data rather than the file (a conversation without an assistant turn).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..config import ConfigError
from ..quiet import quiet_datasets

FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Fields:
    """Where each format keeps its content (``data.*_field``)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def _files(path: str) -> tuple[str, list[str]]:
    """(``datasets`` builder, data files) for ``path``; ("disk", [path]) for save_to_disk."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "disk", [path]
        parquet = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if parquet:
            return "parquet", parquet
        raise ConfigError(f"data.path {path} is a folder with neither a saved dataset (save_to_disk) nor .parquet files.")
    if not os.path.isfile(path):
        raise ConfigError(f"data file {path} does not exist.")
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet")):
        if path.endswith(suffix):
            return builder, [path]
    raise ConfigError(f"data file {path}: use .jsonl, .json, .parquet or a save_to_disk folder for instruction data.")


def load_records(path: str):
    """The records of ``path`` as a ``datasets.Dataset`` (memory-mapped Arrow)."""
    import datasets  # deferred on purpose: a heavy import (~1 s), needed only for instruction data

    builder, files = _files(path)
    quiet_datasets()
    try:
        if builder == "disk":
            data = datasets.load_from_disk(files[0])
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise ConfigError(f"{path} holds splits {list(data)}; point data.path at one of them.")
                data = data["train"]
            return data
        return datasets.load_dataset(builder, data_files=files, split="train")
    except ConfigError:
        raise
    except Exception as e:  # Arrow could not read it: find the record that breaks the schema
        if builder == "json":
            _scan_json_lines(files[0])
        raise ConfigError(f"data file {path} could not be read: {type(e).__name__}: {e}") from None


def json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; a ConfigError names
    the line that is not valid JSON or not an object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number} is not valid JSON ({e}).") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number} is not a JSON object.")
            yield number, record


def _scan_json_lines(path: str) -> None:
    """Raise the first line-level problem of a JSON Lines file that Arrow refused as a whole."""
    if not path.endswith(".jsonl"):
        return
    first: Optional[dict] = None
    for number, record in json_lines(path):
        first = first or record
        for key, value in record.items():
            if key in first and value is not None and first[key] is not None and type(value) is not type(first[key]):
                raise ConfigError(
                    f"{path}:{number}: field {key!r} is a {type(value).__name__} where earlier records have a "
                    f"{type(first[key]).__name__}."
                )
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, dict) and not isinstance(item.get("content", ""), str):
                        raise ConfigError(f"{path}:{number}: message content must be a string, got {item.get('content')!r}.")


def line_numbers(path: str) -> Optional[list[int]]:
    """The line of each record of a JSON Lines file (blank lines hold none); None otherwise."""
    if not (os.path.isfile(path) and path.endswith(".jsonl")):
        return None
    with open(path, "rb") as f:
        return [number for number, line in enumerate(f, 1) if line.strip()]


def detect_format(record: dict, fields: Fields) -> str:
    """The format of a record by the fields it has."""
    if record.get(fields.messages) is not None:
        return "messages"
    if record.get(fields.prompt) is not None and record.get(fields.completion) is not None:
        return "prompt_completion"
    if record.get(fields.text) is not None:
        return "text"
    raise ConfigError(
        f"cannot tell the data format from the first record (fields {sorted(record)}): set data.format to one of "
        f"{', '.join(FORMATS)} and the data.*_field keys to your field names."
    )


class InvalidRecord(ValueError):
    """A record that breaks a rule of its format; ``skippable`` when ``skip_invalid`` may drop it."""

    def __init__(self, message: str, skippable: bool = False) -> None:
        super().__init__(message)
        self.skippable = skippable


def check_record(record: dict, fmt: str, fields: Fields) -> None:
    """Raise InvalidRecord when ``record`` is not a valid ``fmt`` record."""
    if fmt == "text":
        _string(record, fields.text)
    elif fmt == "prompt_completion":
        _string(record, fields.prompt)
        _string(record, fields.completion)
    else:
        messages = record.get(fields.messages)
        if not isinstance(messages, list) or not messages:
            raise InvalidRecord(f"field {fields.messages!r} must be a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InvalidRecord(f"message {i} is not an object")
            if message.get("role") not in ROLES:
                raise InvalidRecord(f"message {i} has role {message.get('role')!r}; use one of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise InvalidRecord(f"message {i} content must be a string, got {message.get('content')!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidRecord("the conversation has no assistant turn (set data.skip_invalid: true to skip such records)", True)


def _string(record: dict, field: str) -> None:
    if not isinstance(record.get(field), str):
        raise InvalidRecord(f"field {field!r} must be a string, got {record.get(field)!r}")


def valid_records(data, path: str, fmt: str, fields: Fields, skip_invalid: bool) -> Iterator[tuple[int, dict]]:
    """(index, record) for each valid record; raises ConfigError naming the file and line (or
    row) of the first invalid one, unless it is skippable and ``skip_invalid`` is set."""
    lines = line_numbers(path)
    for index, record in enumerate(data):
        try:
            check_record(record, fmt, fields)
        except InvalidRecord as e:
            if e.skippable and skip_invalid:
                continue
            where = f"{path}:{lines[index]}" if lines and index < len(lines) else f"{path} record {index}"
            raise ConfigError(f"{where}: {e}.") from None
        yield index, _plain(record)


def _plain(record: Any) -> Any:
    """Drop the ``None`` keys Arrow adds for fields other records have (e.g. a message's
    ``tool_calls``), so a chat template sees what the file said."""
    if isinstance(record, dict):
        return {k: _plain(v) for k, v in record.items() if v is not None}
    if isinstance(record, list):
        return [_plain(v) for v in record]
    return record
