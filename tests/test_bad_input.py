"""Bad input, one case a row: a config, data, model, plugin or command line that cannot work.

Every case must end the same way: exit code 2, exactly one line on stderr, starting with ``error:``, that names
the culprit (the key, the file and line, the plugin and its hook, ...) and says how to fix it; no traceback; and
no output folder that looks like a finished run (an ``adapter/``, or a ``run.json`` saying ``completed``).

Cases that fail before a model is loaded run in this process through the command line's ``main`` (the same
code as the installed ``qlora``, much faster); the others, and those whose point is what reaches the terminal
(library log lines, retry messages), run the installed ``qlora`` in a subprocess on the tiny model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from qlora_core import cli
from qlora_core.testing import write_jsonl

QLORA = Path(sys.executable).parent / "qlora"

GUANACO = {"text": "### Human: What is the code of item 1?### Assistant: The code of item 1 is 7."}
ALPACA = {"instruction": "Say the code of item 2.", "output": "The code of item 2 is 4."}

# A plugin whose hook (the signature is filled in per case) has a bug on line 7.
RAISES_IN_HOOK = """\
from qlora_core import hookimpl


@hookimpl
def {signature}:
    helper = {{}}
    return helper["missing"]  # line 7: the plugin's bug
"""

USAGE_ERROR_PLUGIN = """\
from qlora_core import ConfigError, hookimpl


@hookimpl
def qlora_configure(config, device):
    raise ConfigError(["demo.budget: must be set for this plugin (--set demo.budget=N)"])
