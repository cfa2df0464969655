"""Exporter: the trained LoRA adapter in PEFT's format, plus the tokenizer, under ``RUN_DIR/adapter``.

``PeftModel.from_pretrained(base_model, "RUN_DIR/adapter")`` loads it. The folder is written under a
temporary name and renamed when complete, so a crash never leaves an adapter that looks whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qlora_core import hookimpl
from qlora_core import save_adapter


@hookimpl
def qlora_export(run, model, tokenizer, output_dir: Path) -> Path:
    target = Path(output_dir) / "adapter"
    tmp = Path(output_dir) / ".adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if run.accelerator is not None:
        model = run.accelerator.unwrap_model(model)
    save_adapter(model, tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
