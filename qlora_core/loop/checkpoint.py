"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``RUN_DIR/checkpoints/step-NNNNNNN`` holding the adapter (PEFT format), the
optimizer, scheduler and random-number-generator states, the training position (``state.json``), and the
resolved config and plugin versions. It is written under a temporary name and renamed when complete, so a
crash while writing never leaves a folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlora_core.framework.config import Config
    from qlora_core.framework.plugins import PluginSet

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_WRAPPER_PREFIX = "_fsdp_wrapped_module."


def save_adapter(model: Any, folder: Path) -> None:
    """Write a PEFT model's adapter in PEFT's format (``PeftModel.from_pretrained`` loads it).

    Under FSDP (plugins/fsdp.py) the adapters are not sharded: every process holds them whole, so they are read
    from the parameters themselves. ``save_pretrained`` would call ``model.state_dict()``, a collective call under
    FSDP that every process must make and that gathers the sharded base model too; and PEFT's key selection does
    not expect the wrapper's module names.
    """
    names = [name for name, _ in model.named_parameters()]
    if not any(_WRAPPER_PREFIX in name for name in names):
        model.save_pretrained(folder, safe_serialization=True)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    weights = {name.replace(_WRAPPER_PREFIX, ""): t.contiguous().cpu()
               for name, t in get_peft_model_state_dict(model, state_dict=trainable).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config["default"]
    inference_mode = config.inference_mode
    config.inference_mode = True  # as save_pretrained writes it
    try:
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode


def save_checkpoint(run_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, train_state: dict,
                    config: "Config", plugins: "PluginSet", keep: int = -1) -> Path:
    """Write the checkpoint of ``step`` atomically; keep only the newest ``keep`` (-1: all)."""
    import torch

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(train_state, indent=2) + "\n")
    config.dump(tmp / "config.yaml")
    plugins.dump(tmp / "plugins.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_adapter_weights(path: Path, model: Any) -> None:
    """Load a checkpoint's adapter weights into the (not yet distributed) PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {path} has adapter weights this model lacks: {unexpected[:3]}")


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict, dict]:
    """Load adapter weights, optimizer and scheduler states into the given objects (``model=None``: the
    adapter weights were loaded already, with :func:`load_adapter_weights`).

    :returns: ``(train_state, rng_state)``; the caller restores the RNGs right before the next step.
    """
    import torch

    if model is not None:
        load_adapter_weights(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    return json.loads((path / "state.json").read_text()), rng
