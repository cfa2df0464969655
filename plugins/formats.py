"""Dataset formats: guanaco (``text``), alpaca (``instruction``/``input``/``output``) and chat (``messages``).

Each is its own plugin (``guanaco-format``, ``alpaca-format``, ``chat-format``) offering one format through
:func:`~qlora_core.hookspecs.qlora_dataset_formats`. A format renders a row to text and marks the
character spans of the assistant's answers; only the tokens of those spans are trained (unless
``data.train_on_prompt``).

Detection from column names is exclusive, so it does not depend on the order the formats are offered in:

- chat: a ``messages`` column;
- alpaca: ``instruction`` and ``output`` columns, and no ``messages``;
- guanaco: a ``text`` column, and neither ``messages`` nor ``instruction`` (datasets such as Alpaca's
  carry a ``text`` column that is a rendering of their other fields, not guanaco turns).

Guanaco rendering, as in the openassistant-guanaco data: turns follow one another with no newline,
``### Human: {question}### Assistant: {answer}### Human: ...``. The prompt for a question is
``### Human: {question}### Assistant:``; the answer's span starts right after ``### Assistant:`` (so the
text before a span is exactly that prompt, and the answer's first token is `` {word}`` with its leading
space, as the tokenizer cuts it in the training data) and ends before the next ``### Human:``, trailing
whitespace excluded. The tokenizer's eos token is appended after the final answer, inside its span.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from qlora_core import hookimpl
from qlora_core import ChatTemplateFormat, FormattedExample

HUMAN = "### Human:"
ASSISTANT = "### Assistant:"
_MARKER = re.compile(re.escape(HUMAN) + "|" + re.escape(ASSISTANT))

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _eos(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("the tokenizer has no eos_token, so answers cannot be ended; set tokenizer.eos_token")
    return eos


def _text_field(example: Mapping[str, Any], key: str) -> str:
    value = example[key]
    # CSV and parquet readers type a column of numbers as numbers; as text they are what the user wrote.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


class GuanacoFormat:
    """Multi-turn ``### Human: ... ### Assistant: ...`` text in one ``text`` field."""

    name = "guanaco"
    fields = ("text",)

    def matches(self, columns: Sequence[str]) -> bool:
        cols = set(columns)
        return "text" in cols and "messages" not in cols and "instruction" not in cols

    def format(self, example: Mapping[str, Any], tokenizer: Any) -> FormattedExample:
        text = _text_field(example, "text")
        eos = _eos(tokenizer)
        markers = list(_MARKER.finditer(text))
        if not any(m.group() == ASSISTANT for m in markers):
            raise ValueError(f"guanaco text has no {ASSISTANT!r} turn to train on: {text[:60]!r}")
        last_is_answer = markers[-1].group() == ASSISTANT
        if last_is_answer:
            # The model learns to stop: the final answer ends with eos (trailing whitespace dropped first).
            text = text.rstrip()
            if not text.endswith(eos):
                text += eos
        spans = []
        for i, m in enumerate(markers):
            if m.group() != ASSISTANT:
                continue
            start = m.end()
            end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
            end = start + len(text[start:end].rstrip())
            if text[start:end].strip():
                spans.append((start, end))
        if not spans:
            raise ValueError(f"guanaco text has only empty {ASSISTANT!r} turns: {text[:60]!r}")
        return FormattedExample(text, tuple(spans))

    def prompt(self, user_text: str, tokenizer: Any) -> str:
        return f"{HUMAN} {user_text}{ASSISTANT}"


class AlpacaFormat:
    """Alpaca's instruction / optional input / output rows, with the standard Alpaca prompt."""

    name = "alpaca"
    fields = ("instruction", "output")

    def matches(self, columns: Sequence[str]) -> bool:
        cols = set(columns)
        return "instruction" in cols and "output" in cols and "messages" not in cols

    def _render_prompt(self, instruction: str, input_text: str | None) -> str:
        if input_text:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)

    def format(self, example: Mapping[str, Any], tokenizer: Any) -> FormattedExample:
        instruction = _text_field(example, "instruction")
        output = _text_field(example, "output")
        input_text = _text_field(example, "input") if example.get("input") is not None else None
        prompt = self._render_prompt(instruction, input_text)
        answer = output + _eos(tokenizer)
        return FormattedExample(prompt + answer, ((len(prompt), len(prompt) + len(answer)),))

    def prompt(self, user_text: str, tokenizer: Any) -> str:
        return self._render_prompt(user_text, None)


class ChatFormat(ChatTemplateFormat):
    """A ``messages`` list of ``{role, content}`` rendered with the tokenizer's chat template (the rendering and
    the answer spans: :class:`qlora_core.ChatTemplateFormat`)."""

    name = "chat"
    fields = ("messages",)

    def messages(self, example: Mapping[str, Any]) -> list[dict[str, Any]]:
        raw = example["messages"]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ValueError("field 'messages' must be a non-empty list of {role, content}")
        messages = []
        for m in raw:
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
            messages.append(dict(m))
        return messages


class FormatPlugin:
    """A plugin offering one dataset format."""

    def __init__(self, fmt: Any):
        self.fmt = fmt

    @hookimpl
    def qlora_dataset_formats(self, config):
        return [self.fmt]

    def __repr__(self) -> str:
        return f"FormatPlugin({self.fmt.name!r})"


guanaco = FormatPlugin(GuanacoFormat())
alpaca = FormatPlugin(AlpacaFormat())
chat = FormatPlugin(ChatFormat())
