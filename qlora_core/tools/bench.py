"""``qlora bench``: the seed recipe and qlora's trainer, side by side, on the same shape, data and settings.

One invocation measures every variant asked for, each in a fresh process (so one variant's memory, compiled
code and allocator state cannot flatter or burden the next): the model of a real architecture's shape
(:mod:`qlora_core.tools.shapes`) is built with random weights straight into 4 bits by the ``random-weights``
plugin (no checkpoint, no download), then measured in a variant:

* ``qlora``: ``qlora run``'s own path (:class:`qlora_core.loop.job.Job`, its plugins and loop) with its defaults,
  the core's one variant;
* the variants the installed plugins offer through ``qlora_bench_variants`` (:func:`named_variants`): ``qlora``
  with one lever changed, each from the plugin that owns the lever (``--ablations`` runs those marked
  ``ablation``), and variants with their own code, such as the ``guide-recipe`` plugin's ``seed`` (the QLoRA
  guide's code as written, in a plain loop) and ``seed-trainer`` (the same through transformers' ``Trainer``);
* any ``--variant NAME=KEY=VALUE[,KEY=VALUE]`` of your own.

Every variant trains on the same token sequences in the same order, with the same LoRA initialisation and a
constant learning rate, so their loss curves are comparable step by step. ``--min-len N`` makes the
lengths ragged (uniform in N .. ``--seq``, as real data): the seed pads, qlora pads or packs
(``train.packing``); tokens/s then counts real tokens, and the padding waste is reported. Printed for each: median step time,
tokens/s, peak allocated and reserved GPU memory, weight memory after loading, final loss, and the ratios to
``seed``; ``--json`` prints it all as JSON.

    qlora bench --shape llama3-8b --seq 2048 --batch 4 --steps 10
    qlora bench --shape llama3-8b --ablations --json --out bench.json
"""

from __future__ import annotations

import atexit
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from qlora_core.framework.errors import UsageError

GIB = 2 ** 30

#: The core's own variant: qlora's trainer with its defaults, the reference every lever is compared with.
CORE_VARIANTS: dict[str, dict[str, Any]] = {
    "qlora": {"help": "qlora's defaults", "set": [], "plugins": [], "ablation": True},
}
_VARIANT_KEYS = {"help", "set", "plugins", "ablation", "run"}


def named_variants() -> dict[str, dict[str, Any]]:
    """Every named variant: the core's ``qlora`` and what each installed plugin offers through
    ``qlora_bench_variants``. Variants with their own code (``run``: the guide's recipe) come first, then
    ``qlora``, then the others, each plugin's in the order it offers them, the plugins in name order.

    :raises PluginError: a name offered twice, or a variant that is not a dict of the known keys.
    """
    from qlora_core.framework.errors import PluginError
    from qlora_core.framework.plugins import installed_plugin_manager

    offered: dict[str, tuple[str, dict[str, Any]]] = {name: ("qlora", spec) for name, spec in CORE_VARIANTS.items()}
    pm = installed_plugin_manager()
    for impl in pm.hook.qlora_bench_variants.get_hookimpls():  # in registration order: the plugins' names
        for name, spec in (impl.function() or {}).items():
            if name in offered:
                raise PluginError(f"bench variant {name!r} is offered by both {offered[name][0]!r} and "
                                  f"{impl.plugin_name!r}; one of them must rename it")
            unknown = set(spec) - _VARIANT_KEYS if isinstance(spec, dict) else None
            if unknown is None or unknown:
                what = f"unknown keys {', '.join(sorted(unknown))}" if unknown else "not a dict"
                raise PluginError(f"plugin {impl.plugin_name!r}: bench variant {name!r} is {what} (a variant has "
                                  f"{', '.join(sorted(_VARIANT_KEYS))})")
            offered[name] = (impl.plugin_name, spec)
    found = {name: spec for name, (_, spec) in offered.items()}
    own_code = [name for name, spec in found.items() if "run" in spec]
    rest = [name for name in found if name not in own_code and name not in CORE_VARIANTS]
    return {name: found[name] for name in [*own_code, *CORE_VARIANTS, *rest]}


