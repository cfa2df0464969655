"""The plugin manager: entry points, --plugin resolution, no:NAME, single-choice conflicts, bad plugins."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
import textwrap

import pytest

from qlora_core import cli
from qlora_core.framework.errors import ConfigError, PluginError
from qlora_core.framework.plugins import DEFAULT_PLUGINS, entry_points, select_plugins
from qlora_core import resolve

SGD_PLUGIN = """
import torch
from qlora_core import hookimpl

@hookimpl
def qlora_optimizer(params, config):
    return torch.optim.SGD(params, lr=config["train.learning_rate"])
"""


def write_plugin(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_every_default_is_a_registered_entry_point():
    eps = entry_points()
    assert set(DEFAULT_PLUGINS) <= set(eps)
    for name in DEFAULT_PLUGINS:
        assert eps[name].dist.name == "qlora"


def test_defaults_take_part_and_nothing_else():
    plugins = select_plugins([])
    assert plugins.names() == list(DEFAULT_PLUGINS)
    assert "adamw" not in plugins.names()


def test_requested_optimizer_replaces_the_default_one():
    plugins = select_plugins(["adamw"])
    assert "adamw" in plugins.names()
    assert "paged-adamw-8bit" not in plugins.names()
    assert plugins.implementers("qlora_optimizer") == ["adamw"]


def test_unpaged_8bit_adamw_is_an_optimizer_of_its_own():
    import torch

    plugins = select_plugins(["adamw-8bit"])
    assert plugins.implementers("qlora_optimizer") == ["adamw-8bit"]
    param = torch.nn.Parameter(torch.ones(4096))
    opt = plugins.hook.qlora_optimizer(params=[param], config={"train.learning_rate": 0.1, "train.weight_decay": 0.0})
    assert type(opt).__name__ == "AdamW8bit"
    param.grad = torch.ones(4096)
    opt.step()
    assert float(param.detach().max()) < 1.0  # it stepped


def test_no_prefix_turns_a_default_off():
    plugins = select_plugins([], blocked=["gradient-checkpointing"])
    assert "gradient-checkpointing" not in plugins.names()
    assert "nf4" in plugins.names()


def test_no_prefix_of_an_unknown_plugin_is_an_error():
    with pytest.raises(PluginError, match="no:gradient-checkpointin"):
        select_plugins([], blocked=["gradient-checkpointin"])


def test_two_requested_optimizers_conflict_naming_both():
    with pytest.raises(PluginError) as e:
        select_plugins(["adamw", "paged-adamw-32bit"])
    assert "'adamw'" in str(e.value) and "'paged-adamw-32bit'" in str(e.value) and "optimizer" in str(e.value)


def test_train_optim_selects_the_optimizer_plugin():
    cfg, plugins = resolve({"train": {"optim": "paged_adamw_32bit"}})
    assert plugins.implementers("qlora_optimizer") == ["paged-adamw-32bit"]
    assert cfg["train.optim"] == "paged_adamw_32bit"


def test_train_optim_against_another_requested_optimizer_is_a_conflict():
    with pytest.raises(PluginError, match=r"'adamw' \(from train.optim\)"):
        resolve({"train": {"optim": "adamw"}}, plugins=["paged-adamw-32bit"])


def test_unknown_train_optim_lists_installed_optimizers():
    with pytest.raises(ConfigError, match="train.optim: unknown optimizer 'sgd'.*paged_adamw_8bit"):
        resolve({"train": {"optim": "sgd"}})


def test_plugin_from_a_py_file_replaces_the_default_optimizer(tmp_path):
    path = write_plugin(tmp_path, "my_sgd", SGD_PLUGIN)
    plugins = select_plugins([str(path)])
    assert plugins.implementers("qlora_optimizer") == ["my_sgd"]


def test_plugin_from_a_dotted_module_path(tmp_path, monkeypatch):
    write_plugin(tmp_path, "dotted_sgd_plugin", SGD_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = select_plugins(["dotted_sgd_plugin"])
    assert plugins.implementers("qlora_optimizer") == ["dotted_sgd_plugin"]


def test_plugin_object_by_module_and_attribute():
    plugins = select_plugins(["qlora_plugins.optimizers:adamw"])
    assert plugins.implementers("qlora_optimizer") == ["qlora_plugins.optimizers:adamw"]


def test_config_plugins_list_is_requested_like_the_cli(tmp_path):
    path = write_plugin(tmp_path, "cfg_sgd", SGD_PLUGIN)
    cfg, plugins = resolve({"plugins": [str(path)]})
    assert plugins.implementers("qlora_optimizer") == ["cfg_sgd"]
    assert cfg.plugins == [str(path)]


def test_unknown_plugin_name_is_reported():
    with pytest.raises(PluginError, match="unknown plugin 'no-such-plugin'"):
        select_plugins(["no-such-plugin"])


def test_plugin_that_fails_to_import_is_reported_by_name(tmp_path):
    path = write_plugin(tmp_path, "broken", "import not_a_real_module_xyz\n")
    with pytest.raises(PluginError, match='cannot import plugin ".*broken.py": ModuleNotFoundError'):
        select_plugins([str(path)])


def test_plugin_with_an_unknown_hook_is_reported_by_name(tmp_path):
    path = write_plugin(tmp_path, "typo", """
        from qlora_core import hookimpl

        @hookimpl
        def qlora_on_stepend(run, metrics):
            pass
    """)
    with pytest.raises(PluginError, match="plugin 'typo' implements unknown hook qlora_on_stepend"):
        select_plugins([str(path)])


def test_plugin_with_wrong_hook_arguments_is_reported_by_name(tmp_path):
    path = write_plugin(tmp_path, "badargs", """
        from qlora_core import hookimpl

        @hookimpl
        def qlora_on_step_end(run, metrics, extra):
            pass
    """)
    with pytest.raises(PluginError, match="plugin 'badargs' cannot be registered"):
        select_plugins([str(path)])


def test_plugin_config_options_are_validated(tmp_path):
    path = write_plugin(tmp_path, "opts", """
        from qlora_core import hookimpl
        from qlora_core.framework.config import Option

        @hookimpl
        def qlora_config_options():
            return [Option("opts.level", "int", 3, "a level", minimum=1)]
    """)
    cfg, _ = resolve({"opts": {"level": 5}}, plugins=[str(path)])
    assert cfg["opts.level"] == 5
    with pytest.raises(ConfigError, match=r"opts.level: must be >= 1"):
        resolve({"opts": {"level": 0}}, plugins=[str(path)])
    # Without the plugin, its keys are unknown.
    with pytest.raises(ConfigError, match="opts.level: unknown key"):
        resolve({"opts": {"level": 5}})


def test_cli_plugins_json_lists_builtins_with_hooks(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["nf4"]["default"] is True
    assert rows["adamw"]["default"] is False
    assert "qlora_quantization_config" in rows["nf4"]["hooks"]
    assert rows["rich-progress"]["distribution"] == "qlora"
    assert rows["rich-progress"]["version"]


def test_cli_reports_plugin_errors_on_one_line_with_code_2(capsys):
    code = cli.main(["run", "--plugin", "adamw", "--plugin", "paged-adamw-32bit"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_train_optim_must_name_an_optimizer_plugin():
    with pytest.raises(ConfigError, match="train.optim: unknown optimizer 'nf4'"):
        resolve({"train": {"optim": "nf4"}})


HEAVY = '''
raise RuntimeError("importing this plugin runs its code")
from qlora_core import hookimpl

@hookimpl
def qlora_on_step_end(run, metrics):
    pass

def qlora_not_marked(run):
    pass

class Callback:
    @hookimpl(trylast=True)
    def qlora_on_log(self, run, metrics):
        pass

    @hookimpl
    def qlora_on_evaluate(self, run, metrics):
        pass

instance = Callback()
inherited = dict()

class Derived(Callback):
    pass
'''


def test_plugin_hooks_are_read_from_the_source_without_running_it(tmp_path, monkeypatch):
    from qlora_core.framework.plugins import static_hooks

    (tmp_path / "heavy_plugin.py").write_text(HEAVY)
    monkeypatch.syspath_prepend(str(tmp_path))
    hooks, path = static_hooks("heavy_plugin")
    assert hooks == ["qlora_on_step_end"] and path == str(tmp_path / "heavy_plugin.py")
    assert static_hooks("heavy_plugin:Callback")[0] == ["qlora_on_evaluate", "qlora_on_log"]
    assert static_hooks("heavy_plugin:instance")[0] == ["qlora_on_evaluate", "qlora_on_log"]
    # What the source cannot say is left to an import.
    assert static_hooks("heavy_plugin:inherited") is None
    assert static_hooks("heavy_plugin:Derived") is None
    assert static_hooks("no_such_module_anywhere") is None
    assert "heavy_plugin" not in sys.modules


def test_listing_from_the_source_agrees_with_importing_every_plugin():
    from qlora_core.framework.plugins import installed_plugins

    read, loaded = installed_plugins(), installed_plugins(load=True)
    assert [r["name"] for r in read] == [r["name"] for r in loaded]
    for a, b in zip(read, loaded):
        assert a["hooks"] == b["hooks"], a["name"]
        assert a["file"] == b["file"] and Path(a["file"]).is_file()
    assert not any(r["imported"] for r in read if r["distribution"] == "qlora")  # the built-ins: none imported


def test_trace_plugins_logs_every_hook_call_with_its_plugin_and_duration(tiny_config, tmp_path, monkeypatch,
                                                                         capsys):
    from qlora_core import Job

    monkeypatch.setenv("QLORA_TRACE_PLUGINS", "1")
    Job(dict(tiny_config, train={**tiny_config["train"], "max_steps": 2}), plugins=["adamw", "no:rich-progress"],
        output_dir=tmp_path / "run").run()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlora trace: ")]
    calls = [line.split()[2:4] for line in lines]
    assert ["qlora_optimizer", "adamw"] in calls and ["qlora_export", "adapter-export"] in calls
    assert calls.count(["qlora_quantization_config", "nf4"]) == 1
    assert all(re.fullmatch(r"qlora trace: qlora_\w+ [\w-]+ \d+\.\d\d ms (-> \S+|raised \w+)", line) for line in lines)
    optimizer = next(line for line in lines if " qlora_optimizer adamw " in line)
    assert optimizer.endswith("-> AdamW")


def test_trace_plugins_option_of_the_command_line_sets_the_variable(monkeypatch):
    from qlora_core import cli

    seen, before = {}, os.environ.get("QLORA_TRACE_PLUGINS")
    # setenv first records the variable's absence, so the values cli.main sets are undone after the test
    monkeypatch.setenv("QLORA_TRACE_PLUGINS", "")
    monkeypatch.setattr("qlora_core.cli.commands.plugins.main",
                        lambda args: seen.setdefault("value", os.environ.get("QLORA_TRACE_PLUGINS")) and 0)
    for argv in (["--trace-plugins", "plugins"], ["plugins", "--trace-plugins"]):
        seen.clear()
        monkeypatch.setenv("QLORA_TRACE_PLUGINS", "")
        cli.main(argv)
        assert seen["value"] == "1"
    monkeypatch.undo()
    assert os.environ.get("QLORA_TRACE_PLUGINS") == before  # nothing leaks into the tests that follow
