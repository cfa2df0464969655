"""``qlora plan``: the guide's hyperparameters, trainable parameters and GPU memory of a run, before running it."""

from __future__ import annotations

import argparse
import json

HELP = "estimate a run's trainable parameters and GPU memory, and check it against the guide (no weights loaded)"


def _gpus(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of GPUs (got {value!r})") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (default: the embedded default job)")
    parser.add_argument("--model", "-m", metavar="NAME_OR_PATH",
                        help="model to plan for: a folder, a hub id or embedded:... (default: the config's "
                             "model.name_or_path); only its config.json is read")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set lora.r=32")
    parser.add_argument("--plugin", "-p", action="append", default=[], metavar="NAME",
                        help="use a plugin as qlora run would (e.g. paged-adamw-32bit, no:gradient-checkpointing)")
    parser.add_argument("--gpus", type=_gpus, default=1, metavar="N",
                        help="GPUs the run is spread over (FSDP shards weights, adapters, gradients and optimizer "
                             "states; activations per GPU stay)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    from qlora_core.tools.plan import plan
    from qlora_core.loop.setup import resolve

    overrides = list(args.overrides)
    if args.model:
        overrides.append(("model.name_or_path", args.model))
    config, plugins = resolve(args.config, args.plugin, overrides)
    result = plan(None, config, gpus=args.gpus, plugins=plugins)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print_plan(result)
    return 0


def print_plan(result) -> None:
    """The plan as rich tables on the terminal."""
    from rich.console import Console
    from rich.table import Table

    from qlora_core.loop.guidance import human_count, short_float
    from qlora_core.tools.plan import GIB, ROW_LABELS

    console = Console()
    shape, st, rec = result.shape, result.settings, result.recommendation
    where = result.model if result.model == result.path else f"{result.model} ({result.path})"

    model = Table(title=f"qlora plan: {where}", show_header=False, title_justify="left")
    model.add_column("", style="bold")
    model.add_column("")
    model.add_row("architecture", f"{shape.model_type}, {shape.n_layers} layers, hidden {shape.hidden_size}, "
                                  f"MLP {shape.intermediate_size}{' (gated)' if shape.gated_mlp else ''}")
    model.add_row("attention", f"{shape.num_heads} heads, {shape.num_kv_heads} KV heads, head dim {shape.head_dim}"
                               f", {shape.attn_implementation}")
    model.add_row("vocabulary", f"{shape.vocab_size:,}{' (tied embeddings)' if shape.tied_embeddings else ''}")
    model.add_row("parameters", f"{human_count(shape.n_params, 2)} ({shape.n_params:,})")
    quant = (f"{human_count(shape.n_quantizable, 2)} in {len(shape.linears)} linear layers, {st.quant_type.upper()}"
             f"{' + double quant' if st.double_quant else ''}") if st.load_in_4bit else "no (quant.load_in_4bit)"
    model.add_row("in 4 bits", quant)
    model.add_row("LoRA targets", f"{', '.join(result.lora_targets) or 'none'} ({result.lora_modules} modules)")
    model.add_row(f"trainable (r={st.r})",
                  f"{human_count(result.trainable_params, 2)} ({result.trainable_params:,}, "
                  f"{100.0 * result.trainable_params / max(1, shape.n_params):.2f}%)")
    console.print(model)

    guide = Table(title=f"The guide for {human_count(shape.n_params)} parameters: {rec.basis}", title_justify="left")
    guide.add_column("setting", style="bold")
    guide.add_column("guide")
    guide.add_column("this config", justify="right")

    def mark(ok: bool, text: str) -> str:
        return text if ok else f"[yellow]{text}[/yellow]"

    eff = st.batch * st.gradient_accumulation_steps * st.gpus
    alpha, lr = st.lora_alpha, st.learning_rate
    guide.add_row("lora.r", f"{rec.r_range[0]}-{rec.r_range[1]} (suggested {rec.r})",
                  mark(rec.r_range[0] <= st.r <= rec.r_range[1], str(st.r)))
    guide.add_row("lora.lora_alpha", f"2 x r = {2 * st.r}", mark(alpha == 2 * st.r, f"{alpha:g}"))
    guide.add_row("train.learning_rate",
                  f"{short_float(rec.lr_range[0])} .. {short_float(rec.lr_range[1])} (suggested "
                  f"{short_float(rec.learning_rate)})",
                  mark(rec.lr_range[0] <= lr <= rec.lr_range[1], short_float(lr)))
    guide.add_row("effective batch", f"{rec.effective_batch[0]}-{rec.effective_batch[1]} (instruction tuning)",
                  mark(rec.effective_batch[0] <= eff <= rec.effective_batch[1],
                       f"{eff} = {st.batch} x {st.gradient_accumulation_steps} x {st.gpus} GPU"
                       f"{'s' if st.gpus != 1 else ''}"))
    console.print(guide)

    w, wo = result.with_checkpointing, result.without_checkpointing
    gpus = f"{st.gpus} GPUs, FSDP" if st.gpus > 1 else "1 GPU"
    mem = Table(title=f"GPU memory per GPU, GiB (batch {st.batch} x seq {st.seq}, {gpus}, {st.compute_dtype}, "
                      f"{st.optimizer})", title_justify="left")
    mem.add_column("", style="bold")
    mem.add_column("checkpointing" + (" *" if st.checkpointing else ""), justify="right")
    mem.add_column("without" + (" *" if not st.checkpointing else ""), justify="right")
    labels = {
        "quantized_weights": "4-bit linear weights (0.5 B/param)",
        "quant_constants": f"quantization constants ({'0.127' if st.double_quant else '0.5'} bit/param)",
        "other_weights": "embeddings, head, norms" + (" (fp32 upcast)" if st.upcast else f" ({st.compute_dtype})"),
        "lora_weights": "LoRA weights (fp32" + (f" + {st.compute_dtype} copy)" if st.adapter_copy else ")"),
        "lora_gradients": "LoRA gradients (fp32)",
        "optimizer_states": f"optimizer states ({st.optimizer_bytes} B/param)",
        "stored_activations": "activations kept for backward",
        "working_set": "peak working set",
        "transients": "transient buffers" + (" (+ FSDP gathers)" if st.gpus > 1 else ""),
    }
    for key in ROW_LABELS:
        if key in ("quantized_weights", "quant_constants") and not st.load_in_4bit:
            continue
        mem.add_row(labels[key], f"{getattr(w, key) / GIB:.2f}", f"{getattr(wo, key) / GIB:.2f}")
    mem.add_section()
    mem.add_row("peak allocated", f"[bold]{w.total / GIB:.2f}[/bold]", f"[bold]{wo.total / GIB:.2f}[/bold]")
    mem.add_row("budget (+ CUDA context, allocator)", f"{w.budget / GIB:.2f}", f"{wo.budget / GIB:.2f}")
    console.print(mem)
    if w.working_set_kind == wo.working_set_kind:
        kind = f"{w.working_set_kind} in both columns"
    else:
        kind = f"{w.working_set_kind} with checkpointing, {wo.working_set_kind} without"
    console.print(f"peak working set: {kind}. Peak allocated compares with torch.cuda.max_memory_allocated.",
                  style="dim", highlight=False)
    load = result.loading
    if load is not None:
        where = {"onto each GPU": "each process quantizes the whole model onto its GPU",
                 "low-memory": "one process loads into CPU memory, the others receive their shards",
                 "into CPU memory": "loaded into CPU memory, which keeps the shards (fsdp.cpu_offload)"}[load.kind]
        cpu = f", {load.cpu / GIB:.2f} GiB of weights in CPU memory per machine" if load.cpu else ""
        console.print(f"while loading: [bold]{load.gpu / GIB:.2f} GiB[/bold] per GPU{cpu} ({where}; each process "
                      f"also holds its own libraries in CPU memory)", highlight=False)
    active = "with" if st.checkpointing else "without"
    console.print(f"* this config trains {active} gradient checkpointing: budget about "
                  f"[bold]{result.memory.budget / GIB:.1f} GiB[/bold] per GPU", highlight=False)
    for text in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {text}", highlight=False)
    for text in result.notes:
        console.print(f"[dim]note: {text}[/dim]", highlight=False)