def ablations(known: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The variants ``--ablations`` measures (those marked ``ablation``), in :func:`named_variants`' order."""
    known = named_variants() if known is None else known
    return [name for name, spec in known.items() if spec.get("ablation")]


def parse_variant(text: str, known: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """``NAME`` of :func:`named_variants`, or ``NAME=KEY=VALUE[,KEY=VALUE...]`` (qlora with those overrides;
    ``plugin:NAME`` entries add plugins, e.g. ``plugin:no:liger-kernels``)."""
    if "=" not in text:
        known = named_variants() if known is None else known
        if text not in known:
            raise UsageError(f"unknown bench variant {text!r}; known: {', '.join(known)} "
                             f"(or NAME=KEY=VALUE,... for qlora with overrides)")
        return text, known[text]
    name, _, spec = text.partition("=")
    sets, plugins = [], []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item.startswith("plugin:"):
            plugins.append(item[len("plugin:"):])
        elif "=" in item:
            sets.append(item)
        else:
            raise UsageError(f"bench variant {text!r}: {item!r} is neither KEY=VALUE nor plugin:NAME")
    return name, {"help": spec, "set": sets, "plugins": plugins}


# --------------------------------------------------------------------------- data


def make_sequences(n: int, seq: int, vocab: int, seed: int, min_len: int | None = None) -> list[list[int]]:
    """``n`` token sequences a model can learn from quickly: each repeats a random motif of 16 tokens drawn
    from the first 1,024 ids, so the loss falls from ln(vocab) as the step-by-step curves are compared.
    With ``min_len`` the lengths are ragged, uniform in ``min_len .. seq`` (real data), else all ``seq``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pool = min(vocab, 1024)
    out = []
    for _ in range(n):
        motif = torch.randint(0, pool, (16,), generator=gen)
        length = seq if min_len is None else int(torch.randint(min_len, seq + 1, (1,), generator=gen))
        out.append(motif.repeat(length // 16 + 1)[:length].tolist())
    return out


def bench_rows(args: dict[str, Any], vocab: int) -> list[list[int]]:
    """The token sequences a variant trains on, in the order qlora's loop takes them (``qlora`` gets them
    unordered and orders them itself): for a variant with its own code (``run``), so that every variant sees
    the same examples step by step. ``args`` are the bench's settings handed to ``run``; ``vocab`` the model's
    vocabulary size."""
    from qlora_core.loop.batching import epoch_order

    data = make_sequences((args["warmup"] + args["steps"]) * args["batch"], args["seq"], vocab, args["seed"],
                          args.get("min_len"))
    return [data[i] for i in epoch_order(len(data), args["seed"], 0).tolist()]


# --------------------------------------------------------------------------- one variant (worker process)


class _Profiler:
    """With ``--profile``: a torch.profiler trace of two steps after the warmup, summarised as the CUDA
    kernels that took the most time (a qlora plugin for the trainer's loop; called directly by the seed's)."""

    def __init__(self) -> None:
        self.prof: Any = None
        self.path: str | None = None
        self.start_after = 0
        self.started = 0.0

    def step_done(self, step: int) -> None:
        if self.path is None:
            return
        import torch

        if step == self.start_after and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            _sync()  # the window starts with the GPU idle: the previous step's queued work is not counted
            self.prof.__enter__()
            self.started = time.perf_counter()
        elif self.prof is not None and step == self.start_after + 2:
            _sync()
            wall = (time.perf_counter() - self.started) * 1e6
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            try:
                table = averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
            except (AttributeError, KeyError, RuntimeError):  # older torch: the CUDA names
                table = averages.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
            kernels = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA")
            head = (f"two steps: {wall / 1e3:,.1f} ms of wall time, {kernels / 1e3:,.1f} ms of GPU kernels "
                    f"(all streams; {kernels / wall:.0%} of the wall time)\n")
            Path(self.path).write_text(head + table)
            trace = Path(self.path).with_suffix(".trace.json")
            self.prof.export_chrome_trace(str(trace))
            with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            trace.unlink()
            self.prof, self.path = None, None

    @staticmethod
    def _hookimpl():
        from qlora_core.framework.plugins import hookimpl

        class Plugin:
            @hookimpl
            def qlora_on_step_end(self, run, metrics):
                PROFILER.step_done(run.step)

        return Plugin()


PROFILER = _Profiler()


def bench_step_done(step: int) -> None:
    """A variant with its own code (``run``) calls it after each step (1-based), as qlora's loop does through
    ``qlora_on_step_end``: with ``--profile``, the profiler's window opens after the warmup and closes two steps
    later."""
    PROFILER.step_done(step)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_memory() -> dict[str, float | None]:
    """The peak GPU memory since the last ``torch.cuda.reset_peak_memory_stats()``, allocated and reserved, in
    GiB (``None`` without CUDA): what every variant reports, a variant with its own code (``run``) included."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


#: How a run's notice about its decoder layers begins (checkpointing, offload, compilation).
LAYERS_NOTICE = "decoder layers: "


def _watch(device: str) -> Any:
    """A qlora plugin for the trainer's loop that notes what the bench reports of the run: when the base model
    is loaded (the ``random-weights`` plugin builds it), the time since the plugin was made, the GPU memory the
    weights take before any preparation, and the vocabulary size; and what the decoder layers do, as the run
    announces it (the last ``decoder layers: ...`` notice; the trainer sends one before the first step, on a
    GPU)."""
    from qlora_core.framework.plugins import hookimpl

    class Watch:
        started = time.perf_counter()
        build_seconds: float | None = None
        weights_gib: float | None = None
        vocab = 0
        layers: str | None = None

        @hookimpl
        def qlora_on_notice(self, run, message):
            if message.startswith(LAYERS_NOTICE):
                self.layers = message[len(LAYERS_NOTICE):]

        @hookimpl
        def qlora_model_loaded(self, model, config, for_training):
            import torch

            _sync()
            self.build_seconds = time.perf_counter() - self.started
            self.weights_gib = torch.cuda.memory_allocated() / GIB if device == "cuda" else None
            self.vocab = model.get_output_embeddings().weight.shape[0]

    return Watch()


class _BenchTokenizer:
    """What the trainer asks of a tokenizer when the data is already token ids (nothing is exported)."""

    pad_token_id = 0
    eos_token = ""

    def save_pretrained(self, path) -> None:  # pragma: no cover - exporters are off in the bench
        pass


def run_qlora(args: dict[str, Any], model_dir: Path, device: str, sets: Sequence[str],
              plugins: Sequence[str]) -> dict[str, Any]:
    """qlora's trainer (``Job``) with its plugins and loop, for ``steps`` steps, on the shape's model with random
    weights (the ``random-weights`` plugin, drawn from the bench's seed as the guide's recipe draws them)."""
    import torch

    from qlora_core.loop.data import TokenizedExample
    from qlora_core.loop.job import Job

    overrides: list[Any] = [
        ("model.name_or_path", str(model_dir)), ("lora.r", args["r"]), ("lora.lora_alpha", 2.0 * args["r"]),
        ("lora.lora_dropout", args["lora_dropout"]), ("train.per_device_train_batch_size", args["batch"]),
        ("train.gradient_accumulation_steps", 1), ("train.max_steps", args["warmup"] + args["steps"]),
        ("train.max_seq_length", args["seq"]), ("train.learning_rate", args["learning_rate"]),
        ("train.lr_scheduler_type", "constant"), ("train.max_grad_norm", args["max_grad_norm"]),
        ("train.logging_steps", 1), ("train.save_strategy", "no"), ("train.sample_max_new_tokens", 0),
        ("train.seed", args["seed"]), ("random_weights.seed", args["seed"]), *sets,
    ]
    out = Path(tempfile.mkdtemp(prefix="qlora-bench-run-"))
    atexit.register(shutil.rmtree, out, True)  # the run folder of a measurement: nothing in it is kept
    job = Job(None, plugins=["random-weights", "no:adapter-export", "no:rich-progress", *plugins],
              overrides=overrides, output_dir=out / "run")
    if PROFILER.path:
        job.plugins.pm.register(PROFILER._hookimpl(), name="bench-profiler")
    watch = _watch(device)
    job.plugins.pm.register(watch, name="bench-watch")
    job.tokenizer = _BenchTokenizer()
    job.load_model()
    total = args["warmup"] + args["steps"]
    job.train_examples = [TokenizedExample(ids, list(ids)) for ids in make_sequences(
        total * args["batch"], args["seq"], watch.vocab, args["seed"], args.get("min_len"))]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = job.run()
    rows = [m for m in result.metrics if "loss" in m and "tokens_per_second" in m]
    steps = [{"loss": m["loss"], "seconds": m["tokens"] / m["tokens_per_second"], "tokens": m["tokens"]}
             for m in rows]
    memory = bench_memory()
    # The trainer reports loading's peak apart and measures training's afresh; the bench's figure is both's.
    loading = result.summary.get("peak_gpu_memory_loading_gib")
    if loading is not None and loading > memory["peak_allocated_gib"]:
        memory["peak_allocated_gib"] = loading
    return {"build_seconds": watch.build_seconds, "weights_gib": watch.weights_gib, "steps": steps,
            "layers": watch.layers,
            "padding_waste": result.summary.get("padding_waste", {}).get(
                "packed_filler_waste" if job.config["train.packing"] else "padding_waste"), **memory}


def worker(name: str, spec: dict[str, Any], args: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.get("profile_dir"):
        PROFILER.path = str(Path(args["profile_dir"]) / f"profile-{name}.txt")
        PROFILER.start_after = args["warmup"]
    if device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if "run" in spec:  # a plugin's own code (the guide's recipe)
        result = spec["run"](args, model_dir, device)
    else:
        result = run_qlora(args, model_dir, device, spec.get("set", []), spec.get("plugins", []))
    measured = result["steps"][args["warmup"]:] or result["steps"]
    seconds = statistics.median(s["seconds"] for s in measured)
    # Real (not padding) tokens per second over the measured steps; with equal lengths, the median step's.
    if args.get("min_len") is None:
        tps = measured[0]["tokens"] / seconds
    else:
        tps = sum(s["tokens"] for s in measured) / sum(s["seconds"] for s in measured)
    result.update(variant=name, help=spec.get("help", ""), median_step_seconds=seconds,
                  tokens_per_second=tps, losses=[s["loss"] for s in result["steps"]],
                  final_loss=result["steps"][-1]["loss"],
                  step_seconds=[round(s["seconds"], 4) for s in result["steps"]],
                  step_tokens=[s["tokens"] for s in result["steps"]])
    del result["steps"]
    return result


# --------------------------------------------------------------------------- the command (parent process)


def _versions() -> dict[str, str]:
    out = {}
    for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger_kernel"):
        try:
            out[m] = __import__(m).__version__
        except Exception:  # noqa: BLE001 - absent or versionless
            try:
                from importlib.metadata import version

                out[m] = version(m.replace("_", "-"))
            except Exception:  # noqa: BLE001
                out[m] = "not installed"
    return out


def run_variant_process(name: str, spec: dict[str, Any], args: dict[str, Any], model_dir: Path,
                        timeout: float | None = None) -> dict[str, Any]:
    """Run one variant in a fresh Python process; its JSON result, or an ``error`` entry."""
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        job = Path(tmp) / "job.json"
        result_file = Path(tmp) / "result.json"
        # A variant's own code (``run``) is looked up again by name in the worker, which collects the variants.
        plain = {k: v for k, v in spec.items() if k != "run"}
        job.write_text(json.dumps({"name": name, "spec": plain, "run": name if "run" in spec else None,
                                   "args": args, "model_dir": str(model_dir)}))
        try:
            proc = subprocess.run([sys.executable, "-m", "qlora_core.tools.bench", "--worker", str(job), str(result_file)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"variant": name, "help": spec.get("help", ""), "error": f"took over {timeout:g} s"}
        if proc.returncode == 0 and result_file.is_file():
            return json.loads(result_file.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        oom = any("OutOfMemoryError" in line or "out of memory" in line for line in tail)
        return {"variant": name, "help": spec.get("help", ""),
                "error": "out of GPU memory" if oom else f"exit code {proc.returncode}", "log_tail": tail}


def compare(results: list[dict[str, Any]]) -> None:
    """Add ratios to ``seed`` (tokens/s and peak memory) and the loss curves' largest difference; and, for
    each variant beside ``qlora`` (a lever changed), its tokens/s ratio and peak-memory difference to it."""
    ours = next((r for r in results if r.get("variant") == "qlora" and "error" not in r), None)
    for r in results:
        if ours is None or r is ours or "error" in r or r.get("variant") == "seed":
            continue
        r["speedup_vs_qlora"] = r["tokens_per_second"] / ours["tokens_per_second"]
        if r.get("peak_allocated_gib") is not None and ours.get("peak_allocated_gib") is not None:
            r["memory_vs_qlora_gib"] = r["peak_allocated_gib"] - ours["peak_allocated_gib"]
    seed = next((r for r in results if r.get("variant") == "seed" and "error" not in r), None)
    if seed is None:
        return
    for r in results:
        if r is seed or "error" in r:
            continue
        r["speedup_vs_seed"] = r["tokens_per_second"] / seed["tokens_per_second"]
        if r.get("peak_allocated_gib") and seed.get("peak_allocated_gib"):
            r["memory_vs_seed"] = r["peak_allocated_gib"] / seed["peak_allocated_gib"]
        n = min(len(r["losses"]), len(seed["losses"]))
        if n:
            r["loss_max_abs_diff_vs_seed"] = max(abs(a - b) for a, b in zip(r["losses"][:n], seed["losses"][:n]))


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    a = report["settings"]
    lengths = f"lengths {a['min_len']}..{a['seq']}" if a.get("min_len") else f"seq {a['seq']}"
    table = Table(title=f"qlora bench: {a['shape']}, {lengths}, batch {a['batch']}, r {a['r']}, "
                        f"lora_dropout {a['lora_dropout']:g}, lr {a['learning_rate']:g}, "
                        f"{a['steps']} steps after {a['warmup']} warmup "
                        f"({report['device']})")
    for col in ("variant", "step s", "tokens/s", "x seed", "x qlora", "padding", "peak alloc GiB",
                "+GiB vs qlora", "peak reserved GiB", "weights GiB", "mem / seed", "final loss", "max |loss - seed|"):
        table.add_column(col, justify="left" if col == "variant" else "right")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in report["results"]:
        if "error" in r:
            table.add_row(r["variant"], r["error"], *[""] * 11)
            continue
        table.add_row(r["variant"], f(r["median_step_seconds"], ".3f"), f(r["tokens_per_second"], ",.0f"),
                      f(r.get("speedup_vs_seed"), ".2f"), f(r.get("speedup_vs_qlora"), ".3f"),
                      f(r.get("padding_waste"), ".1%"), f(r.get("peak_allocated_gib"), ".2f"),
                      f(r.get("memory_vs_qlora_gib"), "+.2f"),
                      f(r.get("peak_reserved_gib"), ".2f"), f(r.get("weights_gib"), ".2f"),
                      f(r.get("memory_vs_seed"), ".2f"), f(r["final_loss"], ".4f"),
                      f(r.get("loss_max_abs_diff_vs_seed"), ".4f"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)
    console.print(table)
    for r in report["results"]:
        if r.get("layers"):
            console.print(f"  {r['variant']}: {r['layers']}")


#: the largest shape benchmarked on a machine without a GPU (SmolLM2-135M builds in seconds there; the 8B shape
#: took 9.5 minutes and 12 GB of RAM before its first step)
CPU_MAX_PARAMETERS = 1_000_000_000


def check_cpu_shape(shape: str, config: dict[str, Any]) -> None:
    """Without a GPU: refuse a shape too big for the CPU, else say up front what will run."""
    import sys

    from qlora_core.tools.shapes import parameter_count

    n = parameter_count(config)
    if n > CPU_MAX_PARAMETERS:
        raise UsageError(f"no GPU here: the {shape} shape ({n / 1e9:.1f}B parameters) would take many minutes and "
                         f"about {n * 1.5 / 1e9:.0f} GB of RAM to build on the CPU, and its figures would say nothing "
                         f"about a GPU; run qlora bench on a GPU, or use --shape smollm2-135m here")
    print(f"no GPU here: benchmarking the {shape} shape ({n / 1e6:.0f}M parameters) on the CPU", file=sys.stderr)


def bench(shape: str = "llama3-8b", seq: int = 2048, batch: int = 4, steps: int = 10, warmup: int = 2, r: int = 16,
          lora_dropout: float = 0.0, variants: Sequence[str] = ("seed", "qlora"), learning_rate: float = 2e-4,
          max_grad_norm: float = 0.3, seed: int = 42, timeout: float | None = None,
          min_len: int | None = None, profile_dir: str | Path | None = None,
          on_result: Any = None) -> dict[str, Any]:
    """Measure ``variants`` on one shape; the report that ``qlora bench --json`` prints.

    :param on_result: called with the report so far after each variant (``--out`` keeps what was measured
        when a later variant is stopped).
    """
    import torch

    from qlora_core.tools.shapes import shape_config, write_config_folder

    config = shape_config(shape)
    for label, value in (("--seq", seq), ("--batch", batch), ("--steps", steps), ("--r", r)):
        if value < 1:
            raise UsageError(f"{label} must be at least 1 (got {value})")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more (got {warmup})")
    if min_len is not None and not 1 <= min_len <= seq:
        raise UsageError(f"--min-len must be between 1 and --seq {seq} (got {min_len})")
    if not 0 <= lora_dropout < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1) (got {lora_dropout})")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise UsageError(f"--learning-rate must be a positive number (got {learning_rate})")
    known = named_variants()
    parsed = [parse_variant(v, known) for v in variants]
    if not torch.cuda.is_available():
        check_cpu_shape(shape, config)
    args = {"shape": shape, "seq": seq, "batch": batch, "steps": steps, "warmup": warmup, "r": r,
            "lora_dropout": lora_dropout, "learning_rate": learning_rate, "max_grad_norm": max_grad_norm,
            "seed": seed, "min_len": min_len}
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        args["profile_dir"] = str(Path(profile_dir).resolve())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"settings": args, "device": device, "date": time.strftime("%Y-%m-%d"), "versions": _versions(),
              "results": []}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-model-") as tmp:
        model_dir = write_config_folder(config, Path(tmp) / "model")
        for name, spec in parsed:
            report["results"].append(run_variant_process(name, spec, args, model_dir, timeout))
            compare(report["results"])
            if on_result is not None:
                on_result(report)
    return report


def _worker_main(job_file: str, result_file: str) -> int:
    from qlora_core.framework.noise import quiet_third_party_noise

    try:  # Linux: die with the bench process, not hold the GPU after it was stopped
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    quiet_third_party_noise()
    job = json.loads(Path(job_file).read_text())
    spec = job["spec"]
    if job.get("run"):
        spec = {**spec, "run": named_variants()[job["run"]]["run"]}
    result = worker(job["name"], spec, job["args"], Path(job["model_dir"]))
    Path(result_file).write_text(json.dumps(result, default=lambda x: None if isinstance(x, float) and
                                            not math.isfinite(x) else str(x)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process of one variant (``--worker JOB_FILE RESULT_FILE``); ``qlora bench`` is the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["--worker"] or len(argv) != 3:
        print("error: this module runs qlora bench's variants; the command is qlora bench (see qlora bench --help)",
              file=sys.stderr)
        return 2
    return _worker_main(argv[1], argv[2])


if __name__ == "__main__":
    # Run as the module imported under its own name, not as __main__: a plugin's variant code reaches this
    # module's state (the profiler) through qlora_core's public names, which import it by name.
    from qlora_core.tools import bench as _bench

    sys.exit(_bench.main())
