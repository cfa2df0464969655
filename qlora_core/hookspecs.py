"""The hooks a qlora plugin can implement.

Every hook is prefixed ``qlora_``. A plugin is any module or object with functions marked by
:data:`qlora_core.hookimpl`; it takes part in a run only when it is a default or the run asks for it
(``--plugin NAME`` or the config's ``plugins:`` list).

Hooks are grouped by the stage of a run at which they are called, in that order:

1. set-up: :func:`qlora_config_options`, :func:`qlora_configure`
2. model name: :func:`qlora_resolve_model` (the tokenizer is loaded first, for the data)
3. data: :func:`qlora_resolve_data`, :func:`qlora_dataset_formats`
4. model: :func:`qlora_quantization_config`, :func:`qlora_model_load_kwargs`, :func:`qlora_load_base_model`,
   :func:`qlora_model_loaded`, :func:`qlora_prepare_model`, :func:`qlora_adapter_targets`
5. distribution and optimizer: :func:`qlora_distribute_model`, :func:`qlora_optimizer`
6. training events (callbacks): the evaluation and sample before training (:func:`qlora_on_evaluate`,
   :func:`qlora_on_sample`), then :func:`qlora_on_train_start`, :func:`qlora_on_step_end` every step,
   :func:`qlora_on_evaluate` every ``train.eval_steps`` and at the end, :func:`qlora_on_save` for each
   checkpoint, :func:`qlora_on_notice` for what the user should know, the sample after training
7. export: :func:`qlora_export`, with :func:`qlora_on_save` for each folder written, then
   :func:`qlora_on_train_end`
8. tools: :func:`qlora_dequantize_model` (``qlora merge`` and the ``merged-export`` plugin)

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

hookspec = pluggy.HookspecMarker("qlora")

# Hooks that decide one single-choice concern each, with the concern's name for messages.
SINGLE_CHOICE_HOOKS: dict[str, str] = {
    "qlora_quantization_config": "quantization",
    "qlora_adapter_targets": "adapter targeting",
    "qlora_distribute_model": "distribution",
    "qlora_optimizer": "optimizer",
    "qlora_dataset_formats": "dataset format",
}


# --------------------------------------------------------------------------- set-up


@hookspec
def qlora_config_options() -> "list[Option]":
    """Declare the config keys this plugin reads, so they are validated like the core's.

    Keys are dotted (``"fsdp.sharding_strategy"``) and must not clash with another plugin's.

    :returns: a list of :class:`qlora_core.config.Option`.

    Every plugin's result is used.
    """


@hookspec
def qlora_configure(config: "Config", device: str) -> None:
    """Adjust or check the validated config before anything is loaded.

    Raise :class:`qlora_core.errors.UsageError` (or ``ConfigError``) to reject a combination.

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
    format whose :meth:`~qlora_core.types.DatasetFormat.matches` accepts the dataset's columns is used.

    :param config: the config.
    :returns: a sequence of :class:`qlora_core.types.DatasetFormat`.

    Every plugin's result is used; a requested formatter plugin replaces the default ones.
    """


# --------------------------------------------------------------------------- distribution


@hookspec(firstresult=True)
def qlora_distribute_model(model: "torch.nn.Module", accelerator: Any, config: "Config") -> "torch.nn.Module | None":
    """Wrap the PEFT model for training across the run's processes (sharding, gradient synchronisation).

    Called on every process, after the adapters are added (and, on ``--resume``, their weights loaded), before
    the optimizer is built. The wrapper must keep the adapters' parameters whole on every process (the
    optimizer, checkpoints and exports read them directly) and its ``no_sync()`` must skip gradient
    synchronisation for all but the last micro-batch of a step, as DDP's does. A wrapper may also carry a
    ``_qlora_after_backward`` callable: the trainer calls it once a step, after the last micro-batch's backward
    pass, for a synchronisation that needs the step's gradients complete (the fsdp plugin averages the
    adapters' gradients there in one all-reduce).

    :param model: the PEFT model, on this process's device.
    :param accelerator: the run's ``accelerate.Accelerator`` (``num_processes``, ``process_index``, ``device``).
    :param config: the config.
    :returns: the wrapped model, whose ``module`` attribute is ``model``; or ``None`` to leave the model to
        accelerate (DDP across several processes, nothing for one).

    The first non-None result wins; it is a single-choice concern.
    """


# --------------------------------------------------------------------------- optimizer


@hookspec(firstresult=True)
def qlora_optimizer(params: "list[torch.nn.Parameter]", config: "Config") -> "torch.optim.Optimizer | None":
    """Build the optimizer for the trainable parameters.

    :param params: the trainable parameters (the adapters).
    :param config: the config (``train.learning_rate``, ``train.weight_decay``, and any keys the plugin declares).
    :returns: a ``torch.optim.Optimizer``.

    The first non-None result wins; it is a single-choice concern.
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
        step: loading, and the evaluation and sample before training; under FSDP each GPU holds the whole model
        until it is sharded).
    :returns: nothing.

    Every plugin's implementation is called.
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
