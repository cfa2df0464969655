"""``qlora bench`` on the CPU with a tiny Llama shape: the seed recipe and qlora's trainer side by side, each
in its own process, on the same data; named and custom variants; a failing variant reported beside the others;
bad arguments as one ``error:`` line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_core.cli import main as cli_main
from qlora_core.framework.errors import PluginError, UsageError
from qlora_core.tools.bench import ablations, compare, make_sequences, named_variants, parse_variant

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "rope_theta": 10000.0, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02}


def qlora(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_core", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def ragged_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "config.json").write_text(json.dumps(TINY))
    # The trainer announces its decoder layers on a GPU only; on the CPU this plugin does it for the test.
    (tmp / "announce.py").write_text("from qlora_core import hookimpl\n\n@hookimpl\ndef qlora_on_train_start(run):\n"
                                     "    run.notice('decoder layers: 2 of 2 recomputed, said a plugin')\n")
    temp = tmp / "temp"  # the bench's and its workers' temporary folders
    temp.mkdir()
    done = qlora("bench", "--shape", str(tmp / "config.json"), "--seq", "48", "--min-len", "8", "--batch", "4",
                 "--steps", "3", "--warmup", "1", "--learning-rate", "3e-3", "--variant", "seed", "--variant", "seed-trainer", "--variant", "qlora",
                 "--variant", "qlora+packing", "--variant", "broken=lora.r=-1",
                 "--variant", f"announced=plugin:{tmp / 'announce.py'}", "--out", str(tmp / "r.json"),
                 "--profile", str(tmp / "profile"), cwd=tmp, TMPDIR=str(temp))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(temp.glob("qlora-bench-*"))  # every variant's run folder removed (torch's caches may stay)
    return json.loads((tmp / "r.json").read_text()), done.stdout, tmp / "profile"


def test_seed_and_qlora_train_the_same_maths_on_the_same_data(ragged_report):
    report, table, _ = ragged_report
    by = {r["variant"]: r for r in report["results"]}
    seed, trainer, ours, packed = by["seed"], by["seed-trainer"], by["qlora"], by["qlora+packing"]
    for r in (seed, trainer, ours, packed):
        assert "error" not in r, r
        assert len(r["losses"]) == 4 and r["tokens_per_second"] > 0 and r["median_step_seconds"] > 0
    # float32 on the CPU: the guide's code, qlora's loop and qlora's packed loop give the same losses
    assert ours["loss_max_abs_diff_vs_seed"] < 1e-4
    assert trainer["loss_max_abs_diff_vs_seed"] < 1e-4  # transformers' Trainer, the same examples in order
    assert packed["loss_max_abs_diff_vs_seed"] < 1e-4
    assert ours["speedup_vs_seed"] == pytest.approx(ours["tokens_per_second"] / seed["tokens_per_second"])
    # each variant beside qlora: its gain over the defaults (a lever's, in an ablation)
    assert packed["speedup_vs_qlora"] == pytest.approx(packed["tokens_per_second"] / ours["tokens_per_second"])
    assert trainer["speedup_vs_qlora"] == pytest.approx(trainer["tokens_per_second"] / ours["tokens_per_second"])
    assert "speedup_vs_qlora" not in ours and "speedup_vs_qlora" not in seed
    # ragged lengths: padding costs the padded path, not the packed one
    # (packing's is the filler that evens its rows)
    assert 0 < ours["padding_waste"] < 1 and 0 <= packed["padding_waste"] < ours["padding_waste"]
    assert "qlora bench" in table and "qlora+packing" in table and "x qlora" in table


def test_a_failing_variant_is_reported_beside_the_others(ragged_report):
    report, table, _ = ragged_report
    broken = next(r for r in report["results"] if r["variant"] == "broken")
    assert broken["error"].startswith("exit code") and any("lora.r" in line for line in broken["log_tail"])
    assert "broken" in table
    assert report["settings"]["min_len"] == 8 and report["versions"]["torch"]
    assert report["settings"]["learning_rate"] == 3e-3 and "lr 0.003" in table


def test_the_layers_are_reported_as_the_run_announces_them(ragged_report):
    report, table, _ = ragged_report
    by = {r["variant"]: r for r in report["results"]}
    assert by["announced"]["layers"] == "2 of 2 recomputed, said a plugin"
    assert "announced: 2 of 2 recomputed, said a plugin" in table
    assert by["qlora"]["layers"] is None  # on the CPU the trainer announces none


def test_profile_summarises_the_kernels_and_keeps_the_trace(ragged_report):
    _, _, folder = ragged_report
    for name in ("seed", "qlora", "qlora+packing"):
        summary = (folder / f"profile-{name}.txt").read_text()
        assert summary.startswith("two steps: ") and "ms of wall time" in summary and "Name" in summary
        with gzip.open(folder / f"profile-{name}.trace.json.gz") as f:
            events = json.load(f)["traceEvents"]
        assert any("linear" in str(e.get("name", "")).lower() or "mm" in str(e.get("name", "")) for e in events)


def test_each_lever_is_compared_with_the_defaults_and_the_seed():
    """The ratios a report carries: to the seed (tokens/s, memory, loss curve) and, for a lever changed, to
    qlora's defaults (tokens/s ratio, GiB more or less); a failed variant gets none."""
    results = [{"variant": "seed", "tokens_per_second": 100.0, "peak_allocated_gib": 20.0, "losses": [3.0, 2.0]},
               {"variant": "qlora", "tokens_per_second": 200.0, "peak_allocated_gib": 8.0, "losses": [3.0, 2.5]},
               {"variant": "qlora-offload", "tokens_per_second": 210.0, "peak_allocated_gib": 9.5,
                "losses": [3.0, 2.0]},
               {"variant": "broken", "error": "exit code 1"}]
    compare(results)
    seed, ours, lever, broken = results
    assert ours["speedup_vs_seed"] == 2.0 and ours["memory_vs_seed"] == 0.4
    assert ours["loss_max_abs_diff_vs_seed"] == 0.5
    assert lever["speedup_vs_qlora"] == pytest.approx(1.05) and lever["memory_vs_qlora_gib"] == pytest.approx(1.5)
    assert "speedup_vs_qlora" not in seed and "speedup_vs_qlora" not in ours and set(broken) == {"variant", "error"}