"""


class Workspace:
    """A case's folder: the files it writes, the tiny model's config, and the output folder a run would use."""

    def __init__(self, tmp: Path, config: dict, model_dir: Path):
        self.tmp = tmp
        self.model_dir = model_dir
        self.config = copy.deepcopy(config)
        self.config["train"].update(max_steps=1, save_strategy="no")
        self.config["plugins"] = ["no:rich-progress", "no:loss-plot"]
        self.out = tmp / "out"

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def folder(self, name: str, files: dict[str, str | bytes] | None = None) -> str:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for file_name, content in (files or {}).items():
            self.file(f"{name}/{file_name}", content)
        return str(path)

    def jsonl(self, name: str, rows: list[dict]) -> str:
        return str(write_jsonl(self.tmp / name, rows))

    def config_file(self, changes: dict | None = None, name: str = "config.yaml") -> str:
        data = copy.deepcopy(self.config)
        for key, value in (changes or {}).items():
            section, _, leaf = key.partition(".")
            data.setdefault(section, {})[leaf] = value
        return self.file(name, yaml.safe_dump(data))

    def run(self, *extra: str, **changes) -> list[str]:
        """``qlora run CONFIG --output OUT ...`` with the tiny config, its keys changed (``data__path=...``)."""
        config = self.config_file({k.replace("__", "."): v for k, v in changes.items()})
        return ["run", config, "--output", str(self.out), *extra]

    def with_data(self, name: str, content: str | bytes, *extra: str) -> list[str]:
        return self.run(*extra, data__path=self.file(name, content))

    def plugin(self, name: str, source: str) -> str:
        return self.file(f"{name}.py", source)

    def raising_plugin(self, name: str, signature: str) -> str:
        return self.plugin(name, RAISES_IN_HOOK.format(signature=signature))


@dataclass(frozen=True)
class Case:
    """One bad input.

    :ivar make: writes the bad input into the workspace and returns the command line (after ``qlora``).
    :ivar culprit: a regular expression the error line must match: what is wrong, and where.
    :ivar fix: a regular expression the error line must match: how to fix it.
    :ivar in_subprocess: run the installed ``qlora`` rather than ``cli.main`` in this process.
    :ivar check: more to assert about the workspace afterwards.
    :ivar known_gap: why the case does not pass yet (a strict xfail: it fails the suite once it passes).
    """

    id: str
    make: Callable[[Workspace], list[str]]
    culprit: str
    fix: str
    in_subprocess: bool = False
    check: Callable[[Workspace], None] | None = None
    known_gap: str | None = None


def _run_failed_with(error: str) -> Callable[[Workspace], None]:
    def check(w: Workspace) -> None:
        record = json.loads((w.out / "run.json").read_text())
        assert record["status"] == "failed" and record["error"] == error, record

    return check


def _resume_folder_with(w: Workspace, content: bytes) -> list[str]:
    run_dir = w.folder("old-run", {"config.yaml": content, "run.json": '{"status": "failed"}\n'})
    return ["run", "--resume", run_dir]


CASES = [
    # ------------------------------------------------------------------ config
    Case("config_missing", lambda w: ["run", str(w.tmp / "nope.yaml")],
         r"config file '.*nope\.yaml' not found", r"check the path"),
    Case("config_is_a_folder", lambda w: ["run", w.folder("configs")],
         r"config file '.*configs' is a folder", r"pass the path of a \.yaml file"),
    Case("config_yaml_syntax", lambda w: ["run", w.file("bad.yaml", "lora:\n  r: [1, 2\ntrain:\n  seed: 1\n")],
         r"bad\.yaml' is not valid YAML at line \d+, column \d+: .*flow sequence that starts at line 2, column 6",
         r"fix that line"),
    Case("config_tab_indent", lambda w: ["run", w.file("tabs.yaml", "lora:\n\tr: 8\n")],
         r"tabs\.yaml' is not valid YAML at line 2, column 1", r"indents with spaces, not tabs"),
    Case("config_is_a_list", lambda w: ["run", w.file("list.yaml", "- lora.r=8\n- train.seed=1\n")],
         r"list\.yaml' holds a list, not a mapping of keys", r"`key: value` lines"),
    Case("config_is_a_string", lambda w: ["run", w.file("word.yaml", "lora.r=8\n")],
         r"word\.yaml' holds a plain string, not a mapping", r"`key: value` lines"),
    Case("config_not_utf8", lambda w: ["run", w.file("latin1.yaml", "lora:\n  r: 8\n# caf\xe9\n".encode("latin-1"))],
         r"latin1\.yaml' is not UTF-8 text: byte 0xe9 at line 3 \(byte offset 18\)", r"save the file as UTF-8"),
    Case("config_duplicate_key", lambda w: ["run", w.file("twice.yaml", "lora:\n  r: 8\n  lora_alpha: 16\n  r: 64\n")],
         r"twice\.yaml' gives the key 'r' in section lora twice, at line 2 and line 4", r"keep one of them"),
    Case("config_unknown_key", lambda w: w.run("--set", "lora.rank=8"),
         r"lora\.rank: unknown key", r"did you mean lora\.r\?"),
    Case("config_wrong_type", lambda w: w.run(train__max_steps="many"),
         r"train\.max_steps: must be an integer \(got 'many'\)", r"must be an integer"),
    Case("config_not_a_choice", lambda w: w.run("--set", "train.lr_scheduler_type=wavy"),
         r"train\.lr_scheduler_type: must be one of", r"linear, cosine, constant"),
    Case("config_out_of_range", lambda w: w.run("--set", "lora.lora_dropout=1.5"),
         r"lora\.lora_dropout", r"must be < 1 \(got 1\.5\)"),
    Case("config_section_as_value", lambda w: ["run", w.file("flat.yaml", "lora: 8\n")],
         r"lora: must be a section of keys", r"section of keys, not a value"),
    Case("config_null_value", lambda w: w.run("--set", "lora.r=null"),
         r"lora\.r: must not be null", r"must not be null"),
    Case("config_set_without_value", lambda w: w.run("--set", "lora.r"),
         r"--set 'lora\.r'", r"expected KEY=VALUE, e\.g\. --set lora\.r=32"),
    Case("config_set_below_a_value", lambda w: w.run("--set", "lora.r.max=8"),
         r"lora\.r\.max: lora\.r is a value", r"not a section"),
    Case("config_plugins_not_a_list", lambda w: ["run", w.file("plugins.yaml", "plugins: 3\n")],
         r"plugins: must be a list of plugin names \(got 3\)", r"list of plugin names"),
    Case("config_unknown_optimizer", lambda w: w.run("--set", "train.optim=sgd"),
         r"train\.optim: unknown optimizer 'sgd'", r"installed: .*adamw"),
    Case("config_of_resumed_run_not_utf8", lambda w: _resume_folder_with(w, b"lora:\n  r: \xff\n"),
         r"old-run/config\.yaml' is not UTF-8 text: byte 0xff at line 2", r"save the file as UTF-8"),
    # ------------------------------------------------------------------ data
    Case("data_empty_file", lambda w: w.with_data("empty.jsonl", ""),
         r"data\.path: .*empty\.jsonl is empty", r"put the examples in it \(one JSON object a line\)"),
    Case("data_only_blank_lines", lambda w: w.with_data("blank.jsonl", "\n  \n\n"),
         r"data\.path: .*blank\.jsonl is empty", r"put the examples in it"),
    Case("data_invalid_json_line", lambda w: w.with_data(
            "train.jsonl", json.dumps(GUANACO) + "\n" + json.dumps(GUANACO) + '\n{"text": "a" "b"}\n'),
         r"data\.path: .*train\.jsonl line 3 is not valid JSON \(Expecting ',' delimiter: column 14\)",
         r"fix that line, or point data\.path at another file"),
    Case("data_invalid_json_document", lambda w: w.with_data(
            "rows.json", '[\n  {"text": "### Human: a### Assistant: b"},\n  {"text": "c"\n  {"text": "d"}\n]\n'),
         r"data\.path: .*rows\.json line 4 is not valid JSON \(Expecting ',' delimiter", r"fix that line"),
    Case("data_json_lines_in_a_json_file", lambda w: w.with_data(
            "lines.json", json.dumps(GUANACO) + '\n{"text": "a",}\n'),
         r"lines\.json line 2 is not valid JSON \(Expecting property name enclosed in double quotes: column 14\)",
         r"fix that line"),
    Case("data_json_list_item_not_an_object", lambda w: w.with_data("items.json", json.dumps([GUANACO, 5])),
         r"items\.json item 1 of its list is a number, not an object of fields", r"make every item an object"),
    Case("data_line_not_an_object", lambda w: w.with_data("list.jsonl", json.dumps(GUANACO) + "\n[1, 2]\n"),
         r"list\.jsonl line 2 is a list, not an object of fields", r"make every line one JSON object"),
    Case("data_field_changes_type", lambda w: w.with_data(
            "types.jsonl", json.dumps(GUANACO) + "\n" + json.dumps({"text": {"human": "a"}}) + "\n"),
         r"training data row 1 does not fit format 'guanaco': ValueError: field 'text' must be a string, got dict",
         r"fix the row"),
    Case("data_not_utf8", lambda w: w.with_data(
            "latin1.jsonl", (json.dumps(GUANACO) + "\n").encode() + b'{"text": "### Human: caf\xe9### Assistant: b"}\n'),
         r"data\.path: .*latin1\.jsonl line 2 is not UTF-8 text \(byte 0xe9 at byte offset \d+\)",
         r"save the file as UTF-8"),
    Case("data_csv_not_utf8", lambda w: w.with_data(
            "latin1.csv", b"text\n\"### Human: caf\xe9### Assistant: b\"\n"),
         r"data\.path: .*latin1\.csv line 2 is not UTF-8 text", r"save the file as UTF-8"),
    Case("data_rows_mix_formats", lambda w: w.run(data__path=w.jsonl("mixed.jsonl", [GUANACO, ALPACA, ALPACA])),
         r"training data rows mix formats: row 0 has text but no instruction, output", r"file of its own"),
    Case("data_row_without_value", lambda w: w.run(data__path=w.jsonl(
            "holes.jsonl", [ALPACA, {"instruction": "Say the code of item 3.", "output": None}])),
         r"training data row 1 has no value for output", r"fill it in or drop the row"),
    Case("data_unknown_file_type", lambda w: w.with_data("train.txt", json.dumps(GUANACO) + "\n"),
         r"data file '.*train\.txt' \(data\.path\) has an unknown type", r"use \.json, \.jsonl, \.csv or \.parquet"),
    Case("data_empty_csv", lambda w: w.with_data("empty.csv", ""),
         r"data\.path: .*empty\.csv is empty", r"a header line, then one row a line"),
    Case("data_csv_header_only", lambda w: w.with_data("header.csv", "text\n"),
         r"data\.path: dataset '.*header\.csv' has no rows", r"put the examples in it"),
    Case("data_not_parquet", lambda w: w.with_data("rows.parquet", json.dumps(GUANACO) + "\n"),
         r"data\.path: could not load dataset '.*rows\.parquet': Parquet magic bytes not found",
         r"check that it holds a parquet table"),
    Case("data_empty_folder", lambda w: w.run(data__path=w.folder("data")),
         r"data\.path: folder '.*data' holds no \.json, \.jsonl, \.csv or \.parquet file",
         r"put the data files in it"),
    Case("data_fields_fit_no_format", lambda w: w.with_data("qa.csv", "prompt,response\nhi,hello\n"),
         r"dataset fields prompt, response fit no known format", r"rename the fields"),
    Case("data_unknown_format_name", lambda w: w.run(data__format="sharegpt2"),
         r"data\.format 'sharegpt2' is not a known format", r"set data\.format to one of them"),
    Case("data_format_needs_other_fields", lambda w: w.run(data__format="alpaca"),
         r"format 'alpaca' needs instruction, output \(missing: instruction, output\)", r"rename the fields"),
    Case("data_eval_path_missing", lambda w: w.run(data__eval_path=str(w.tmp / "held-out.jsonl")),
         r"data path '.*held-out\.jsonl' does not exist \(data\.eval_path\)", r"check the path"),
    Case("data_split_missing", lambda w: w.run(data__split="validation"),
         r"has no split 'validation'; it has: train", r"set data\.split"),
    Case("data_eval_split_missing", lambda w: w.run(data__eval_split="test"),
         r"has no split 'test'", r"set data\.eval_split"),
    Case("data_eval_fraction_of_one_row", lambda w: w.run(
            data__path=w.jsonl("one.jsonl", [GUANACO]), data__eval_fraction=0.5),
         r"data\.eval_fraction needs at least 2 training rows \('.*one\.jsonl' has 1\)",
         r"add rows, or set data\.eval_fraction=0"),
    Case("data_no_answer_within_max_length", lambda w: w.run(train__max_seq_length=4),
         r"no row has answer tokens within train\.max_seq_length=4", r"raise train\.max_seq_length"),
    Case("data_hub_id_offline", lambda w: w.run(data__path="nobody-here/no-such-dataset"),
         r"data\.path: 'nobody-here/no-such-dataset' is no local file or folder, and the hub dataset",
         r"check the name"),
    Case("data_invalid_json_line_on_the_terminal", lambda w: w.with_data(
            "train.jsonl", json.dumps(GUANACO) + '\n{"text": "a",}\n'),
         r"train\.jsonl line 2 is not valid JSON", r"fix that line", in_subprocess=True),
    Case("data_not_utf8_on_the_terminal", lambda w: w.with_data(
            "train.jsonl", b'{"text": "### Human: \xff### Assistant: b"}\n'),
         r"train\.jsonl line 1 is not UTF-8 text \(byte 0xff at byte offset 21\)", r"save the file as UTF-8",
         in_subprocess=True),
    # ------------------------------------------------------------------ model
    Case("model_unknown_embedded_name", lambda w: w.run(model__name_or_path="embedded:nothing"),
         r"unknown embedded model embedded:nothing", r"known: embedded:smollm2-135m-instruct"),
    Case("model_hub_id_offline", lambda w: w.run(model__name_or_path="nobody-here/no-such-model"),
         r"model 'nobody-here/no-such-model'", r"check model\.name_or_path"),
    Case("model_config_json_invalid", lambda w: w.run(model__name_or_path=w.folder(
            "model", {"config.json": '{"model_type": "llama",\n'})),
         r"config\.json' is not a valid JSON file", r"check model\.name_or_path"),
    Case("model_without_weights", lambda w: w.run(model__name_or_path=w.folder("model", {
            name: (w.model_dir / name).read_bytes() for name in os.listdir(w.model_dir)
            if not name.endswith(".safetensors")})),
         r"could not load model '.*model': .*no file named model\.safetensors", r"check model\.name_or_path",
         in_subprocess=True),
    Case("model_folder_missing", lambda w: w.run(model__name_or_path=str(w.tmp / "no-model")),
         r"model folder '.*no-model' does not exist", r"check model\.name_or_path"),
    Case("model_weights_damaged", lambda w: w.run(model__name_or_path=w.folder("model", {
            name: b"not safetensors" if name.endswith(".safetensors") else (w.model_dir / name).read_bytes()
            for name in os.listdir(w.model_dir)})),
         r"could not load model '.*model': .*header", r"check model\.name_or_path", in_subprocess=True),
    Case("plan_model_folder_missing", lambda w: ["plan", "--model", str(w.tmp / "no-model")],
         r"model folder '.*no-model' does not exist", r"check --model / model\.name_or_path"),
    Case("plan_model_without_config_json", lambda w: ["plan", "--model", w.folder("weights-only")],
         r"model folder '.*weights-only' has no config\.json", r"check --model"),
    # ------------------------------------------------------------------ plugins
    Case("plugin_unknown", lambda w: w.run("--plugin", "no-such-plugin"),
         r"unknown plugin 'no-such-plugin'", r"installed: .*nf4"),
    Case("plugin_file_missing", lambda w: w.run("--plugin", str(w.tmp / "gone.py")),
         r"plugin file '.*gone\.py' not found", r"check the path"),
    Case("plugin_syntax_error", lambda w: w.run("--plugin", w.plugin("typo", "def hook(:\n    pass\n")),
         r'cannot import plugin ".*typo\.py": SyntaxError: .*typo\.py, line 1', r"fix the plugin, or run without it"),
    Case("plugin_import_fails", lambda w: w.run("--plugin", w.plugin("needy", "import no_such_module_here\n")),
         r'cannot import plugin ".*needy\.py": ModuleNotFoundError', r"install what it imports, or run without it"),
    Case("plugin_unknown_hook", lambda w: w.run("--plugin", w.plugin(
            "misnamed", "from qlora_core import hookimpl\n\n@hookimpl\ndef qlora_on_stp_end(run, metrics):\n    pass\n")),
         r"plugin 'misnamed' implements unknown hook qlora_on_stp_end", r"check the name against qlora_core\.hookspecs"),
    Case("plugin_raises_in_config_options", lambda w: w.run("--plugin", w.raising_plugin(
            "options", "qlora_config_options()")),
         r"plugin 'options' failed in qlora_config_options \(options\.py line 7\): KeyError: 'missing'",
         r"a bug in the plugin: fix or report it, or run without it"),
    Case("plugin_raises_in_configure", lambda w: w.run("--plugin", w.raising_plugin(
            "setup_bug", "qlora_configure(config, device)")),
         r"plugin 'setup_bug' failed in qlora_configure \(setup_bug\.py line 7\): KeyError: 'missing'",
         r"fix or report it, or run without it"),
    Case("plugin_raises_in_dataset_formats", lambda w: w.run("--plugin", w.raising_plugin(
            "formats_bug", "qlora_dataset_formats(config)")),
         r"plugin 'formats_bug' failed in qlora_dataset_formats \(formats_bug\.py line 7\)",
         r"fix or report it, or run without it"),
    Case("plugin_raises_during_training", lambda w: w.run("--plugin", w.raising_plugin(
            "step_bug", "qlora_on_step_end(run, metrics)")),
         r"plugin 'step_bug' failed in qlora_on_step_end \(step_bug\.py line 7\): KeyError: 'missing'",
         r"fix or report it, or run without it", in_subprocess=True, check=_run_failed_with("KeyError: 'missing'")),
    Case("plugin_reports_a_user_mistake", lambda w: w.run("--plugin", w.plugin("strict", USAGE_ERROR_PLUGIN)),
         r"invalid config: demo\.budget: must be set for this plugin", r"--set demo\.budget=N"),
    Case("plugin_requested_and_turned_off", lambda w: w.run("--plugin", "adamw", "--plugin", "no:adamw"),
         r"plugin 'adamw' is both requested and turned off \(no:adamw\)", r"keep one"),
    Case("plugin_turned_off_unknown", lambda w: w.run("--plugin", "no:no-such-plugin"),
         r"--plugin no:no-such-plugin: no plugin named 'no-such-plugin' is installed", r"see qlora plugins"),
    Case("plugin_module_attribute_missing", lambda w: w.run("--plugin", "qlora_plugins.formats:nothing"),
         r"module qlora_plugins\.formats has no attribute 'nothing'", r"check the name after the colon"),
    # ------------------------------------------------------------------ command line
    Case("output_is_a_file", lambda w: ["run", w.config_file(), "--output", w.file("taken", "a file\n")],
         r"output '.*taken' is a file, not a folder", r"choose another --output"),
    Case("output_inside_a_file", lambda w: ["run", w.config_file(), "--output",
                                            str(Path(w.file("taken", "a file\n")) / "run")],
         r"output folder '.*taken/run'", r"choose another --output"),
    Case("resume_a_folder_that_is_not_a_run", lambda w: ["run", "--resume", w.folder("notes", {"a.txt": "x"})],
         r"'.*notes' is not a qlora run folder \(no config\.yaml\)", r"pass the folder `qlora run --output` wrote"),
    Case("resume_a_file", lambda w: ["run", "--resume", w.file("run.json", "{}\n")],
         r"'.*run\.json' is not a qlora run folder", r"pass the folder"),
    Case("resume_with_output", lambda w: ["run", "--resume", w.folder("r"), "--output", str(w.out)],
         r"--resume writes into the run folder it continues", r"drop --output"),
    Case("resume_with_config", lambda w: ["run", w.config_file(), "--resume", w.folder("r")],
         r"--resume continues a run with its own config\.yaml and plugins", r"give no CONFIG or --plugin"),
    Case("unknown_command", lambda w: ["trian"],
         r"invalid choice: 'trian'", r"see qlora --help"),
    Case("unknown_option", lambda w: w.run("--learning-rate", "1e-4"),
         r"unrecognized arguments: --learning-rate", r"see qlora --help"),
    Case("eval_a_folder_that_is_not_a_run", lambda w: ["eval", w.folder("plain")],
         r"'.*plain' is not a qlora run folder", r"pass the folder `qlora run --output` wrote"),
    Case("eval_zero_samples", lambda w: ["eval", w.folder("plain"), "--max-samples", "0"],
         r"--max-samples must be a positive number", r"or -1 for all \(got 0\)"),
    Case("generate_top_p_out_of_range", lambda w: ["generate", w.folder("plain"), "--prompt", "hi", "--top-p", "2"],
         r"--top-p must be in \(0, 1\]", r"\(got 2\)"),
    Case("merge_a_folder_that_is_not_a_run", lambda w: ["merge", w.folder("plain"), "--output", str(w.out)],
         r"'.*plain' is not a qlora run folder", r"pass the folder"),
    Case("plan_zero_gpus", lambda w: ["plan", "--gpus", "0"],
         r"argument --gpus: must be at least 1 \(got 0\)", r"see qlora plan --help"),
    Case("nproc_per_node_zero", lambda w: w.run("--nproc-per-node", "0"),
         r"--nproc-per-node must be at least 1 \(got 0\)", r"at least 1"),
]


def _in_process(argv: list[str], capfd) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _in_subprocess(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run([str(QLORA), *argv], cwd=cwd, env=_subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code: int, out: str, err: str, culprit: str, fix: str) -> str:
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert code == 2, f"exit code {code}: {line}"
    assert re.search(culprit, line), f"the line does not name the culprit ({culprit!r}):\n{line}"
    assert re.search(fix, line), f"the line does not say how to fix it ({fix!r}):\n{line}"
    return line


def assert_not_a_finished_run(folder: Path) -> None:
    if not folder.exists():
        return
    assert not (folder / "adapter").exists(), f"{folder} has an adapter"
    record = folder / "run.json"
    if record.is_file():
        assert json.loads(record.read_text())["status"] != "completed"


def test_the_table_has_forty_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len([c for c in CASES if not c.known_gap]) >= 40


def _params() -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known_gap)] if c.known_gap
                         else []) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_error_line_with_exit_code_2(case, qlora_tiny_config, qlora_tiny_model_dir, tmp_path,
                                                      monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # a run that went ahead would write runs/<timestamp> here
    w = Workspace(tmp_path, qlora_tiny_config, qlora_tiny_model_dir)
    argv = case.make(w)
    capfd.readouterr()
    if case.in_subprocess:
        code, out, err = _in_subprocess(argv, tmp_path)
    else:
        code, out, err = _in_process(argv, capfd)
    assert_one_line_error(code, out, err, case.culprit, case.fix)
    assert_not_a_finished_run(w.out)
    assert not (tmp_path / "runs").exists()
    if case.check is not None:
        case.check(w)


def test_plan_of_an_unreachable_hub_model_prints_one_line(tmp_path):
    """Without network, huggingface_hub would retry each request five times, logging every try: the hub is
    found unreachable first (one connection tried), the process goes offline, and the plan's error is the only
    line that reaches the terminal. (The hub is a closed local port.)"""
    script = ("from qlora_core.cli import main\n"
              "raise SystemExit(main(['plan', '--model', 'nobody-here/no-such-model']))\n")
    env = _subprocess_env()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, r"model 'nobody-here/no-such-model'",
                          r"check --model")
    assert "127.0.0.1:9 cannot be reached from here, so only models and datasets in the local cache load" \
        in done.stderr  # it did try the hub, and says it could not connect
