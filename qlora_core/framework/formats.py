"""A base class for dataset formats that render conversations with the tokenizer's chat template.

The built-in ``chat`` format (a ``messages`` column) and third-party formats such as ShareGPT's
(``conversations`` of ``{from, value}`` turns) differ only in how a row becomes a list of ``{role, content}``
messages; the rendering and the location of each assistant turn in the rendered text are the same, and live
here.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from qlora_core.framework.types import FormattedExample


class ChatTemplateFormat:
    """A dataset format whose rows are conversations rendered with the tokenizer's chat template.

    Subclasses set :attr:`name` and :attr:`fields` and implement :meth:`messages` (a row to ``{role, content}``
    messages); :meth:`matches` accepts a dataset that has every one of :attr:`fields`.

    Each assistant message's span is what the template adds for it: the text between the conversation before it
    rendered with the generation prompt and the conversation up to it rendered without, trailing whitespace
    excluded (so the template's end-of-turn token is trained, the newline after it not).
    """

    name = "chat-template"
    fields: tuple[str, ...] = ()

    def matches(self, columns: Sequence[str]) -> bool:
        """Whether a dataset with these columns has every one of :attr:`fields`."""
        return bool(self.fields) and set(self.fields) <= set(columns)

    def messages(self, example: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One row as a list of ``{role, content}`` messages; raise ``ValueError`` naming what is wrong."""
        raise NotImplementedError(f"{type(self).__name__} must implement messages(example)")

    @staticmethod
    def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
        """``messages`` rendered by the tokenizer's chat template, as text."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat_template, so the chat format cannot render messages; use a chat "
                "model's tokenizer, set tokenizer.chat_template, or convert the data to the guanaco or alpaca format")
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises its own errors; the row number is added by the caller
            raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None
        if not isinstance(out, str):
            raise ValueError(f"the chat template returned {type(out).__name__}, not text")
        return out

    def format(self, example: Mapping[str, Any], tokenizer: Any) -> FormattedExample:
        """Render the row's conversation, marking every assistant turn as trained."""
        messages = self.messages(example)
        if not any(m.get("role") == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message to train on")
        full = self.render(tokenizer, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(tokenizer, messages[:i], True)
            upto = full if i + 1 == len(messages) else self.render(tokenizer, messages[: i + 1], False)
            if not upto.startswith(before) or not full.startswith(upto):
                raise ValueError(
                    "the chat template is not prefix-stable (rendering a conversation's first turns does not give "
                    "the start of rendering all of it), so assistant turns cannot be located; use a template that "
                    "renders earlier turns unchanged, or the guanaco/alpaca format")
            start = len(before)
            end = start + len(upto[start:].rstrip())
            if end > start:
                spans.append((start, end))
        return FormattedExample(full, tuple(spans), add_special_tokens=False)

    def prompt(self, user_text: str, tokenizer: Any) -> str:
        """One user turn rendered with the generation prompt: the text the assistant's answer follows."""
        return self.render(tokenizer, [{"role": "user", "content": user_text}], True)
