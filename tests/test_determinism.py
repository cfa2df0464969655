"""``train.deterministic``: torch's deterministic algorithms for the training loop, and a clear stop when an
operation has none. (A CPU run repeats itself with or without the option; the GPU measurement is in
docs/performance.md.)"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.utils.deterministic
import yaml

from qlora_core import cli
from qlora_core.loop.determinism import CUBLAS_WORKSPACE
from qlora_core import Job

RECORDING_CALLBACK = """
import torch
import torch.utils.deterministic
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    with open(run.output_dir / "deterministic.txt", "a") as f:
        f.write(f"{torch.are_deterministic_algorithms_enabled()} "
                f"{torch.utils.deterministic.fill_uninitialized_memory}\\n")
"""

# max_unpool1d has no deterministic implementation (on the CPU as well): it stands for any such operation in
# a model or a plugin.
UNPOOLING_CALLBACK = """
import torch
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    if metrics["step"] == 2:
        torch.nn.functional.max_unpool1d(torch.ones(1, 1, 2), torch.tensor([[[0, 3]]]), 2)
"""


def _config(tiny_config, deterministic: bool) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["train"]["deterministic"] = deterministic
    return cfg


def test_the_loop_runs_with_deterministic_algorithms_and_restores_the_setting(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    plugin = tmp_path / "record.py"
    plugin.write_text(RECORDING_CALLBACK)
    before = torch.are_deterministic_algorithms_enabled()
    assert not before
    job = Job(_config(tiny_config, True), plugins=[str(plugin)], output_dir=tmp_path / "on")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE  # set before anything starts cuBLAS
    job.run()
    # Deterministic algorithms on; torch's filling of uninitialized memory off (nothing reads it, and it costs
    # speed). Both given back to the process afterwards.
    assert (tmp_path / "on" / "deterministic.txt").read_text().splitlines() == ["True False"] * 3
    assert torch.are_deterministic_algorithms_enabled() is False
    assert torch.utils.deterministic.fill_uninitialized_memory is True

    Job(_config(tiny_config, False), plugins=[str(plugin)], output_dir=tmp_path / "off").run()
    assert (tmp_path / "off" / "deterministic.txt").read_text().splitlines() == ["False True"] * 3


def test_a_workspace_setting_the_user_exported_is_kept(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    Job(_config(tiny_config, True), output_dir=tmp_path / "run")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_an_operation_without_a_deterministic_implementation_stops_the_run_in_one_line(tiny_config, tmp_path,
                                                                                      capsys):
    plugin = tmp_path / "unpool.py"
    plugin.write_text(UNPOOLING_CALLBACK)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_config, True)))
    out = tmp_path / "run"
    code = cli.main(["run", str(config), "--plugin", str(plugin), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "train.deterministic" in err and "max_unpooling" in err and "train.deterministic: false" in err
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed"
    assert not (out / "adapter").exists()
    assert torch.are_deterministic_algorithms_enabled() is False

    # The same operation is allowed without the option: the option is what stopped it.
    config.write_text(yaml.safe_dump(_config(tiny_config, False)))
    assert cli.main(["run", str(config), "--plugin", str(plugin), "--output", str(tmp_path / "off")]) == 0
