"""The ShareGPT dataset format for qlora, as a separately installed plugin (``sharegpt-format``).

A ShareGPT row holds a ``conversations`` list of turns ``{"from": ..., "value": ...}``, where ``from`` is
``human`` (or ``user``), ``gpt`` (or ``assistant``) or ``system``::

    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}

The turns are mapped to chat messages (human -> user, gpt -> assistant) and rendered with the tokenizer's
chat template, exactly as the built-in ``chat`` format renders a ``messages`` column: each gpt answer's
span is what the template adds for that turn (its end-of-turn token included), and only those spans are
trained. Extra keys in a turn are ignored.

Installing the package changes no run by itself; ask for it with ``--plugin sharegpt-format`` (or
``plugins: [sharegpt-format]`` in the config). Being a requested formatter plugin, it then replaces the
default formats, so the data must be ShareGPT.
"""

from __future__ import annotations

from typing import Any, Mapping

from qlora_core import ChatTemplateFormat, hookimpl

__version__ = "0.1.0"

#: ShareGPT ``from`` values (compared case-insensitively) and the chat-template role each becomes.
ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def to_messages(conversations: Any) -> list[dict[str, str]]:
    """Turn a ShareGPT ``conversations`` list into chat ``{role, content}`` messages.

    :raises ValueError: on a malformed turn or an unknown ``from`` value.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("field 'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i} needs 'from' and 'value', got {turn!r}")
        source, value = turn["from"], turn["value"]
        role = ROLES.get(source.strip().lower()) if isinstance(source, str) else None
        if role is None:
            raise ValueError(f"conversation turn {i} has unknown 'from' value {source!r}; "
                             f"expected one of: {', '.join(ROLES)}")
        if not isinstance(value, str):
            raise ValueError(f"conversation turn {i}: 'value' must be a string, got {type(value).__name__}")
        messages.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no 'gpt' turn to train on")
    return messages


class ShareGPTFormat(ChatTemplateFormat):
    """ShareGPT ``conversations`` rendered with the tokenizer's chat template; the gpt turns are trained
    (rendering and answer spans: :class:`qlora_core.ChatTemplateFormat`)."""

    name = "sharegpt"
    fields = ("conversations",)

    def messages(self, example: Mapping[str, Any]) -> list[dict[str, str]]:
        return to_messages(example["conversations"])


SHAREGPT = ShareGPTFormat()


@hookimpl
def qlora_dataset_formats(config):
    return [SHAREGPT]
