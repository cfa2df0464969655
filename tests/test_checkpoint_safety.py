"""Checkpoints that cannot run code and that are checked before use, on the tiny model.

A module-wide pair of runs (one uninterrupted, one interrupted in step 4, checkpoints every step) is copied
into each test, which damages or replaces files of the copy and resumes it: through ``Job`` where the continued
losses are compared with the uninterrupted run's, through the CLI where the exit code and the one error line
are what is tested, and in a subprocess with a file-size limit where a write must fail for real. And a model's
own code runs only when the config says so, named when it does.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from qlora_core import Job, cli
from qlora_core.loop.checkpoint import (MANIFEST, checkpoint_dirs, load_checkpoint, rng_from_json, rng_state,
                                        rng_to_json, set_aside, set_rng_state, verify_checkpoint,
                                        write_manifest)
from qlora_core.testing import TINY_ROWS, write_jsonl
from conftest import INTERRUPTER, assert_same_losses

NOTICES = """
from qlora_core import hookimpl

SEEN = []

@hookimpl
def qlora_on_notice(run, message):
    SEEN.append(message)
"""


class Payload:
    """A pickle that creates ``marker`` when it is loaded with pickle's full power."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"echo ran > '{self.marker}'",)


@pytest.fixture(scope="module")
def runs(qlora_tiny_model_dir, tmp_path_factory):
    """``(full, cut)``: a 5-step run, and the same run interrupted in step 4 (checkpoints 1, 2 and 3)."""
    base = tmp_path_factory.mktemp("ckpt-safety")
    (base / "interrupter.py").write_text(INTERRUPTER)
    (base / "notices.py").write_text(NOTICES)
    cfg = {
        "model": {"name_or_path": str(qlora_tiny_model_dir)},
        "data": {"path": str(write_jsonl(base / "train.jsonl", TINY_ROWS))},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},  # dropout: resume must restore the RNGs
        "train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 5,
                  "save_steps": 1, "warmup_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
                  "max_seq_length": 64, "sample_max_new_tokens": 0, "max_grad_norm": 1.0},
        "plugins": [str(base / "interrupter.py"), str(base / "notices.py"), "no:rich-progress"],
    }
    full, cut = base / "full", base / "cut"
    Job(copy.deepcopy(cfg), output_dir=full).run()
    os.environ["QLORA_TEST_INTERRUPT_AT"] = "4"  # raised before step 4 is saved
    try:
        with pytest.raises(KeyboardInterrupt):
            Job(copy.deepcopy(cfg), output_dir=cut).run()
    finally:
        del os.environ["QLORA_TEST_INTERRUPT_AT"]
    assert [d.name for d in checkpoint_dirs(cut)] == ["step-0000001", "step-0000002", "step-0000003"]
    return full, cut


@pytest.fixture
def run_copy(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[1], out)
    return out


def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:07d}"


def resume_with_notices(run_dir):
    job = Job(resume=run_dir)
    job.run()
    return job.plugins.pm.get_plugin("notices").SEEN


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --------------------------------------------------------------------------- what a checkpoint holds


def test_rng_state_round_trips_exactly_through_json():
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # a cached second Gaussian in Python's generator
    np.random.standard_normal()  # and in numpy's
    saved = json.loads(json.dumps(rng_to_json(rng_state())))

    def draws():
        return ([random.random(), random.gauss(0, 1)], np.random.standard_normal(3).tolist(),
                torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())

    first = draws()
    draws()  # moves every generator on
    set_rng_state(rng_from_json(saved))
    assert draws() == first


