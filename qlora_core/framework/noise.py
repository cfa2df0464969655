"""Quiet the messages of dependencies that say nothing a qlora user can act on (the command line and the bench's
worker processes call it once)."""

from __future__ import annotations

import os


def quiet_third_party_noise() -> None:
    """Silence messages from dependencies that say nothing actionable to a qlora user."""
    import logging
    import warnings

    # bitsandbytes on CPU: "Failed to load CPU gemm_4bit_forward from kernels-community" (a hub download
    # it cannot make offline; its built-in kernel is used instead).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers' bitsandbytes loading asks the kernels library for a hub kernel; offline it says it skips the
    # publisher check ("Skipping publisher trust check for 'kernels-community/...'"), on every 4-bit load.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # PEFT imports torchao wherever it is installed (qlora-torchao brings it), in every run: torchao says it
    # cannot load its CUDA/CPU extension .so files (its pure-Python paths serve), and torch's pytree says its
    # enums are now supported natively.
    logging.getLogger("torchao").setLevel(logging.ERROR)

    class _NotEnumNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "is an Enum subclass and is now natively supported" not in record.getMessage()

    logging.getLogger("torch.utils._pytree").addFilter(_NotEnumNotice())
    # PEFT still calls the name transformers 5.2x deprecated.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*deprecated", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
