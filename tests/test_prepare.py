"""The data pipeline (qlora_core.loop.prepare): the same examples as the row-by-row definition, in parallel too,
cached by everything that changes them, and never half-written."""

from __future__ import annotations

import json
import random

import pytest

from qlora_core import UsageError
from qlora_core.framework.config import CORE_OPTIONS, build_config
from qlora_core.loop import prepare as prep
from qlora_core.loop.data import load_rows, tokenize_example, tokenize_rows
from qlora_core.testing import write_jsonl
from plugins.formats import AlpacaFormat, ChatFormat, GuanacoFormat

WORDS = ("the hen wears a hat and the fox reads poems about rivers while seven small owls count stars "
         "é ü 漢字 🙂 tabs\tand  double  spaces").split(" ")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "guanaco":
            turns = "".join(f"### Human: {_sentence(rng, 1, 30)}### Assistant: {_sentence(rng, 0 if t else 1, 40)}"
                            for t in range(rng.randint(1, 3)))
            out.append({"text": turns})
        elif kind == "alpaca":
            row = {"instruction": _sentence(rng, 1, 30), "output": _sentence(rng, 0, 60)}
            if i % 3:
                row["input"] = _sentence(rng, 0, 10)
            out.append(row)
        else:
            messages = []
            if i % 4 == 0:
                messages.append({"role": "system", "content": _sentence(rng, 1, 8)})
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": _sentence(rng, 1, 25)},
                             {"role": "assistant", "content": _sentence(rng, 1, 40)}]
            out.append({"messages": messages})
    return out


FORMATS = {"guanaco": GuanacoFormat(), "alpaca": AlpacaFormat(), "chat": ChatFormat()}


def _config(**data):
    values = {"train": {"max_seq_length": data.pop("max_seq_length", 64)}, "data": data}
    return build_config(values, CORE_OPTIONS, [])


@pytest.mark.parametrize("kind", sorted(FORMATS))
@pytest.mark.parametrize("on_prompt", [False, True])
def test_same_examples_as_row_by_row(kind, on_prompt, tmp_path, smollm2_tokenizer, monkeypatch):
    """Every built-in format, the answer masks and the loss-on-prompt option: batched and in two processes,
    the examples (ids, labels, order, dropped rows) are exactly those of tokenizing one row at a time. A
    short max_seq_length makes some rows truncated and some dropped."""
    rows = load_rows(str(write_jsonl(tmp_path / f"{kind}.jsonl", _rows(kind, 300))), "train")
    cfg = _config(train_on_prompt=on_prompt, max_seq_length=48, cache=False)
    fmt = FORMATS[kind]
    _, expected = tokenize_rows(rows, fmt, smollm2_tokenizer, cfg, "training data")
    for procs in (1, 2):
        monkeypatch.setattr(prep, "ROWS_PER_PROCESS", 1)
        cfg = _config(train_on_prompt=on_prompt, max_seq_length=48, cache=False, num_proc=procs)
        got, report = prep.prepare_examples(rows, fmt, smollm2_tokenizer, cfg, "training data", {"t": kind})
        assert report.processes == procs
        assert len(got) == len(expected) == report.kept
        assert [x.input_ids for x in got] == [x.input_ids for x in expected]
        assert [x.labels for x in got] == [x.labels for x in expected]
        assert report.dropped == 300 - len(expected)
        assert report.tokens == sum(len(x.input_ids) for x in expected)
        assert report.answer_tokens == sum(x.num_target_tokens for x in expected)
        assert list(got.lengths) == [len(x.input_ids) for x in expected]
    # Kept rows longer than 48 tokens were cut, and the report counts them.
    truncated = 0
    for r in rows:
        f = fmt.format(r, smollm2_tokenizer)
        whole = smollm2_tokenizer(f.text, add_special_tokens=f.add_special_tokens)["input_ids"]
        kept = tokenize_example(f, smollm2_tokenizer, 48, on_prompt).num_target_tokens > 0
        truncated += kept and len(whole) > 48
    assert report.truncated == truncated > 0
    if not on_prompt and kind == "alpaca":
        assert report.dropped > 0  # rows whose answer starts after 48 tokens


def test_held_out_text_kept(tmp_path, smollm2_tokenizer):
    rows = load_rows(str(write_jsonl(tmp_path / "a.jsonl", _rows("alpaca", 40))), "train")
    cfg = _config(cache=False, max_seq_length=512)
    fmt = FORMATS["alpaca"]
    formatted, expected = tokenize_rows(rows, fmt, smollm2_tokenizer, cfg, "eval data")
    got, _ = prep.prepare_examples(rows, fmt, smollm2_tokenizer, cfg, "eval data", {}, keep_text=True)
    assert list(got.formatted()) == formatted
    assert got[-1] == expected[-1] and got[1:3] == expected[1:3]