def test_a_checkpoint_holds_only_plain_files_listed_in_its_manifest(runs):
    path = ckpt(runs[0], 2)
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest) == on_disk
    assert {"adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.json", "state.json"} <= on_disk
    assert not (path / "rng.pt").exists()
    for name, entry in manifest.items():
        assert entry["size"] == (path / name).stat().st_size
    # The default optimizer (bitsandbytes' 8-bit AdamW) and the scheduler need nothing beyond weights_only's types.
    for name in ("optimizer.pt", "scheduler.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path / name)) == []
    assert verify_checkpoint(path) is None


# --------------------------------------------------------------------------- damaged checkpoints


def test_a_torn_optimizer_file_falls_back_to_the_previous_checkpoint(runs, run_copy):
    optimizer = ckpt(run_copy, 3) / "optimizer.pt"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size // 2)
    seen = resume_with_notices(run_copy)
    assert json.loads((run_copy / "run.json").read_text())["resumed_from_step"] == 2
    refused = [m for m in seen if "was not used" in m]
    assert refused == [f"checkpoint {ckpt(run_copy, 3)} was not used: optimizer.pt has {size // 2} bytes where its "
                       f"manifest.json says {size}; resuming from step-0000002 instead"]
    # Set aside, not deleted, and not taken for a checkpoint again.
    assert (run_copy / "checkpoints" / ".step-0000003.refused" / "optimizer.pt").stat().st_size == size // 2
    assert_same_losses(runs[0], run_copy)


def test_a_checkpoint_set_aside_twice_for_one_step_keeps_both(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for n in (1, 2, 3):
        (ckpts / "step-0000003").mkdir(parents=True)
        (ckpts / "step-0000003" / "optimizer.pt").write_text(f"torn {n}")
        set_aside(ckpts / "step-0000003")
    assert sorted(p.name for p in ckpts.iterdir()) == [
        ".step-0000003.refused", ".step-0000003.refused-2", ".step-0000003.refused-3"]
    assert (ckpts / ".step-0000003.refused-3" / "optimizer.pt").read_text() == "torn 3"
    assert checkpoint_dirs(tmp_path) == []


def test_an_edited_adapter_byte_falls_back_to_the_previous_checkpoint(runs, run_copy):
    adapter = ckpt(run_copy, 3) / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-3] ^= 0x01  # one bit of the last weight: the file still parses
    adapter.write_bytes(bytes(data))
    seen = resume_with_notices(run_copy)
    assert json.loads((run_copy / "run.json").read_text())["resumed_from_step"] == 2
    assert [m for m in seen if "was not used" in m] == [
        f"checkpoint {ckpt(run_copy, 3)} was not used: adapter/adapter_model.safetensors differs from its "
        f"manifest.json (same size, another SHA-256); resuming from step-0000002 instead"]
    assert_same_losses(runs[0], run_copy)


def test_no_intact_checkpoint_is_a_one_line_error(run_copy, capsys):
    (ckpt(run_copy, 3) / "state.json").unlink()
    (ckpt(run_copy, 2) / "scheduler.pt").write_bytes(b"")
    (ckpt(run_copy, 1) / MANIFEST).write_text("{not json")
    before = (run_copy / "run.json").read_text()
    assert cli.main(["run", "--resume", str(run_copy)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: run folder {str(run_copy)!r} has no intact checkpoint to resume from (")
    for text in ("step-0000003: state.json is missing", "step-0000002: scheduler.pt has 0 bytes where",
                 "step-0000001: manifest.json is unreadable"):
        assert text in line
    assert (run_copy / "run.json").read_text() == before  # nothing started


def test_a_checkpoint_of_an_earlier_release_resumes_the_same(runs, run_copy):
    """No manifest, and the RNG states in ``rng.pt`` as torch.save wrote them (numpy's state an ndarray)."""
    path = ckpt(run_copy, 3)
    state = rng_from_json(json.loads((path / "rng.json").read_text()))
    assert isinstance(state["numpy"][1], np.ndarray)
    torch.save(state, path / "rng.pt")
    (path / "rng.json").unlink()
    (path / MANIFEST).unlink()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path / "rng.pt"))  # needs the numpy rebuilders
    seen = resume_with_notices(run_copy)
    assert not [m for m in seen if "was not used" in m]
    assert json.loads((run_copy / "run.json").read_text())["resumed_from_step"] == 3
    assert_same_losses(runs[0], run_copy)


# --------------------------------------------------------------------------- state files that would run code


def test_the_payload_runs_when_loaded_with_pickle(tmp_path):
    """The control for the tests below: loaded the way checkpoints were, the payload does run."""
    marker = tmp_path / "ran"
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, tmp_path / "optimizer.pt")
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert marker.read_text() == "ran\n"


@pytest.mark.parametrize("name, how, manifest", [
    ("optimizer.pt", "torch.save", "removed"),      # a checkpoint as an earlier release wrote it
    ("optimizer.pt", "torch.save", "rewritten"),    # whoever replaced the file rewrote the manifest too
    ("scheduler.pt", "pickle protocol 4", "rewritten"),  # not a torch zip file
    ("rng.pt", "torch.save", "removed"),            # the earlier releases' RNG file, numpy allowed in it
])
def test_a_state_file_that_would_run_code_is_refused_and_runs_nothing(run_copy, tmp_path, capsys, name, how,
                                                                       manifest):
    marker = tmp_path / "ran"
    path = ckpt(run_copy, 3)
    obj = {"state": {}, "param_groups": [], "x": Payload(marker)}
    if how == "torch.save":
        torch.save(obj, path / name)
    else:
        (path / name).write_bytes(pickle.dumps(obj, protocol=4))
    if name == "rng.pt":
        (path / "rng.json").unlink()
    if manifest == "removed":
        (path / MANIFEST).unlink()
    else:
        write_manifest(path)
    assert verify_checkpoint(path) is None  # the manifest does not stop it: loading does
    assert cli.main(["run", "--resume", str(run_copy)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: checkpoint {path}: {name} is not a plain tensor file (it would run code when loaded); "
                    f"it was not loaded — delete that checkpoint or resume from another")
    assert not marker.exists()


def test_load_checkpoint_refuses_before_changing_the_optimizer(runs, tmp_path):
    path = tmp_path / "step-0000003"
    shutil.copytree(ckpt(runs[1], 3), path)
    torch.save({"x": Payload(tmp_path / "ran")}, path / "scheduler.pt")
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    before = copy.deepcopy(optimizer.state_dict())
    from qlora_core import UsageError

    with pytest.raises(UsageError, match="scheduler.pt is not a plain tensor file"):
        load_checkpoint(path, None, optimizer, scheduler)
    assert optimizer.state_dict() == before
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------- a write the disk refuses


def _file_size_limit(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_checkpoint_the_disk_refuses_leaves_the_previous_one_intact(run_copy):
    shutil.rmtree(ckpt(run_copy, 3))  # resume from step 2; the next checkpoint is step 3's
    previous = ckpt(run_copy, 2)
    adapter = (previous / "adapter" / "adapter_model.safetensors").stat().st_size
    optimizer = (previous / "optimizer.pt").stat().st_size
    # The adapter (float32) is the larger file, the default optimizer's 8-bit moments the smaller: the limit lets
    # the smaller one and every file outside the checkpoints be written, and the adapter's write fail.
    assert adapter > 1.3 * optimizer
    limit = (adapter + optimizer) // 2
    assert max(p.stat().st_size for p in run_copy.rglob("*")
               if p.is_file() and p.name != "adapter_model.safetensors") < limit
    proc = subprocess.run([sys.executable, "-c", "from qlora_core.cli import entry; entry()",
                           "run", "--resume", str(run_copy)],
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(limit))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert line == (f"error: could not write checkpoint step-0000003 in {run_copy / 'checkpoints'}: File too large; "
                    f"the previous checkpoint step-0000002 is intact — free space and resume with qlora run "
                    f"--resume {run_copy}")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert (previous / MANIFEST).is_file() and verify_checkpoint(previous) is None
    assert json.loads((run_copy / "run.json").read_text())["status"] == "failed"


SAVE_UNDER_A_LIMIT = """
import json, sys
from pathlib import Path
import torch
from qlora_core import UsageError
from qlora_core.loop.checkpoint import save_checkpoint

class Model:  # writes a small adapter, as PEFT's save_pretrained would
    def named_parameters(self):
        return []
    def save_pretrained(self, folder, safe_serialization):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"small")

class State:
    def __init__(self, state):
        self.state = state
    def state_dict(self):
        return self.state
    def dump(self, path):
        Path(path).write_text("{}")

run = Path(sys.argv[1])
small, big = State({"lr": 1.0}), State({"state": {0: {"m": torch.zeros(50_000)}}, "param_groups": []})
save_checkpoint(run, 1, Model(), small, small, {"step": 1}, small, small)
try:
    save_checkpoint(run, 2, Model(), big, small, {"step": 2}, small, small)
except UsageError as e:
    print(json.dumps({"error": str(e), "cause": type(e.__cause__).__name__}))
"""


def test_an_optimizer_state_the_disk_refuses_is_reported_as_the_os_error(tmp_path):
    """torch.save reports a failed write as a RuntimeError; the checkpoint's error names the OS error."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_LIMIT, str(run)], capture_output=True, text=True,
                          timeout=120, preexec_fn=_file_size_limit(100_000))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["cause"] == "OSError"
    assert report["error"] == (f"could not write checkpoint step-0000002 in {run / 'checkpoints'}: File too large; "
                               f"the previous checkpoint step-0000001 is intact — free space and resume with qlora "
                               f"run --resume {run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001"]
    assert verify_checkpoint(run / "checkpoints" / "step-0000001") is None


def _optimizer(kind, params):
    if kind == "torch-adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    if kind.startswith("bnb-"):
        import bitsandbytes as bnb

        return getattr(bnb.optim, kind.removeprefix("bnb-"))(params, lr=1e-2)
    if kind == "schedulefree":
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(params, lr=1e-2, warmup_steps=0)
        optimizer.train()
        return optimizer
    from lion_pytorch import Lion

    return Lion(params, lr=1e-3)


@pytest.mark.parametrize("kind", ["torch-adamw", "bnb-AdamW8bit", "bnb-PagedAdamW8bit", "bnb-PagedAdamW32bit",
                                  "schedulefree", "lion"])
def test_the_optimizers_states_round_trip_as_plain_tensor_files(kind, tmp_path):
    """The built-in optimizers' and the contrib ones' states hold only what weights_only loads, and load back
    into an optimizer that then steps exactly as the saved one."""
    from transformers import get_scheduler

    from qlora_core.loop.checkpoint import _load_plain, _save_plain

    torch.manual_seed(0)
    shapes = [(8, 64), (64, 8), (5000,)]  # bitsandbytes keeps 8-bit moments from 4096 elements on
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    first, second = _optimizer(kind, a), _optimizer(kind, b)
    schedule = get_scheduler("cosine", first, num_warmup_steps=1, num_training_steps=10)
    for g in grads[:2]:
        for p, gp in zip(a, g):
            p.grad = gp.clone()
        first.step()
        schedule.step()
    _save_plain(first.state_dict(), tmp_path / "optimizer.pt", "optimizer")
    _save_plain(schedule.state_dict(), tmp_path / "scheduler.pt", "scheduler")
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    schedule_b = get_scheduler("cosine", second, num_warmup_steps=1, num_training_steps=10)  # as a resume does
    second.load_state_dict(_load_plain(tmp_path, "optimizer.pt"))
    schedule_b.load_state_dict(_load_plain(tmp_path, "scheduler.pt"))
    for g in grads[2:]:
        for opt, params, sched in ((first, a, schedule), (second, b, schedule_b)):
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
            sched.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_an_optimizer_state_that_needs_code_is_refused_when_saved(tmp_path):
    from qlora_core import UsageError
    from qlora_core.loop.checkpoint import _save_plain

    with pytest.raises(UsageError, match=r"the optimizer state holds collections\.deque, which a checkpoint cannot "
                                         r"hold: loading it would run code"):
        _save_plain({"state": {0: {"history": __import__("collections").deque([1.0])}}}, tmp_path / "o.pt",
                    "optimizer")


def test_remote_code_stays_off_unless_set_and_then_the_model_is_named(tiny_config, capsys):
    from qlora_core.loop import model as model_module

    job = Job(tiny_config)
    assert job.config["model.trust_remote_code"] is False
    job.load_tokenizer()
    assert "trust_remote_code" not in capsys.readouterr().err
    model_module._REMOTE_CODE_WARNED.clear()
    Job(tiny_config, overrides=["model.trust_remote_code=true"]).load_tokenizer()
    err = capsys.readouterr().err
    assert err.count("warning: model.trust_remote_code is true") == 1
    assert repr(tiny_config["model"]["name_or_path"]) in err
