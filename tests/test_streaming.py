"""data.streaming: rows read, formatted and tokenized as training goes, from a file or a generator-backed
dataset, packing included; resumption sees the same examples."""

from __future__ import annotations

import copy
import json

import pytest

from qlora_core import Job, UsageError
from qlora_core.loop import job as job_module
from qlora_core.loop.data import load_rows, tokenize_rows
from qlora_core.testing import write_jsonl
from tests.conftest import INTERRUPTER, assert_same_losses


def _guanaco(i: int) -> dict:
    return {"text": f"### Human: what is {i} plus {i}?### Assistant: {i} plus {i} is {2 * i}."}


@pytest.fixture
def stream_config(qlora_tiny_config, tmp_path):
    cfg = copy.deepcopy(qlora_tiny_config)
    cfg["data"] = {"path": str(write_jsonl(tmp_path / "rows.jsonl", [_guanaco(i) for i in range(30)])),
                   "streaming": True, "shuffle_buffer": 8}
    cfg["train"].update(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    return cfg


def test_stream_gives_the_row_by_row_examples_pass_after_pass(stream_config, smollm2_tokenizer):
    cfg = copy.deepcopy(stream_config)
    cfg["data"]["shuffle_buffer"] = 0  # in the file's order
    job = Job(cfg)
    job.load_data()
    stream = job.train_examples
    rows = load_rows(cfg["data"]["path"], "train")
    _, expected = tokenize_rows(rows, job.format, job.tokenizer, job.config, "training data")
    assert len(stream) == 0  # not known before a pass is read
    got = stream.take(0, 45)  # one pass and a half
    assert got[:30] == expected and got[30:] == expected[:15]
    assert len(stream) == 30 and stream.passes_done(45) == 1
    assert stream.take(10, 5) == expected[10:15]  # read again from the start: a resumption


def test_shuffled_stream_is_the_same_for_the_same_seed_and_differs_by_pass(stream_config):
    a, b = Job(stream_config), Job(stream_config)
    a.load_data()
    b.load_data()
    first = a.train_examples.take(0, 60)
    assert first == b.train_examples.take(0, 60)
    assert first[:30] != first[30:]  # each pass shuffled anew
    assert sorted(x.input_ids for x in first[:30]) == sorted(x.input_ids for x in first[30:])


def test_generator_backed_stream_trains_packed_and_resumes_exactly(stream_config, tmp_path, monkeypatch):
    """A dataset that exists only as a generator (nothing on disk, no length): training reads only what its steps
    need, packs it, and a run stopped at step 3 resumes to the same losses as the uninterrupted run."""
    import datasets

    produced = []

    def rows():
        for i in range(10_000):
            produced.append(i)
            yield _guanaco(i)

    def stream_splits(path, split, streaming=False, key="data.path"):
        assert streaming
        return {"train": datasets.IterableDataset.from_generator(rows)}

    monkeypatch.setattr(job_module, "load_rows", stream_splits)
    plugin = tmp_path / "interrupter.py"
    plugin.write_text(INTERRUPTER)
    cfg = copy.deepcopy(stream_config)
    cfg["plugins"] = [str(plugin)]
    cfg["train"].update(packing=True, save_steps=2)
    full = tmp_path / "full"
    Job(cfg, output_dir=full).run()
    # 6 steps of 4 examples, plus the shuffle buffer and a batch read ahead: far from the 10,000 rows.
    assert len(produced) < 3000
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]

    cut = tmp_path / "cut"
    monkeypatch.setenv("QLORA_TEST_INTERRUPT_AT", "3")
    with pytest.raises(KeyboardInterrupt):
        Job(cfg, output_dir=cut).run()
    monkeypatch.delenv("QLORA_TEST_INTERRUPT_AT")
    Job(resume=cut).run()
    assert_same_losses(full, cut)


def test_streaming_needs_max_steps_and_no_eval_fraction(stream_config):
    cfg = copy.deepcopy(stream_config)
    cfg["train"]["max_steps"] = -1
    with pytest.raises(UsageError, match="set train.max_steps"):
        Job(cfg).load_data()
    cfg = copy.deepcopy(stream_config)
    cfg["data"]["eval_fraction"] = 0.1
    with pytest.raises(UsageError, match="data.eval_fraction needs every row"):
        Job(cfg).load_data()


def test_streamed_eval_split_is_its_first_rows(stream_config, tmp_path):
    cfg = copy.deepcopy(stream_config)
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [_guanaco(i) for i in range(30)])
    write_jsonl(folder / "test.jsonl", [_guanaco(100 + i) for i in range(20)])
    cfg["data"].update(path=str(folder), max_eval_samples=5)
    job = Job(cfg)
    job.load_data()
    assert job.eval_split == "test" and len(job.eval_examples) == 5
    assert "100 plus 100" in job.eval_formatted[0].text
