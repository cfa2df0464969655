"""Runs that survive their stops: SIGTERM and SIGINT checkpoint and exit 143 / 130, a finished run trains on with
a longer horizon, non-finite steps are skipped, and two runs never write into one folder. Real signals to real
``qlora run`` processes, on the tiny model."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from qlora_core import Job
from qlora_core.loop.checkpoint import checkpoint_dirs

QLORA = str(Path(sys.executable).parent / "qlora")

# Slows the steps down from QLORA_TEST_SLOW_FROM on and says which step is under way, so a signal can be sent in
# the middle of one.
PACER = """
import os, time
from pathlib import Path
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_begin(run, step):
    marker = os.environ.get("QLORA_TEST_MARKERS")
    if marker:
        Path(marker, f"step-{step}").write_text("")
        if step >= int(os.environ.get("QLORA_TEST_SLOW_FROM", "1")):
            time.sleep(float(os.environ.get("QLORA_TEST_STEP_SECONDS", "0.4")))
"""

# Poisons the gradients of the steps listed in the environment, as a diverging run or a bad batch would.
POISON = """
import os
from qlora_core import hookimpl

@hookimpl
def qlora_on_after_backward(run, model, optimizer):
    steps = {int(s) for s in os.environ.get("QLORA_TEST_NAN_STEPS", "").split(",") if s}
    if run.step + 1 in steps:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