def test_the_variants_come_from_the_core_and_every_installed_plugin():
    known = named_variants()
    assert list(known)[:3] == ["seed", "seed-trainer", "qlora"]  # the recipes with their own code, then qlora's
    assert callable(known["seed"]["run"])  # the guide-recipe plugin's code
    assert known["qlora-liger"]["plugins"] == ["no:liger-kernels"]  # offered by the liger-kernels plugin
    assert known["qlora+adamw-8bit"]["plugins"] == ["adamw-8bit"]  # by the adamw-8bit plugin itself
    order = ablations(known)
    assert order[:3] == ["seed", "seed-trainer", "qlora"]
    assert {"qlora-offload", "qlora+fp32-upcast", "qlora-fused-loss"} <= set(order) <= set(known)
    assert "qlora+packing" not in order and "qlora+torch-adamw" not in order  # not marked as ablations


def _installed(monkeypatch, plugins):
    """Installed plugins as ``qlora bench`` finds them: ``{name: object, or an exception its import raises}``."""
    import types

    import qlora_core.framework.plugins as framework

    def load(obj):
        if isinstance(obj, Exception):
            raise obj
        return obj

    eps = {name: types.SimpleNamespace(load=lambda obj=obj: load(obj)) for name, obj in plugins.items()}
    monkeypatch.setattr(framework, "entry_points", lambda: eps)


def _offering(**offered):
    from qlora_core import hookimpl

    class Plugin:
        @hookimpl
        def qlora_bench_variants(self):
            return offered

    return Plugin()


