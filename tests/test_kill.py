"""SIGKILL at random moments, twenty times in one run, checkpoints written every step: the run folder always holds
complete checkpoints only, and the run resumed after the last kill ends with the uninterrupted run's losses.

Each segment of the run is a process forked by a multiprocessing forkserver that has the libraries imported (so a
segment starts in about a second), killed with SIGKILL at a random moment: while loading, stepping, or writing a
checkpoint. Not forked from the test process itself: that one has threads (pytest-xdist's, and what the reference
run started), and a child forked while one of them held a lock can wait on it forever.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import time

import pytest
from safetensors.torch import load_file

from qlora_core import Job
from qlora_core.loop.checkpoint import CHECKPOINTS, checkpoint_dirs

KILLS = 20


_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "transformers", "peft", "bitsandbytes", "datasets",
                                            "qlora_core", "qlora_plugins.nf4", "qlora_plugins.fused_lora"])
    return _FORKSERVER


def _train(config: dict, out, resume: bool) -> None:
    """A segment: train until killed (or done); exit code 1, and the traceback kept, if it raises."""
    code = 0
    try:
        if resume:
            Job(resume=out).run()
        else:
            Job(config, output_dir=out, overwrite=True).run()
    except BaseException:
        import traceback

        with open(errors_file(out), "a") as f:  # for the parent's assertion message
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)


def segment(config: dict, out, resume: bool):
    """Start one segment of the run; returns its process (a ``multiprocessing`` process of the forkserver)."""
    proc = _forkserver().Process(target=_train, args=(config, out, resume))
    proc.start()
    return proc


def errors_file(out):
    return out.parent / f"{out.name}.segment-errors.txt"


def segment_errors(out) -> str:
    """What the segments that raised wrote (their tracebacks), for an assertion's message."""
    path = errors_file(out)
    return path.read_text() if path.is_file() else "(no segment raised)"


def resumable(out, fresh: bool) -> bool:
    """Whether the next segment resumes: not after a segment that finished, nor when the last kill came after
    the run had completed (between its record and its exit), nor before its first checkpoint."""
    if fresh or not checkpoint_dirs(out):
        return False
    try:
        return json.loads((out / "run.json").read_text())["status"] != "completed"
    except (OSError, ValueError, KeyError):
        return True


def assert_complete(out) -> None:
    """Every folder that looks like a checkpoint is whole: its state, adapter, optimizer and scheduler read back."""
    import torch

    for ckpt in checkpoint_dirs(out):
        state = json.loads((ckpt / "state.json").read_text())
        assert state["step"] == int(ckpt.name.split("-")[1])
        assert load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt"):
            if (ckpt / name).exists():
                torch.load(ckpt / name, weights_only=True)


def test_twenty_random_kills_leave_only_complete_checkpoints_and_the_resume_is_exact(tiny_config, tmp_path):
    config = copy.deepcopy(tiny_config)
    config["lora"]["lora_dropout"] = 0.1
    config["train"].update(max_steps=60, save_steps=1, save_total_limit=2, logging_steps=1,
                           per_device_train_batch_size=2, gradient_accumulation_steps=1)
    reference = tmp_path / "reference"
    Job(config, output_dir=reference).run()
    expected = {r["step"]: r["loss"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().split("\n")[:-1])
                if "loss" in r}

    out = tmp_path / "run"
    rng = random.Random(1234)
    kills = partial_seen = 0
    fresh = True
    while kills < KILLS:
        proc = segment(config, out, resume=resumable(out, fresh))
        time.sleep(rng.uniform(0.3, 2.5))
        if not proc.is_alive():  # it reached the end before the kill: start over, so every kill lands in a live run
            proc.join()
            assert proc.exitcode == 0, segment_errors(out)
            fresh = True
            continue
        fresh = False
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills += 1
        root = out / CHECKPOINTS
        partial_seen += bool(root.is_dir() and any(p.name.endswith(".partial") for p in root.iterdir()))
        assert_complete(out)
    proc = segment(config, out, resume=resumable(out, fresh))
    proc.join(timeout=600)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert proc.exitcode == 0, segment_errors(out)
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    got = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().split("\n")[:-1])
           if "loss" in r}
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step
    print(f"{kills} kills, {partial_seen} of them while a checkpoint was being written")