"""


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture
def config(tiny_config, tmp_path) -> dict:
    for name, text in (("pacer.py", PACER), ("poison.py", POISON)):
        (tmp_path / name).write_text(text)
    cfg = copy.deepcopy(tiny_config)
    cfg["plugins"] = [str(tmp_path / "pacer.py"), str(tmp_path / "poison.py")]
    cfg["lora"]["lora_dropout"] = 0.1  # dropout draws random numbers: a resume must restore the RNGs
    cfg["train"].update(max_steps=8, logging_steps=1, save_steps=1000, per_device_train_batch_size=2,
                        gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(args: list[str], markers: Path, **env: str) -> subprocess.Popen:
    markers.mkdir(exist_ok=True)
    return subprocess.Popen([QLORA, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QLORA_TEST_MARKERS": str(markers), **env})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_step_finishes_the_step_checkpoints_and_the_resume_matches(config, tmp_path, signum, code):
    reference = tmp_path / "reference"
    Job(config, output_dir=reference).run()

    out, markers = tmp_path / "cut", tmp_path / "markers"
    proc = start([str(write_config(config, tmp_path / "c.yaml")), "--output", str(out)], markers)
    wait_for(markers / "step-3", proc)  # step 3 is under way (its pacer sleeps): the signal lands inside it
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    name = signal.Signals(signum).name
    assert f"interrupted by {name} after step 3 of 8" in err, err
    assert f"qlora run --resume {out}" in err and "Traceback" not in err
    assert [d.name for d in checkpoint_dirs(out)] == ["step-0000003"]
    assert status(out)["status"] == "interrupted" and not (out / "adapter").exists()
    assert not (markers / "step-4").exists()  # it stopped after the step, not later

    proc = subprocess.run([QLORA, "run", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert status(out)["status"] == "completed" and status(out)["resumed_from_step"] == 3
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step


def test_a_second_signal_stops_at_once_and_leaves_the_last_complete_checkpoint(config, tmp_path):
    config["train"]["save_steps"] = 1
    out, markers = tmp_path / "run", tmp_path / "markers"
    # Long steps: after the first signal the run would finish its step; the second one must not wait for that.
    proc = start([str(write_config(config, tmp_path / "c.yaml")), "--output", str(out)], markers,
                 QLORA_TEST_STEP_SECONDS="30", QLORA_TEST_SLOW_FROM="3")
    wait_for(markers / "step-3", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert time.monotonic() - started < 20  # not the rest of a 30-second step
    assert proc.returncode == -signal.SIGTERM  # the signal's own default action
    assert [d.name for d in checkpoint_dirs(out)] == ["step-0000001", "step-0000002"]
    assert load_file(str(checkpoint_dirs(out)[-1] / "adapter" / "adapter_model.safetensors"))


def test_sigterm_to_a_run_on_two_processes_checkpoints_says_so_once_and_the_resume_matches(config, tmp_path):
    """``qlora run --nproc-per-node 2``: the signal reaches the launcher, which passes it to both training
    processes; they finish the step together and write one checkpoint, the run says so in one message, and a
    resume on two processes logs the losses of one process with the same global batch."""
    config["lora"]["lora_dropout"] = 0.0  # the processes' dropout draws differ from one process's
    config["train"]["max_steps"] = 6
    single = copy.deepcopy(config)
    single["train"]["per_device_train_batch_size"] = 4
    reference = Job(single, plugins=["no:rich-progress"], output_dir=tmp_path / "reference").run().output_dir

    out, markers = tmp_path / "cut", tmp_path / "markers"
    proc = start([str(write_config(config, tmp_path / "c.yaml")), "--output", str(out), "--nproc-per-node", "2"],
                 markers, QLORA_TEST_SLOW_FROM="3")
    wait_for(markers / "step-3", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert err.count("interrupted by SIGTERM after step 3 of 6") == 1, err
    assert "Traceback" not in err and "ChildFailedError" not in err and "closing signal" not in err, err
    assert [d.name for d in checkpoint_dirs(out)] == ["step-0000003"]
    assert status(out)["status"] == "interrupted"

    proc = subprocess.run([QLORA, "run", "--resume", str(out), "--nproc-per-node", "2"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step


@pytest.mark.parametrize("length", ["steps", "epochs"])
def test_a_finished_run_trains_on_and_matches_the_longer_run(config, tmp_path, length):
    # 16 rows, batch 2: an epoch is 8 steps.
    if length == "steps":
        short, long_ = {"max_steps": 3}, {"max_steps": 7}
        more = ["--set", "train.max_steps=7"]
    else:
        short = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "epoch"}
        long_ = {"max_steps": -1, "num_train_epochs": 2, "save_strategy": "epoch"}
        more = ["--set", "train.num_train_epochs=2"]
    first, longer = copy.deepcopy(config), copy.deepcopy(config)
    first["train"].update(short)
    longer["train"].update(long_)
    reference = tmp_path / "reference"
    Job(longer, output_dir=reference).run()
    out = tmp_path / "run"
    Job(first, output_dir=out).run()
    done = max(losses(out))
    assert status(out)["status"] == "completed" and checkpoint_dirs(out)[-1].name == f"step-{done:07d}"

    proc = subprocess.run([QLORA, "run", "--resume", str(out), *more], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ref, got = losses(reference), losses(out)
    assert sorted(got) == sorted(ref) and max(got) > done
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
    assert status(out)["resumed_from_step"] == done

    # The same horizon again: nothing to train, said in one line.
    proc = subprocess.run([QLORA, "run", "--resume", str(out), *more], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already completed" in errors[0] and "raise train.max_steps" in errors[0]


def test_a_non_finite_step_is_skipped_and_counted(config, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    Job(config, output_dir=reference).run()
    monkeypatch.setenv("QLORA_TEST_NAN_STEPS", "3")
    out = tmp_path / "run"
    result = Job(config, output_dir=out).run()
    assert result.summary["nonfinite_steps"] == 1
    by_step = {r["step"]: r for r in rows(out) if "loss" in r}
    assert 3 not in by_step and sorted(by_step) == [1, 2, 4, 5, 6, 7, 8]  # a row is the average of finite steps
    # Steps before it are the reference's; the adapter never took the poisoned step.
    for step in (1, 2):
        assert by_step[step]["loss"] == pytest.approx(losses(reference)[step], rel=1e-6)
    assert by_step[4]["loss"] != pytest.approx(losses(reference)[4], rel=1e-9)  # one update fewer
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_step_and_the_last_good_checkpoint(config, tmp_path):
    config["train"]["save_steps"] = 2
    out = tmp_path / "run"
    proc = subprocess.run([QLORA, "run", str(write_config(config, tmp_path / "c.yaml")), "--output", str(out),
                           "--set", "train.max_nonfinite_steps=2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QLORA_TEST_NAN_STEPS": "5,6,7"})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "at step 6" in errors[0] and f"{out}/checkpoints/step-0000004" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and status(out)["status"] == "failed"
    assert not (out / "adapter").exists()
    for ckpt in checkpoint_dirs(out):
        weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_dead_runs_lock_taken_over(config, tmp_path):
    config["train"]["save_steps"] = 1
    cfg_file = write_config(config, tmp_path / "c.yaml")
    out, markers = tmp_path / "run", tmp_path / "markers"
    first = start([str(cfg_file), "--output", str(out)], markers, QLORA_TEST_STEP_SECONDS="30",
                  QLORA_TEST_SLOW_FROM="2")
    try:
        wait_for(markers / "step-2", first)
        for args in (["--resume", str(out)], [str(cfg_file), "--output", str(out), "--overwrite"]):
            proc = subprocess.run([QLORA, "run", *args], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2, proc.stderr
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "is in use by another run" in errors[0], proc.stderr
            assert f"pid {first.pid}" in errors[0]
        assert first.poll() is None and checkpoint_dirs(out)  # the live run and its folder are untouched
    finally:
        first.kill()  # SIGKILL: no chance to release the lock
        first.communicate()
    proc = subprocess.run([QLORA, "run", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"took over the lock of {out}" in proc.stdout + proc.stderr
    assert f"pid {first.pid}" in proc.stdout + proc.stderr
    assert status(out)["status"] == "completed"


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(config, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(real(path).total, real(path).used, 2**20))
    from qlora_core import UsageError

    with pytest.raises(UsageError, match=r"has 1.0 MiB free; this run's checkpoints need about"):
        Job(config, output_dir=tmp_path / "run").run()
    assert not checkpoint_dirs(tmp_path / "run")

