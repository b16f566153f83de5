"""Chat rendering and the assistant spans that carry the loss.

A conversation is rendered with the tokenizer's chat template. The characters of assistant
turn i are the ones that rendering the first i+1 messages adds to rendering the first i with
the generation prompt:

    render(messages[:i], add_generation_prompt=True)  ->  "...<|assistant|>\n"
    render(messages[:i+1])                            ->  "...<|assistant|>\nanswer<|end|>\n"

so the answer and the template's end-of-turn marker are trained, the prompt markers are not.
A template that rewrites earlier turns (the renderings are not prefixes of each other) is
refused: its spans cannot be found this way.
"""

from __future__ import annotations

from importlib import resources
from typing import Callable

from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..config import ConfigError

Render = Callable[[list, bool], str]


def builtin_chat_template() -> str:
    """The built-in tiny model's chat template (``dist_lora/data/chat_template.jinja``)."""
    return resources.files("dist_lora.data").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def render_jinja(template: str, messages: list, add_generation_prompt: bool) -> str:
    """Render ``template`` in a sandbox, as transformers renders chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def assistant_spans(render: Render, messages: list) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of its assistant turns)."""
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError(
                "the chat template does not render a conversation as a sequence of prefixes (it rewrites earlier "
                "turns), so the assistant tokens cannot be found; use data.format: prompt_completion."
            )
        spans.append((len(before), len(through)))
    return text, spans
