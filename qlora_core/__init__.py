"""qlora: QLoRA fine-tuning through plugins.

Plugins mark their hook implementations with :data:`hookimpl`::

    from qlora_core import hookimpl

    @hookimpl
    def qlora_on_step_end(run, metrics):
        ...
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("qlora")

__all__ = ["__version__", "hookimpl"]
