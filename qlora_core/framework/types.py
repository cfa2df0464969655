"""Small value types shared by the core and plugins.

Kept free of heavy imports so that plugins can import them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from qlora_core.framework.config import Config


@dataclass(frozen=True)
class FormattedExample:
    """One training example rendered to text.

    :ivar text: the full text the model sees.
    :ivar train_spans: ``(start, end)`` character ranges of ``text`` whose tokens the loss covers
        (the assistant's answers). Tokens outside every span are masked out of the loss.
    :ivar add_special_tokens: whether the tokenizer should add its special tokens (BOS); ``False`` when
        the text already holds them, as a chat template's output does.
    """

    text: str
    train_spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True

    def prompt_and_answer(self) -> tuple[str, str]:
        """Split at the last trained span: the text before it (a prompt) and the span's text (the answer)."""
        if not self.train_spans:
            return self.text, ""
        start, end = self.train_spans[-1]
        return self.text[:start], self.text[start:end]


@runtime_checkable
class DatasetFormat(Protocol):
    """A dataset layout that a formatter plugin knows how to render.

    :ivar name: short name used in ``data.format`` and in messages (``"guanaco"``).
    :ivar fields: the dataset fields this format reads, for error messages.
    """

    name: str
    fields: tuple[str, ...]

    def matches(self, columns: Sequence[str]) -> bool:
        """Whether a dataset with these column names is in this format."""

    def format(self, example: Mapping[str, Any], tokenizer: Any) -> FormattedExample:
        """Render one dataset row to text, marking the answer spans the loss covers."""

    def prompt(self, user_text: str, tokenizer: Any) -> str:
        """Render a single user turn as a prompt that ends where the assistant's answer begins."""


@dataclass
class TrainControl:
    """What callbacks ask of the training loop, as transformers' ``TrainerControl``: set a flag during a step
    (in :func:`~qlora_core.hookspecs.qlora_on_step_end`, :func:`~qlora_core.hookspecs.qlora_on_log`, ...) and
    the loop acts on it at the end of that step, then clears it.

    :ivar should_stop: stop after this step: a checkpoint is written (unless ``train.save_strategy`` is
        ``no``), the evaluation after training, the export and :func:`~qlora_core.hookspecs.qlora_on_train_end`
        follow as at the end of a run, and the summary says which step it stopped at.
    :ivar should_save: write a checkpoint after this step, whatever ``train.save_strategy`` says.
    :ivar should_evaluate: evaluate on the held-out data after this step.
    """

    should_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False


@dataclass
class Run:
    """The state of a run, handed to callbacks and exporters.

    :ivar config: the resolved configuration.
    :ivar output_dir: the run's folder.
    :ivar max_steps: the number of optimizer steps the run will take.
    :ivar step: the last completed optimizer step.
    :ivar is_main_process: True on the process that writes files and shows progress.
    :ivar device: ``"cpu"`` or ``"cuda:N"``.
    :ivar compute_dtype: the dtype the model computes in (``"bfloat16"``, ``"float32"``, ...).
    :ivar model: the trained model (PEFT-wrapped) once it exists.
    :ivar tokenizer: the tokenizer.
    :ivar accelerator: the ``accelerate.Accelerator`` driving the run.
    :ivar optimizer: the optimizer (as the accelerator prepared it) once it exists.
    :ivar lr_scheduler: the learning-rate schedule once it exists.
    :ivar num_train_examples / num_eval_examples: examples after formatting and tokenization.
    :ivar max_micro_batch_tokens: the most tokens one micro-batch holds (batch x sequence), for plugins that
        size buffers once.
    :ivar control: the :class:`TrainControl` through which callbacks ask the loop to stop, save or evaluate.
    :ivar extra: free space for plugins to share state, keyed by plugin name.
    """

    config: "Config"
    output_dir: Path
    max_steps: int = 0
    step: int = 0
    is_main_process: bool = True
    device: str = "cpu"
    compute_dtype: str = "float32"
    model: Any = None
    tokenizer: Any = None
    accelerator: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    num_train_examples: int = 0
    num_eval_examples: int = 0
    max_micro_batch_tokens: int = 0
    control: TrainControl = field(default_factory=TrainControl)
    extra: dict[str, Any] = field(default_factory=dict)
    notify: Any = field(default=None, repr=False)

    def notice(self, message: str) -> None:
        """Tell the user something that is not an error (one line): every plugin's
        :func:`~qlora_core.hookspecs.qlora_on_notice` receives it, on this process."""
        if self.notify is not None:
            self.notify(run=self, message=message)
