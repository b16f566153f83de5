"""Turn records into training samples: token ids and next-token labels, with every token that
is not trained on labelled ``IGNORE`` (-100, PyTorch's and PEFT's convention).

    prompt_completion   ids = prompt + completion + EOS; the completion and its EOS are trained
    messages            ids = the chat template's rendering; assistant turns (with the
                        template's end-of-turn marker) are trained, see chat.py
    ``train_on_prompt`` trains every token instead.

A sample of n ids gives n - 1 (input, label) positions: input ids[:-1], label labels[1:].
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat import assistant_spans
from .records import Fields
from .tokenizer import Tokenizer, end_of_document

IGNORE = -100


@dataclass
class Sample:
    inputs: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.inputs)


def _shifted(ids: list[int], trained: list[bool]) -> Sample:
    labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
    return Sample(ids[:-1], labels[1:])


def make_sample(record: dict, fmt: str, tokenizer: Tokenizer, fields: Fields, train_on_prompt: bool) -> Sample:
    """The sample of one valid record (see records.check_record)."""
    if fmt == "text":
        ids = tokenizer.encode(record[fields.text]) + end_of_document(tokenizer)
        return _shifted(ids, [True] * len(ids))
    if fmt == "prompt_completion":
        prompt = tokenizer.encode(record[fields.prompt])
        completion = tokenizer.encode(record[fields.completion]) + end_of_document(tokenizer)
        return _shifted(prompt + completion, [train_on_prompt] * len(prompt) + [True] * len(completion))
    text, spans = assistant_spans(tokenizer.render_chat, record[fields.messages])
    ids, starts = tokenizer.encode_with_offsets(text)
    trained = [train_on_prompt or any(a <= s < b for a, b in spans) for s in starts]
    return _shifted(ids, trained)