def test_a_variant_offered_twice_is_an_error_naming_both_plugins(monkeypatch):
    twice = {"help": "x", "set": ["lora.r=8"]}
    _installed(monkeypatch, {"one": _offering(mine=twice), "two": _offering(mine=twice),
                             "broken": ImportError("no module named nothing")})
    with pytest.raises(PluginError, match="'mine' is offered by both 'one' and 'two'"):
        named_variants()


def test_a_plugin_that_fails_to_import_offers_nothing(monkeypatch):
    _installed(monkeypatch, {"broken": ImportError("no module named nothing"),
                             "mine": _offering(**{"qlora+mine": {"help": "mine", "set": ["lora.r=8"],
                                                                 "ablation": True}})})
    assert list(named_variants()) == ["qlora", "qlora+mine"]
    assert ablations() == ["qlora", "qlora+mine"]


def test_bench_help_lists_the_plugins_variants(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("seed-trainer", "qlora-liger", "qlora-offload", "qlora+adamw-8bit"):
        assert name in out


def test_variants_by_name_and_by_overrides():
    name, spec = parse_variant("mine=train.compile=false,plugin:no:gradient-checkpointing,lora.r=8")
    assert name == "mine"
    assert spec["set"] == ["train.compile=false", "lora.r=8"]
    assert spec["plugins"] == ["no:gradient-checkpointing"]
    with pytest.raises(UsageError, match="unknown bench variant"):
        parse_variant("qlora-fastest")
    with pytest.raises(UsageError, match="neither KEY=VALUE nor plugin:NAME"):
        parse_variant("x=compile")


def test_bench_data_is_learnable_and_ragged_on_request():
    dense = make_sequences(3, 40, 50_000, seed=1)
    assert all(len(s) == 40 and max(s) < 1024 for s in dense)
    assert dense[0][:16] == dense[0][16:32]  # a repeated motif: the loss can fall within a few steps
    ragged = make_sequences(50, 40, 50_000, seed=1, min_len=5)
    assert min(map(len, ragged)) >= 5 and max(map(len, ragged)) <= 40 and len(set(map(len, ragged))) > 5
    assert make_sequences(3, 40, 50_000, seed=1) == dense  # deterministic


@pytest.mark.parametrize("args, named", [(["--variant", "nope"], "unknown bench variant"),
                                         (["--shape", "llama9-1t"], "unknown shape"),
                                         (["--min-len", "0"], "--min-len"),
                                         (["--steps", "0"], "--steps"),
                                         (["--learning-rate", "0"], "--learning-rate")])
def test_bad_arguments_are_one_error_line(tmp_path, args, named):
    done = qlora("bench", *args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]


def test_named_shapes_are_the_real_architectures():
    from qlora_core.tools.plan import plan
    from qlora_core.tools.shapes import SHAPES, write_config_folder

    counts = {}
    for name in ("llama3-8b", "llama3-70b", "llama3-1b"):
        folder = write_config_folder(SHAPES[name], Path(__import__("tempfile").mkdtemp()) / name)
        counts[name] = plan(folder, {}).n_params
    assert counts["llama3-8b"] == 8_030_261_248  # Meta-Llama-3-8B
    assert counts["llama3-70b"] == 70_553_706_496  # Meta-Llama-3-70B
    assert counts["llama3-1b"] == 1_235_814_400  # Llama-3.2-1B (tied embeddings)


def test_without_a_gpu_a_shape_too_big_for_the_cpu_is_refused_up_front(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    started = __import__("time").monotonic()
    done = qlora("bench", "--shape", "llama3-8b", cwd=tmp_path)
    assert done.returncode == 2 and __import__("time").monotonic() - started < 60
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU here: the llama3-8b shape (8.0B parameters)" in lines[0]
    assert "--shape smollm2-135m" in lines[0]
