"""The hooks a qlora plugin can implement.

Every hook is prefixed ``qlora_``. A plugin is any module or object with functions marked by
:data:`qlora_core.hookimpl`; it takes part in a run only when it is a default or the run asks for it
(``--plugin NAME`` or the config's ``plugins:`` list).

Hooks are grouped by the stage of a run at which they are called, in that order:

0. commands: :func:`qlora_register_commands` (the CLI asks every installed plugin, before any run)
1. set-up: :func:`qlora_config_options`, :func:`qlora_configure`
2. model name and tokenizer: :func:`qlora_resolve_model`, :func:`qlora_load_tokenizer` (the tokenizer is loaded
   first, for the data)
3. data: :func:`qlora_resolve_data`, :func:`qlora_dataset_formats`
4. model: :func:`qlora_quantization_config`, :func:`qlora_model_load_kwargs`, :func:`qlora_load_base_model`,
   :func:`qlora_model_loaded`, :func:`qlora_prepare_model`, :func:`qlora_adapter_targets`,
   :func:`qlora_adapter_config`, then :func:`qlora_adapter_model` once the adapters are added
5. distribution, optimizer and schedule: :func:`qlora_distribute_model`, :func:`qlora_optimizer_params`,
   :func:`qlora_optimizer`, :func:`qlora_lr_scheduler`, then :func:`qlora_on_resume` when a run continues
6. training events (callbacks): the evaluation and sample before training (:func:`qlora_on_evaluate`,
   :func:`qlora_on_sample`), then :func:`qlora_on_train_start`; every step :func:`qlora_on_step_begin`,
   :func:`qlora_collate` and :func:`qlora_compute_loss` for each micro-batch, :func:`qlora_on_after_backward`
   before the optimizer steps, :func:`qlora_on_step_end`; :func:`qlora_on_log` every ``train.logging_steps``,
   :func:`qlora_on_epoch_end` at each epoch's end, :func:`qlora_on_evaluate` every ``train.eval_steps`` and at
   the end, :func:`qlora_on_save` for each checkpoint, :func:`qlora_on_mode` whenever the loop switches between
   training and evaluating, saving or exporting, :func:`qlora_on_notice` for what the user should know,
   the sample after training; :func:`qlora_on_train_failed` instead of the rest when the run fails or is
   interrupted
7. export: :func:`qlora_export`, with :func:`qlora_on_save` for each folder written, then
   :func:`qlora_on_train_end`
8. tools: :func:`qlora_plan_settings` (``qlora plan``), :func:`qlora_bench_variants` (``qlora bench``),
   :func:`qlora_dequantize_model` (``qlora merge``)

Callbacks steer the loop through ``run.control`` (:class:`qlora_core.TrainControl`): setting
``should_stop``, ``should_save`` or ``should_evaluate`` in :func:`qlora_on_step_end` (or any hook called
during a step) stops the run after this step, writes a checkpoint now, or evaluates now.

A plugin that is a class (an entry point naming a class, or a class given to ``--plugin``) is instantiated
once per run: its instance is where the plugin keeps per-run state.

Five concerns are single-choice: quantization (:func:`qlora_quantization_config`), adapter targeting
(:func:`qlora_adapter_targets`), distribution (:func:`qlora_distribute_model`), optimizer
(:func:`qlora_optimizer`) and dataset format (:func:`qlora_dataset_formats`). A plugin the run asks for replaces the defaults that implement the same
hook; two requested plugins implementing the same single-choice hook are an error naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from qlora_core.framework.config import Config, Option
    from qlora_core.framework.types import DatasetFormat, Run
    from qlora_core.loop.data import TokenizedExample

hookspec = pluggy.HookspecMarker("qlora")

# Hooks that decide one single-choice concern each, with the concern's name for messages.
SINGLE_CHOICE_HOOKS: dict[str, str] = {
    "qlora_quantization_config": "quantization",
    "qlora_adapter_targets": "adapter targeting",
    "qlora_distribute_model": "distribution",
    "qlora_optimizer": "optimizer",
    "qlora_dataset_formats": "dataset format",
}


# --------------------------------------------------------------------------- commands


@hookspec
def qlora_register_commands(register: Any) -> None:
    """Add ``qlora`` sub-commands.

    The command line asks every installed plugin (not only a run's), as ``llm`` does: a command is not a run,
    so installing a package that adds one changes no run.

    :param register: call ``register(name, help, add_arguments, main)`` once per command: ``name`` is the
        sub-command (``qlora NAME``), ``help`` one line, ``add_arguments(parser)`` adds its options to an
        ``argparse`` parser, and ``main(args) -> int`` runs it (raise :class:`qlora_core.UsageError` for a
        user's mistake: one ``error:`` line, exit code 2). A name already taken is an error.
    :returns: nothing.

    Every plugin's implementation is called.
    """


# --------------------------------------------------------------------------- set-up


@hookspec
def qlora_config_options() -> "list[Option]":
    """Declare the config keys this plugin reads, so they are validated like the core's.

    Keys are dotted (``"fsdp.sharding_strategy"``) and must not clash with another plugin's.

    :returns: a list of :class:`qlora_core.framework.config.Option`.

    Every plugin's result is used.
    """


@hookspec
def qlora_configure(config: "Config", device: str) -> None:
    """Adjust or check the validated config before anything is loaded.

    Raise :class:`qlora_core.framework.errors.UsageError` (or ``ConfigError``) to reject a combination.

    :param config: the validated config; plugins may set values with ``config.set(key, value)``.
    :param device: ``"cpu"`` or ``"cuda"``: where the run will compute.
    :returns: nothing.

    Every plugin's implementation is called.
    """


# --------------------------------------------------------------------------- model


@hookspec(firstresult=True)
def qlora_resolve_model(name_or_path: str, config: "Config") -> "str | None":
    """Map ``model.name_or_path`` to something ``from_pretrained`` can load (a folder or a hub id).

    :param name_or_path: the configured model name.
    :param config: the config.
    :returns: a local folder or hub id, or ``None`` to leave the name to the next plugin
        (and, finally, to transformers as it is).

    The first non-None result wins.
    """


@hookspec(firstresult=True)
def qlora_load_tokenizer(name_or_path: str, config: "Config") -> Any:
    """Load the tokenizer instead of ``AutoTokenizer.from_pretrained(name_or_path)``.

    :param name_or_path: the resolved model folder or hub id, or a folder holding a saved tokenizer (a run's
        ``adapter/``).
    :param config: the config (``model.revision``, ``model.trust_remote_code``).
    :returns: a tokenizer (a pad token is set to eos afterwards if it has none), or ``None`` to let
        transformers load it.

    The first non-None result wins.
    """


@hookspec(firstresult=True)
def qlora_quantization_config(config: "Config", compute_dtype: "torch.dtype") -> "dict[str, Any] | None":
    """Choose how the base model's weights are quantized when loaded (the quant strategy).

    :param config: the config (``quant.*`` keys).
    :param compute_dtype: the dtype the run computes in (bfloat16 on a GPU that supports it, else float32).
    :returns: keyword arguments for ``AutoModelForCausalLM.from_pretrained``, usually
        ``{"quantization_config": BitsAndBytesConfig(...)}``; ``{}`` loads the model unquantized.

    The first non-None result wins; it is a single-choice concern.
    """


@hookspec(firstresult=True)
def qlora_load_base_model(name_or_path: str, kwargs: "dict[str, Any]", config: "Config") -> "torch.nn.Module | None":
    """Make the base model instead of ``AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)``.

    :param name_or_path: the resolved model folder or hub id.
    :param kwargs: the arguments ``from_pretrained`` would get, after the quant strategy and
        ``qlora_model_load_kwargs``: ``dtype``, ``device_map`` (``{"": device}``), ``quantization_config``, ...
    :param config: the config.
    :returns: the model, on its device and quantized as ``kwargs`` ask, or ``None`` to let transformers load it.

    ``kwargs`` may hold ``quantize_device`` (set by a ``qlora_model_load_kwargs`` plugin, such as ``fsdp`` when
    the weights are to live in CPU memory): a loader that can should quantize each weight there (a GPU, where
    quantizing is fast) and then keep it on ``device_map``'s device. Transformers' own loader never sees it; it
    quantizes where it puts the weights. The built-in quant plugin (``nf4``) loads a local safetensors
    checkpoint that way, one tensor at a time.

    The first non-None result wins. The built-in ``random-weights`` plugin builds the architecture of the
    folder's ``config.json`` with random weights, straight into 4 bits (benchmarks of any shape, no download).
    """


@hookspec
def qlora_model_load_kwargs(kwargs: "dict[str, Any]", config: "Config") -> None:
    """Adjust the keyword arguments of ``AutoModelForCausalLM.from_pretrained`` in place, after the quant
    strategy has added its own (``device_map``, ``max_memory``, ``attn_implementation``, ...).

    :param kwargs: the arguments: ``dtype``, ``device_map``, ``revision``, ``trust_remote_code`` and the
        quantization plugin's (usually ``quantization_config``).
    :param config: the config.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_model_loaded(model: "torch.nn.Module", config: "Config", for_training: bool) -> None:
    """The base model was loaded (for training, or for evaluation, generation and merging). Modify it in place.

    :param model: the loaded base model, quantized as the quant strategy asked.
    :param config: the config.
    :param for_training: True when the run will train it (:func:`qlora_prepare_model` follows).
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_prepare_model(model: "torch.nn.Module", config: "Config") -> None:
    """Prepare the loaded base model for training, before adapters are added (k-bit preparation,
    gradient checkpointing, ...). Modify the model in place.

    :param model: the loaded base model.
    :param config: the config.
    :returns: nothing.

    Every plugin's implementation is called; quantization preparation is ``tryfirst``.
    """


@hookspec(firstresult=True)
def qlora_adapter_targets(model: "torch.nn.Module", config: "Config") -> "list[str] | None":
    """Choose the modules that receive LoRA adapters.

    :param model: the prepared base model.
    :param config: the config (``lora.*`` keys).
    :returns: module names (suffixes as PEFT's ``target_modules`` takes them), or ``None`` to leave the
        choice to the next plugin (and, finally, to ``lora.target_modules`` as PEFT reads it).

    The first non-None result wins; it is a single-choice concern.
    """


@hookspec
def qlora_adapter_config(lora_config: Any, model: "torch.nn.Module", config: "Config") -> None:
    """Adjust the adapters' ``peft.LoraConfig`` in place before the model is wrapped (``get_peft_model``).

    :param lora_config: the ``LoraConfig`` built from ``lora.*`` and the adapter targets.
    :param model: the prepared base model.
    :param config: the config.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_adapter_model(model: "torch.nn.Module", config: "Config") -> None:
    """The model with its LoRA adapters (the ``PeftModel``), before it is distributed and trained. Modify it
    in place (fused layers, compiled layers, a loss forward).

    :param model: the PEFT model.
    :param config: the config.
    :returns: nothing.

    Every plugin's implementation is called.
    """


# --------------------------------------------------------------------------- data


@hookspec(firstresult=True)
def qlora_resolve_data(path: str, config: "Config") -> "str | None":
    """Map ``data.path`` (or ``data.eval_path``) to a local file, folder or hub dataset id.

    :param path: the configured path.
    :param config: the config.
    :returns: the path to load, or ``None`` to load ``path`` as it is.

    The first non-None result wins.
    """


@hookspec
def qlora_dataset_formats(config: "Config") -> "Sequence[DatasetFormat]":
    """Offer dataset formats (how rows become text, and which parts of it the loss covers).

    When the run names no format (``data.format`` or a requested formatter plugin), the first offered
    format whose :meth:`~qlora_core.framework.types.DatasetFormat.matches` accepts the dataset's columns is used.

    :param config: the config.
    :returns: a sequence of :class:`qlora_core.framework.types.DatasetFormat`.

    Every plugin's result is used; a requested formatter plugin replaces the default ones.
    """


# --------------------------------------------------------------------------- distribution


@hookspec(firstresult=True)
def qlora_distribute_model(model: "torch.nn.Module", accelerator: Any, config: "Config") -> "torch.nn.Module | None":
    """Wrap the PEFT model for training across the run's processes (sharding, gradient synchronisation).

    Called on every process, after the adapters are added (and, on ``--resume``, their weights loaded), before
    the optimizer is built. The wrapper must keep the adapters' parameters whole on every process (the
    optimizer, checkpoints and exports read them directly) and its ``no_sync()`` must skip gradient
    synchronisation for all but the last micro-batch of a step, as DDP's does.

    :param model: the PEFT model, on this process's device.
    :param accelerator: the run's ``accelerate.Accelerator`` (``num_processes``, ``process_index``, ``device``).
    :param config: the config.
    :returns: the wrapped model, whose ``module`` attribute is ``model``; or ``None`` to leave the model to
        accelerate (DDP across several processes, nothing for one).

    The first non-None result wins; it is a single-choice concern.
    """


# --------------------------------------------------------------------------- optimizer


@hookspec(firstresult=True)
def qlora_optimizer_params(params: "list[torch.nn.Parameter]", model: "torch.nn.Module",
                           config: "Config") -> "list[torch.nn.Parameter] | None":
    """Choose the tensors the optimizer and gradient clipping work on, in place of the trainable parameters.

    :param params: the model's trainable parameters (the adapters).
    :param model: the model as it will be trained (distributed, if a plugin distributed it).
    :param config: the config.
    :returns: the parameters to hand to :func:`qlora_optimizer` (the ``flat-params`` plugin returns one buffer
        per dtype that holds every adapter), or ``None`` for ``params`` as they are.

    The first non-None result wins.
    """


@hookspec(firstresult=True)
def qlora_optimizer(params: "list[torch.nn.Parameter]", config: "Config") -> "torch.optim.Optimizer | None":
    """Build the optimizer for the trainable parameters.

    :param params: the trainable parameters (the adapters).
    :param config: the config (``train.learning_rate``, ``train.weight_decay``, and any keys the plugin declares).
    :returns: a ``torch.optim.Optimizer``.

    The first non-None result wins; it is a single-choice concern.
    """


@hookspec(firstresult=True)
def qlora_lr_scheduler(optimizer: "torch.optim.Optimizer", num_training_steps: int, config: "Config") -> Any:
    """Build the learning-rate scheduler.

    :param optimizer: the optimizer.
    :param num_training_steps: the optimizer steps the run takes (its schedule's horizon).
    :param config: the config (``train.lr_scheduler_type``, ``train.warmup_steps``, ...).
    :returns: a ``torch.optim.lr_scheduler.LRScheduler`` (stepped once per optimizer step, its state saved in
        checkpoints), or ``None`` for transformers' ``get_scheduler(train.lr_scheduler_type, ...)``.

    The first non-None result wins.
    """


# --------------------------------------------------------------------------- the step


@hookspec(firstresult=True)
def qlora_collate(examples: "Sequence[TokenizedExample]", config: "Config", pad_token_id: int) -> Any:
    """Make one micro-batch of tensors from tokenized examples.

    :param examples: the micro-batch's examples (``input_ids`` and ``labels``, the prompt's labels -100).
    :param config: the config (``train.packing``, ``train.max_seq_length``).
    :param pad_token_id: the tokenizer's pad token.
    :returns: a dict of CPU tensors with at least ``input_ids`` and ``labels`` (and ``attention_mask``,
        ``position_ids`` or whatever the plugin's :func:`qlora_compute_loss` reads), or ``None`` for the
        core's batching: right-padded, or with ``train.packing`` packed into rows of up to
        ``train.max_seq_length`` tokens.

    The first non-None result wins.
    """


@hookspec(firstresult=True)
def qlora_compute_loss(model: "torch.nn.Module", batch: "dict[str, torch.Tensor]",
                       config: "Config") -> "tuple[torch.Tensor, int] | None":
    """Compute a micro-batch's loss, in training and in evaluation.

    :param model: the model as trained (distributed, if a plugin distributed it).
    :param batch: the micro-batch on the model's device, as :func:`qlora_collate` made it.
    :param config: the config.
    :returns: ``(loss_sum, n_targets)``: the next-token cross-entropy summed over the batch's answer tokens (the
        labels that are not -100, shifted by one), a scalar tensor with its graph, and their number; the loop
        normalises by the whole step's answer tokens. ``None`` for the core's: the model's logits and
        ``torch.nn.functional.cross_entropy``.

    The first non-None result wins.
    """


# --------------------------------------------------------------------------- callbacks


@hookspec
def qlora_on_train_start(run: "Run") -> None:
    """Training is about to start: the model, data and optimizer are ready.

    :param run: the run (``max_steps``, ``num_train_examples``, ``config``, ...).
    :returns: nothing.

    Every plugin's implementation is called, on every process; check ``run.is_main_process`` before
    writing or printing.
    """


@hookspec
def qlora_on_resume(run: "Run", checkpoint: "Path") -> None:
    """A run continues from a checkpoint: the adapters, optimizer, scheduler and position are loaded.

    :param run: the run; ``run.step`` is the checkpoint's step.
    :param checkpoint: the checkpoint folder (``RUN_DIR/checkpoints/step-N``).
    :returns: nothing.

    Every plugin's implementation is called, on every process, before :func:`qlora_on_train_start`.
    """


@hookspec
def qlora_on_step_begin(run: "Run", step: int) -> None:
    """An optimizer step is about to start (before its first micro-batch).

    :param run: the run; ``run.step`` is still the previous step.
    :param step: the step about to be taken (1-based).
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_after_backward(run: "Run", model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> None:
    """The step's gradients are complete (after its last micro-batch's backward), before gradient clipping and
    the optimizer step: the place for a synchronisation or a change of the gradients.

    :param run: the run; ``run.step`` is still the previous step.
    :param model: the model as trained.
    :param optimizer: the optimizer about to step.
    :returns: nothing.

    Every plugin's implementation is called, on every process.
    """


@hookspec
def qlora_on_step_end(run: "Run", metrics: "dict[str, float | None]") -> None:
    """An optimizer step has finished.

    :param run: the run; ``run.step`` is the step just taken.
    :param metrics: ``step``, ``loss`` (mean over target tokens of the step), ``learning_rate``,
        ``grad_norm`` (``None`` when ``train.max_grad_norm`` is 0), ``tokens`` (tokens in the step),
        ``tokens_per_second``, ``epoch``, ``elapsed`` and, on a GPU, ``gpu_memory_gib``.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_log(run: "Run", metrics: "dict[str, float | None]") -> None:
    """A logging step (every ``train.logging_steps`` and the last): the row written to ``metrics.jsonl``.

    :param run: the run.
    :param metrics: as for :func:`qlora_on_step_end`, with ``loss`` and ``tokens_per_second`` averaged over the
        steps since the last logging step.
    :returns: nothing.

    Every plugin's implementation is called, on every process.
    """


@hookspec
def qlora_on_epoch_end(run: "Run", epoch: int) -> None:
    """An epoch over the training data has ended at this step.

    :param run: the run; ``run.step`` is the step that finished the epoch.
    :param epoch: the epoch that ended (1-based).
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_evaluate(run: "Run", metrics: "dict[str, float]") -> None:
    """An evaluation on the held-out data has finished.

    :param run: the run.
    :param metrics: ``step``, ``eval_loss``, ``eval_perplexity``, ``eval_tokens``.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_sample(run: "Run", stage: str, prompt: str, completion: str, reference: str) -> None:
    """A sample answer was generated from a held-out prompt (before and after training).

    Called on the main process only, and only when there is held-out data and
    ``train.sample_max_new_tokens`` is above 0.

    :param run: the run.
    :param stage: ``"before"`` or ``"after"`` training.
    :param prompt: the prompt given to the model.
    :param completion: the model's answer.
    :param reference: the answer in the data.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_notice(run: "Run", message: str) -> None:
    """Something the user should know that is not an error: a setting against the guide's advice, or the
    micro-batch halved after running out of GPU memory.

    :param run: the run (its ``step`` may still be 0).
    :param message: one line.
    :returns: nothing.

    Every plugin's implementation is called, on every process; check ``run.is_main_process`` before printing.
    """


@hookspec
def qlora_on_mode(run: "Run", mode: str) -> None:
    """The loop switches between training and using the weights: ``"eval"`` before an evaluation, a sample
    answer, a checkpoint or the exports, ``"train"`` before the steps go on.

    An optimizer whose training weights differ from the weights it hands out (schedule-free AdamW keeps an
    interpolation point for its steps and an average to evaluate) swaps them here, so evaluations, checkpoints
    and the exported adapter hold the averaged weights and training resumes on its own. A run starts in
    ``"eval"`` (the evaluation before training), is switched to ``"train"`` before its first step (also on a
    resumed run) and ends in ``"eval"``; consecutive evaluations and saves make one switch.

    :param run: the run; ``run.optimizer`` and ``run.model`` are what to switch.
    :param mode: ``"train"`` or ``"eval"``.
    :returns: nothing.

    Every plugin's implementation is called, on every process.
    """


@hookspec
def qlora_on_save(run: "Run", path: "Path") -> None:
    """A checkpoint or an exporter's folder was written under the run folder (main process only).

    :param run: the run.
    :param path: the folder written.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_train_end(run: "Run", summary: "dict[str, Any]") -> None:
    """Training has finished (successfully).

    :param run: the run.
    :param summary: ``steps``, ``train_loss`` (last logged), ``first_loss``, ``eval_loss_before``,
        ``eval_loss_after``, ``train_seconds``, ``tokens_per_second`` and, on a GPU, ``peak_gpu_memory_gib``
        (training's peak, the largest over the processes) and ``peak_gpu_memory_loading_gib`` (before the first
        step: loading, and the evaluation and sample before training), and everywhere ``peak_cpu_memory_gib``
        and ``peak_cpu_memory_loading_gib``: the resident-memory peaks of a machine's processes, each process's
        own peak summed (an upper bound of the machine's), the largest over the machines.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_on_train_failed(run: "Run", error: BaseException, status: str) -> None:
    """The run stopped on an error or was interrupted; ``run.json`` says so. Nothing is exported.

    :param run: the run; ``run.step`` is the last completed step.
    :param error: the exception (``KeyboardInterrupt`` when interrupted).
    :param status: ``"failed"`` or ``"interrupted"``.
    :returns: nothing.

    Every plugin's implementation is called, on every process; the error is raised again afterwards.
    """


# --------------------------------------------------------------------------- export


@hookspec
def qlora_export(run: "Run", model: "torch.nn.Module", tokenizer: Any, output_dir: "Path") -> "Path | None":
    """Write the trained result in a format other tools load.

    Called on the main process only, after training.

    :param run: the run.
    :param model: the trained PEFT model.
    :param tokenizer: the tokenizer.
    :param output_dir: the run's folder; write into a sub-folder of it.
    :returns: the folder written, or ``None``.

    Every plugin's implementation is called.
    """


# --------------------------------------------------------------------------- tools


@hookspec(firstresult=True)
def qlora_dequantize_model(model: "torch.nn.Module", dtype: "torch.dtype") -> "torch.nn.Module | None":
    """Turn a quantized base model into a plain one, for ``qlora merge`` and the ``merged-export`` plugin.

    :param model: the base model as the quant strategy loaded it.
    :param dtype: the dtype of the plain weights.
    :returns: the model with every quantized layer replaced by a plain ``nn.Linear`` holding the weights the
        quantized forward computes with (in place or a new model), or ``None`` when this plugin did not
        quantize it.

    The first non-None result wins (a quant strategy implements it for its own layers).
    """


@hookspec
def qlora_plan_settings(settings: Any, config: "Config") -> None:
    """Tell ``qlora plan`` how this plugin changes a run's memory: adjust the estimate's settings in place.

    :param settings: the :class:`qlora_core.PlanSettings` of the estimate (``optimizer``,
        ``optimizer_bytes``, ``checkpointing``, ``offload``, ``fused_loss``, ``adapter_copy``,
        ``shard_adapters``, ``upcast``, ...), made from the config with the core's defaults (no plugin:
        an fp32 AdamW's 8 bytes per trainable parameter, every activation kept, the logits materialized).
    :param config: the config.
    :returns: nothing.

    Every plugin's implementation is called.
    """


@hookspec
def qlora_bench_variants() -> "dict[str, dict[str, Any]]":
    """Offer ``qlora bench`` variants: named runs beside ``qlora`` (the defaults), usually with one lever off.

    ``qlora bench`` asks every installed plugin, as the command line does for commands.

    :returns: ``{name: {"help": one line, "set": ["KEY=VALUE", ...], "plugins": ["NAME" or "no:NAME", ...],
        "ablation": True to run it under ``--ablations``}}``; or a variant with ``"run": callable(args,
        model_dir, device) -> dict`` for code that is not qlora's loop (the guide's recipe).

    Every plugin's result is used; a name offered twice is an error.
    """