def test_bad_row_named_from_a_worker(tmp_path, smollm2_tokenizer, monkeypatch):
    """A row that does not fit the format, in the second process's part, is named as the row-by-row path
    names it."""
    rows = _rows("alpaca", 200)
    rows[150]["output"] = None
    data = load_rows(str(write_jsonl(tmp_path / "a.jsonl", rows)), "train")
    cfg = _config(cache=False, num_proc=2)
    with pytest.raises(UsageError) as expected:
        tokenize_rows(data, FORMATS["alpaca"], smollm2_tokenizer, cfg, "training data")
    monkeypatch.setattr(prep, "ROWS_PER_PROCESS", 1)
    with pytest.raises(UsageError) as got:
        prep.prepare_examples(data, FORMATS["alpaca"], smollm2_tokenizer, cfg, "training data", {})
    assert str(got.value) == str(expected.value)
    assert "row 150" in str(got.value)


def test_cache_reused_and_keyed(tmp_path, smollm2_tokenizer, monkeypatch):
    monkeypatch.setenv("QLORA_DATA_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "g.jsonl", _rows("guanaco", 120))
    fmt = FORMATS["guanaco"]

    def prepared(cfg, fmt=fmt):
        rows = load_rows(str(path), "train")
        return prep.prepare_examples(rows, fmt, smollm2_tokenizer, cfg, "training data",
                                     prep.source_identity(str(path), rows))

    first, r1 = prepared(_config())
    assert not r1.cached and r1.path
    again, r2 = prepared(_config())
    assert r2.cached and r2.path == r1.path
    assert [x.labels for x in again] == [x.labels for x in first]
    # Anything that changes the examples makes a new entry: the length, the masking, the data's content,
    # the format's attributes.
    _, r3 = prepared(_config(max_seq_length=32))
    _, r4 = prepared(_config(train_on_prompt=True))
    rows = _rows("guanaco", 120)
    rows[7]["text"] = "### Human: changed### Assistant: new"
    write_jsonl(path, rows)
    changed, r5 = prepared(_config())
    other = GuanacoFormat()
    other.extra = "x"
    _, r6 = prepared(_config(), other)
    assert not any(r.cached for r in (r3, r4, r5, r6))
    assert len({r.path for r in (r1, r3, r4, r5, r6)}) == 5
    assert changed[7].input_ids != first[7].input_ids
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(entries) == 5
    manifest = json.loads((tmp_path / "cache" / entries[0] / "manifest.json").read_text())
    assert manifest["report"]["rows"] == 120


def test_interrupted_preparation_leaves_no_entry(tmp_path, smollm2_tokenizer, monkeypatch):
    monkeypatch.setenv("QLORA_DATA_CACHE", str(tmp_path / "cache"))
    rows = load_rows(str(write_jsonl(tmp_path / "g.jsonl", _rows("guanaco", 3000))), "train")
    calls = []
    real = prep.Encoder.__call__

    def interrupted(self, batch, indices):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch, indices)

    monkeypatch.setattr(prep.Encoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_examples(rows, FORMATS["guanaco"], smollm2_tokenizer, _config(), "training data", {})
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(prep.Encoder, "__call__", real)
    _, report = prep.prepare_examples(rows, FORMATS["guanaco"], smollm2_tokenizer, _config(), "training data", {})
    assert not report.cached and report.kept > 0


def test_no_answer_tokens_refused(tmp_path, smollm2_tokenizer):
    rows = load_rows(str(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x " * 200, "output": "y"}] * 3)),
                     "train")
    with pytest.raises(UsageError, match=r"no row has answer tokens within train.max_seq_length=16 \(3 dropped\)"):
        prep.prepare_examples(rows, FORMATS["alpaca"], smollm2_tokenizer, _config(max_seq_length=16, cache=False),
                              "training data", {})


def test_processes_of_one_machine_prepare_once(tmp_path, qlora_tiny_model_dir):
    """Two processes (as the ranks of a --nproc-per-node run) asking for the same data at once: one prepares,
    the other waits for it and reads the same cache entry."""
    import os
    import subprocess
    import sys

    import yaml

    data = write_jsonl(tmp_path / "g.jsonl", _rows("guanaco", 6000))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(qlora_tiny_model_dir)},
                                      "data": {"path": str(data), "num_proc": 1}}))
    env = dict(os.environ, QLORA_DATA_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "qlora_core", "prepare", str(config), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        reports.append(json.loads(out)["train"])
    assert sorted(r["cached"] for r in reports) == [False, True]
    assert reports[0]["path"] == reports[1]["path"]
    assert reports[0]["kept"] == reports[1]["kept"] > 0


def test_text_is_checked_once_per_content(tmp_path, qlora_tiny_model_dir, monkeypatch):
    """A run reads all of the data to check its text only for content no earlier run checked: the second run
    on the same file skips it, and a changed file is checked again."""
    from qlora_core import Job
    from qlora_core.loop import data as data_module

    monkeypatch.setenv("QLORA_DATA_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "g.jsonl", _rows("guanaco", 50))
    checks = []
    real = data_module._check_loaded
    monkeypatch.setattr(data_module, "_check_loaded",
                        lambda loaded, path, p, key, check_text=True: (checks.append(check_text),
                                                                        real(loaded, path, p, key, check_text)))
    config = {"model": {"name_or_path": str(qlora_tiny_model_dir)}, "data": {"path": str(path)}}
    for _ in range(2):
        Job(config).load_data()
    rows = _rows("guanaco", 50)
    rows[0]["text"] += " changed"
    write_jsonl(path, rows)
    Job(config).load_data()
    assert checks == [True, False, True]
