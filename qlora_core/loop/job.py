"""A QLoRA run: resolve config and plugins, load tokenizer, data and model, train, evaluate, export.

:class:`Job` is the Python API; ``qlora run`` is a thin layer over it.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from qlora_core.framework.errors import UsageError
from qlora_core.framework.types import DatasetFormat, FormattedExample, Run
from qlora_core.loop.data import (IGNORE_INDEX, TokenizedExample, choose_format, collate, collate_packed,
                                  padding_waste, real_tokens, token_budget_batches, tokenize_rows,
                                  training_and_eval_rows)
from qlora_core.loop.determinism import deterministic, prepare_environment
from qlora_core.loop.record import RunRecord, RunResult, check_output_dir, prepare_output_dir
from qlora_core.loop.setup import compute_dtype_for, pick_device, resolve, run_config_file

if TYPE_CHECKING:
    import torch


def make_accelerator(cpu: bool, fp16: bool) -> Any:
    """The run's ``accelerate.Accelerator``: processes, devices, gradient synchronisation, the fp16 loss scaler.

    The loop autocasts to the compute dtype itself (:meth:`Job._autocast`), so accelerate's mixed precision is
    asked for only where a loss scaler is needed (fp16) and otherwise left as the process has it: a Python caller
    may run jobs of several compute dtypes, or a job after an Accelerator of its own, in one process (accelerate
    keeps one state per process and refuses another precision once it is set).
    """
    from accelerate import Accelerator

    try:
        return Accelerator(cpu=cpu, mixed_precision="fp16" if fp16 else None)
    except ValueError as e:
        raise UsageError(f"this process already runs accelerate with another mixed precision than a float16 "
                         f"run needs ({str(e).splitlines()[0]}); run it in a process of its own") from None


def input_device(model, default: Any = None) -> "torch.device":
    """Where the model takes its inputs: the device of its input embeddings (a model placed across GPU and
    CPU by ``device_map`` may start on either), else ``default``."""
    import torch

    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(p.device for p in model.parameters())
    if device.type == "meta":  # offloaded: accelerate's hooks bring the weights to the execution device
        return torch.device(default) if default is not None else torch.device("cuda")
    return device


def parameter_count(model) -> int:
    """Parameters of a model as loaded, counting each 4-bit weight by its original shape (bitsandbytes packs
    two values a byte, so ``numel()`` would halve them)."""
    import torch

    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += torch.Size(state.shape).numel() if state is not None else p.numel()
    return total


def model_inputs(batch) -> dict[str, Any]:
    """The model's keyword arguments for a micro-batch made by ``collate`` (padded) or ``collate_packed``.

    No cache: training never reuses one, and with one transformers does not look for packed sequences in
    ``position_ids`` (it would let packed examples attend to each other).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if "cu_seq_lens" in batch:  # one packed row, its examples' bounds for a variable-length attention
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = batch["cu_seq_lens"]
    return inputs


def _token_loss_sum(model, batch) -> "tuple[torch.Tensor, int]":
    """The core's loss, when no plugin's :func:`~qlora_core.hookspecs.qlora_compute_loss` answers: the sum of the
    next-token cross-entropy over the batch's answer tokens, from the model's logits, and their number."""
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = model(**model_inputs(batch)).logits
    loss = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


def _busiest_gpu_peak_gib(device, world: int) -> float:
    """The peak allocated GPU memory since the last reset, in GiB: the largest over the processes."""
    import torch

    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak) / 2**30


def _agree(control, world: int, device) -> None:
    """Across processes a flag a callback set on any one of them counts for all, so every process acts alike."""
    if world <= 1:
        return
    import torch

    asked = torch.tensor([control.should_stop, control.should_save, control.should_evaluate], dtype=torch.int32,
                         device=device)
    torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
    control.should_stop, control.should_save, control.should_evaluate = (bool(x) for x in asked.tolist())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` training examples in ``epoch``: a seeded permutation, the same on every run."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _probe_at(batch, probe: list[int]) -> tuple[int, int]:
    """Where a micro-batch holds the probe example's tokens: (row, first position), the last place they occur."""
    found = None
    n = len(probe)
    for r, row in enumerate(batch["input_ids"].tolist()):
        for start in range(len(row) - n + 1):
            if row[start:start + n] == probe:
                found = (r, start)
    if found is None:
        raise UsageError("train.packing: the run's micro-batches do not hold the packing check's probe example as "
                         "it was given (a collate plugin changed its tokens); set train.packing=false")
    return found


def packed_attention_errors(model, collate: "Callable[[Sequence[TokenizedExample]], Any] | None" = None
                            ) -> tuple[float, float]:
    """How far a packed example's logits are from the same example's logits alone.

    A probe example (4 random tokens) is run alone, packed after a 16-token example, and as the continuation of
    that example (one sequence, positions not restarting: the probe sees the other example's tokens, whatever
    the attention implementation). :returns: the relative distances of the packed logits and of the crossed
    logits from the lone ones; the first is rounding noise when attention stays within each example, the second
    is what crossing changes. ``collate`` makes the micro-batches from the examples (a run passes its own, so
    the check probes the batching it trains with); by default ``collate_packed``'s one row.
    """
    import torch

    collate = collate or collate_packed
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = inner.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    first, probe = (torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (16, 4))
    device = input_device(model)
    alone = collate([TokenizedExample(probe, probe)])
    packed = collate([TokenizedExample(first, first), TokenizedExample(probe, probe)])
    crossed = collate([TokenizedExample(first + probe, first + probe)])
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            out = []
            for b in (alone, packed, crossed):
                row, start = _probe_at(b, probe)
                logits = model(**model_inputs({k: v.to(device) for k, v in b.items()})).logits
                out.append(logits[row, start:start + len(probe)].float())
    except TypeError as e:
        raise UsageError(f"train.packing: the model does not take packed inputs (position_ids): {e}") from None
    finally:
        if was_training:
            model.train()
    scale = out[0].norm().clamp_min(1e-12)
    return float((out[1] - out[0]).norm() / scale), float((out[2] - out[0]).norm() / scale)


def check_packed_attention(model, collate: "Callable[[Sequence[TokenizedExample]], Any] | None" = None) -> None:
    """Refuse ``train.packing`` for a model whose attention would cross the packed examples.

    transformers keeps attention within each packed example from the restarting ``position_ids``: sdpa, eager
    and flex attention through a block-diagonal causal mask built by its masking utilities, flash attention
    through its variable-length kernel (cu_seqlens from the positions). A model built otherwise (remote code,
    an attention implementation that ignores both) would silently train on crossed attention. ``collate``: as
    for :func:`packed_attention_errors`.
    """
    packed, crossed = packed_attention_errors(model, collate)
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    attn = getattr(getattr(model, "config", None), "_attn_implementation", "?")
    if not crossed >= 1e-3:  # also NaN
        raise UsageError(f"train.packing: could not check that {name} with {attn} attention keeps packed examples "
                         f"apart (its logits hardly depend on the context: {crossed:.3g}); set train.packing=false")
    if not packed <= 0.1 * crossed:
        raise UsageError(f"train.packing: {name} with {attn} attention lets packed examples attend to each other "
                         f"(probe: {packed:.3g} from the example alone, crossing would give {crossed:.3g}); "
                         f"set train.packing=false")


class Job:
    """One configured QLoRA run.

    ``Job(config, plugins=[...], overrides=["lora.r=32"], output_dir="runs/x").run()`` is what
    ``qlora run CONFIG --plugin ... --set ... --output ...`` does. The steps are also usable one by one:
    :meth:`load_tokenizer`, :meth:`load_data`, :meth:`load_model`, :meth:`train`.
    """

    def __init__(self, config: str | Path | Mapping[str, Any] | None = None, *, plugins: Sequence[str] = (),
                 overrides: Sequence[Any] = (), output_dir: str | Path | None = None, overwrite: bool = False,
                 resume: str | Path | None = None):
        self._resume_from: Path | None = None
        if resume is not None:
            if config is not None or plugins:
                raise UsageError("--resume continues a run with its own config.yaml and plugins; give no CONFIG "
                                 "or --plugin (--set may change keys such as train.max_steps)")
            config, output_dir, overwrite = run_config_file(resume), None, False
            self._resume_from = Path(resume)
        self.config, self.plugins = resolve(config, plugins, overrides)
        if self.config["train.deterministic"]:
            prepare_environment()  # before anything starts cuBLAS
        self.device = pick_device()
        self.plugins.hook.qlora_configure(config=self.config, device=self.device)
        self.compute_dtype = compute_dtype_for(self.config, self.device)
        self._output_dir = output_dir
        self._overwrite = overwrite
        check_output_dir(output_dir, overwrite)  # refuse before spending minutes on loading
        self._model_path: str | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.format: DatasetFormat | None = None
        self.train_examples: list[TokenizedExample] = []
        self.eval_examples: list[TokenizedExample] = []
        self.eval_formatted: list[FormattedExample] = []  # the same held-out rows, as text
        self.eval_split: str | None = None  # where the held-out rows come from, for reports
        self.num_parameters = 0  # of the base model, once loaded
        self.sample: FormattedExample | None = None
        self.distributed_by_plugin = False  # a qlora_distribute_model plugin wrapped the model (FSDP)
        self._order_cache: dict[str, Any] = {}
        self._packing_checked = False

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    def model_path(self) -> str:
        """``model.name_or_path`` as resolved by the plugins (asked once per job)."""
        if self._model_path is None:
            name = self.config["model.name_or_path"]
            self._model_path = self.hook.qlora_resolve_model(name_or_path=name, config=self.config) or name
        return self._model_path

    def load_tokenizer(self, path: str | Path | None = None) -> Any:
        """The model's tokenizer (or the one saved in ``path``, e.g. a run's adapter folder), with a pad token."""
        from transformers import AutoTokenizer

        revision = self.config["model.revision"] if path is None else None
        path = self.model_path() if path is None else path
        try:
            tok = self.hook.qlora_load_tokenizer(name_or_path=str(path), config=self.config)
            if tok is None:
                tok = AutoTokenizer.from_pretrained(path, revision=revision,
                                                    trust_remote_code=self.config["model.trust_remote_code"])
        except (OSError, ValueError) as e:
            raise UsageError(f"could not load the tokenizer of model {self.config['model.name_or_path']!r}: "
                             f"{str(e).strip().splitlines()[0]} (check model.name_or_path)") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        return tok

    def _formats(self) -> tuple[list[DatasetFormat], bool]:
        formats: list[DatasetFormat] = []
        for offered in self.hook.qlora_dataset_formats(config=self.config):
            formats.extend(offered or [])
        providers = self.plugins.implementers("qlora_dataset_formats")
        forced = any(i.requested for i in self.plugins.infos if i.name in providers)
        return formats, forced

    def _data_path(self, path: str) -> str:
        return self.hook.qlora_resolve_data(path=path, config=self.config) or path

    def load_data(self) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
        """Load, format and tokenize the training and held-out data."""
        cfg = self.config
        if self.tokenizer is None:
            self.load_tokenizer()
        train_rows, eval_rows, self.eval_split = training_and_eval_rows(cfg, self._data_path)
        formats, forced = self._formats()
        self.format = choose_format(formats, list(train_rows.column_names), cfg["data.format"], forced)
        _, self.train_examples = tokenize_rows(train_rows, self.format, self.tokenizer, cfg, "training data")
        self.eval_formatted, self.eval_examples = [], []
        if eval_rows is not None and len(eval_rows):
            self.eval_formatted, self.eval_examples = tokenize_rows(eval_rows, self.format, self.tokenizer, cfg,
                                                                    "eval data")
        self.sample = self.eval_formatted[0] if self.eval_formatted else None
        return self.train_examples, self.eval_examples

    def load_base_model(self, for_training: bool = True) -> Any:
        """Load the base model, quantized by the quant plugin; for training, also prepared by the plugins
        (k-bit preparation, gradient checkpointing)."""
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM

        cfg = self.config
        if self.tokenizer is None:
            self.load_tokenizer()
        kwargs: dict[str, Any] = {
            "dtype": self.compute_dtype,
            # Each process loads onto its own GPU (LOCAL_RANK under torchrun / accelerate launch).
            "device_map": {"": PartialState().device} if self.device == "cuda" else {"": "cpu"},
            "revision": cfg["model.revision"],
            "trust_remote_code": cfg["model.trust_remote_code"],
        }
        kwargs.update(self.hook.qlora_quantization_config(config=cfg, compute_dtype=self.compute_dtype) or {})
        self.hook.qlora_model_load_kwargs(kwargs=kwargs, config=cfg)
        try:
            model = self.hook.qlora_load_base_model(name_or_path=self.model_path(), kwargs=kwargs, config=cfg)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(self.model_path(), **kwargs)
        except OSError as e:
            raise UsageError(f"could not load model {cfg['model.name_or_path']!r}: "
                             f"{str(e).strip().splitlines()[0]} (check model.name_or_path)") from None
        self.hook.qlora_model_loaded(model=model, config=cfg, for_training=for_training)
        if for_training:
            self.hook.qlora_prepare_model(model=model, config=cfg)
        return model

    def load_model(self, base: Any = None) -> Any:
        """Load the base model (quantized by the quant plugin), prepare it and add LoRA adapters.

        :param base: an already loaded base model to prepare and adapt instead (``qlora bench`` builds one
            straight into 4 bits from a config alone).
        """
        import torch
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        if base is None:
            model = self.load_base_model(for_training=True)
        else:
            model = base
            self.hook.qlora_model_loaded(model=model, config=cfg, for_training=True)
            self.hook.qlora_prepare_model(model=model, config=cfg)
        self.num_parameters = parameter_count(model)
        targets = self.hook.qlora_adapter_targets(model=model, config=cfg) or cfg["lora.target_modules"]
        lora = LoraConfig(r=cfg["lora.r"], lora_alpha=cfg["lora.lora_alpha"], lora_dropout=cfg["lora.lora_dropout"],
                          target_modules=targets, bias=cfg["lora.bias"], task_type="CAUSAL_LM")
        self.hook.qlora_adapter_config(lora_config=lora, model=model, config=cfg)
        torch.manual_seed(cfg["train.seed"])
        self.model = get_peft_model(model, lora)
        self.hook.qlora_adapter_model(model=self.model, config=cfg)
        return self.model

    @classmethod
    def from_run(cls, run_dir: str | Path, overrides: Sequence[Any] = ()) -> "Job":
        """The job of a finished (or checkpointed) run, rebuilt from its ``config.yaml`` with the same plugins;
        for evaluation, generation and merging. It has no output folder: nothing is written unless a caller
        does."""
        return cls(run_config_file(run_dir), overrides=overrides)

    # ------------------------------------------------------------------ training

    def run(self) -> RunResult:
        """Load everything, train, evaluate and export; the whole of ``qlora run``."""
        import torch

        if self.config["train.num_threads"] > 0:
            torch.set_num_threads(self.config["train.num_threads"])
        if self.tokenizer is None:
            self.load_tokenizer()
        if not self.train_examples:
            self.load_data()
        if self.model is None:
            self.load_model()
        return self.train()

    def train(self) -> RunResult:
        """Train the loaded model on the loaded data; write metrics, checkpoints, exports and the run's record.

        A job made with ``resume=RUN_DIR`` continues from that folder's latest complete checkpoint.
        """
        import torch
        from transformers import get_scheduler

        from qlora_core.loop.checkpoint import latest_checkpoint, load_adapter_weights, load_checkpoint

        cfg = self.config
        accelerator = make_accelerator(cpu=self.device == "cpu",
                                       fp16=self.device == "cuda" and self.compute_dtype == torch.float16)
        if self._resume_from is not None:
            out = Path(self._resume_from)
        elif accelerator.is_main_process:
            out = prepare_output_dir(self._output_dir, self._overwrite)
        else:
            out = Path(self._output_dir or "runs/unnamed")
        accelerator.wait_for_everyone()  # the run folder exists before any process goes on
        ckpt = None
        if self._resume_from is not None:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise UsageError(f"run folder {str(out)!r} has no complete checkpoint to resume from "
                                 f"(checkpoints are written every train.save_steps steps)")
            load_adapter_weights(ckpt, self.model)  # before a plugin shards the model
        model = self.hook.qlora_distribute_model(model=self.model, accelerator=accelerator, config=cfg)
        self.distributed_by_plugin = model is not None
        if model is None:
            # DDP across processes; one process trains the model as it is (accelerate would only wrap its forward
            # in an autocast of the process's precision, which the loop does itself).
            model = accelerator.prepare_model(self.model, device_placement=False) \
                if accelerator.num_processes > 1 else self.model
        params = [p for p in model.parameters() if p.requires_grad]
        chosen = self.hook.qlora_optimizer_params(params=params, model=model, config=cfg)
        if chosen is not None:
            params = list(chosen)  # what the optimizer steps and gradient clipping works on
        optimizer = self.hook.qlora_optimizer(params=params, config=cfg)
        if optimizer is None:
            raise UsageError("no optimizer plugin is active; add one, e.g. --plugin adamw")
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)

        per_step = self._examples_per_step(accelerator.num_processes)
        if cfg["train.max_steps"] > 0:
            max_steps = cfg["train.max_steps"]
        else:
            max_steps = max(1, math.ceil(cfg["train.num_train_epochs"] * len(self.train_examples) / per_step))
        scheduler = self.hook.qlora_lr_scheduler(optimizer=optimizer, num_training_steps=max_steps, config=cfg)
        if scheduler is None:
            scheduler = get_scheduler(cfg["train.lr_scheduler_type"], optimizer,
                                      num_warmup_steps=cfg["train.warmup_steps"], num_training_steps=max_steps)

        state = TrainState(micro_batch_size=cfg["train.per_device_train_batch_size"])
        rng = None
        if ckpt is not None:
            saved, rng = load_checkpoint(ckpt, None, optimizer, scheduler)
            state = TrainState(**saved)
            if state.step >= max_steps:
                raise UsageError(f"the run already reached step {state.step} of {max_steps}; raise "
                                 f"train.max_steps (--set train.max_steps=N) to train further")

        run = Run(config=cfg, output_dir=out, max_steps=max_steps, is_main_process=accelerator.is_main_process,
                  device=str(accelerator.device), compute_dtype=str(self.compute_dtype).replace("torch.", ""),
                  model=model, tokenizer=self.tokenizer, accelerator=accelerator,
                  num_train_examples=len(self.train_examples), num_eval_examples=len(self.eval_examples),
                  max_micro_batch_tokens=self._max_micro_batch_tokens(), notify=self.hook.qlora_on_notice)
        run.step = state.step
        if ckpt is not None:
            self.hook.qlora_on_resume(run=run, checkpoint=ckpt)
        if self.num_parameters:
            from qlora_core.tools.plan import guidance_warnings

            for message in guidance_warnings(cfg, self.num_parameters, accelerator.num_processes):
                self.hook.qlora_on_notice(run=run, message=message)
        if cfg["train.packing"]:
            with self._autocast():
                self._check_packing(model)
        if state.step == 0:
            # This process's micro-batches of the first epoch, in the order they will be trained on.
            mine = self._step_examples(0, len(self.train_examples), accelerator.process_index,
                                       accelerator.num_processes)
            waste = padding_waste(mine, state.micro_batch_size)
            if cfg["train.packing"]:
                waste["packed_filler_waste"] = self._filler_waste(mine, state.micro_batch_size)
            state.summary["padding_waste"] = waste
            if cfg["train.packing"] or waste["padding_waste"] >= 0.2:
                self.hook.qlora_on_notice(run=run, message=self._padding_message(waste))
        record = RunRecord(out, accelerator.is_main_process)
        if state.step:
            record.resume(cfg, self.plugins, state.step)
        else:
            record.start(cfg, self.plugins)
        try:
            with deterministic(cfg["train.deterministic"]):
                result = self._loop(run, model, optimizer, scheduler, accelerator, record, state, rng, params)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            record.finish(status, error=e)
            self.hook.qlora_on_train_failed(run=run, error=e, status=status)
            raise
        record.finish("completed")
        return result

    def _check_packing(self, model) -> None:
        """Refuse packing for a model whose attention would cross the packed examples, probing it with the
        micro-batches the run makes (:meth:`_collate`)."""
        if not self._packing_checked:
            check_packed_attention(model, self._collate)
            self._packing_checked = True

    def _filler_waste(self, examples: Sequence[TokenizedExample], micro_batch_size: int) -> float:
        """The share of the tokens computed on ``examples`` (this process's, in order) that is filler: each step's
        examples in the run's micro-batches (:meth:`_micro_batches`), made by :meth:`_collate`, their real tokens
        against all they hold (``input_ids``)."""
        step = micro_batch_size * self.config["train.gradient_accumulation_steps"]
        computed = real = 0
        for i in range(0, len(examples), step):
            for group in self._micro_batches(examples[i:i + step], micro_batch_size):
                batch = self._collate(group)
                computed += batch["input_ids"].numel()
                real += real_tokens(batch)
        return (computed - real) / computed if computed else 0.0

    def _padding_message(self, waste: dict[str, Any]) -> str:
        mb, share = waste["micro_batch_size"], f"{waste['padding_waste']:.1%}"
        counts = f"{waste['padding_tokens']:,} of {waste['padded_tokens']:,} tokens an epoch"
        if self.config["train.packing"]:
            return (f"packing: micro-batches of up to {mb} x train.max_seq_length tokens "
                    f"({waste.get('packed_filler_waste', 0.0):.1%} filler); "
                    f"padded micro-batches of {mb} would be {share} padding ({counts})")
        return (f"padding: {share} of the tokens in micro-batches of {mb} are padding ({counts}); "
                f"train.packing=true would compute only the {waste['real_tokens']:,} real ones")

    def _collate(self, examples: Sequence[TokenizedExample]) -> "dict[str, torch.Tensor]":
        """One micro-batch: with ``train.packing`` packed into rows of up to ``train.max_seq_length`` tokens
        (attention within each example costs what it would unpacked: one long row would cost its square), else
        right-padded. A plugin's :func:`~qlora_core.hookspecs.qlora_collate` comes first."""
        batch = self.hook.qlora_collate(examples=examples, config=self.config, pad_token_id=self.tokenizer.pad_token_id)
        if batch is not None:
            return batch
        if self.config["train.packing"]:
            return collate_packed(examples, self.config["train.max_seq_length"], self.tokenizer.pad_token_id)
        return collate(examples, self.tokenizer.pad_token_id)

    def _micro_batches(self, examples: Sequence[TokenizedExample], size: int) -> list[list[TokenizedExample]]:
        """A step's examples in micro-batches: of ``size`` examples, or with ``train.packing`` of up to
        ``size x train.max_seq_length`` tokens (packed into rows by :meth:`_collate`)."""
        if self.config["train.packing"]:
            return token_budget_batches(examples, size * self.config["train.max_seq_length"])
        return [list(examples[i:i + size]) for i in range(0, len(examples), size)]

    def _examples_per_step(self, world: int) -> int:
        """Examples in one optimizer step across all processes: the effective batch."""
        cfg = self.config
        return cfg["train.per_device_train_batch_size"] * cfg["train.gradient_accumulation_steps"] * world

    def _epoch_order(self, epoch: int) -> list[int]:
        """The data order of one epoch: a seeded permutation, the same for a run and its resumption."""
        if self._order_cache.get("epoch") != epoch:
            self._order_cache = {"epoch": epoch, "order": epoch_order(len(self.train_examples),
                                                                      self.config["train.seed"], epoch)}
        return self._order_cache["order"]

    def _step_examples(self, start: int, count: int, rank: int, world: int) -> list[TokenizedExample]:
        """This process's share of the examples ``start .. start+count`` of the endless epoch-by-epoch stream."""
        n = len(self.train_examples)
        ids: list[int] = []
        pos = start
        while len(ids) < count:
            epoch, offset = divmod(pos, n)
            take = min(count - len(ids), n - offset)
            ids.extend(self._epoch_order(epoch)[offset:offset + take])
            pos += take
        return [self.train_examples[i] for i in ids[rank::world]]

    def evaluate(self, model: Any = None, accelerator: Any = None) -> dict[str, float]:
        """Mean loss per answer token over the held-out data (and its perplexity)."""
        import torch

        model = model if model is not None else self.model
        device = input_device(model)
        was_training = model.training
        model.eval()
        bs = self.config["train.per_device_eval_batch_size"]
        total = torch.zeros((), dtype=torch.float64, device=device)
        tokens = 0
        ctx = self._autocast()
        with torch.no_grad(), ctx:
            if self.config["train.packing"]:
                self._check_packing(model)
            for i in range(0, len(self.eval_examples), bs):
                batch = {k: v.to(device) for k, v in self._collate(self.eval_examples[i:i + bs]).items()}
                loss, n = self._loss(model, batch)
                total += loss.double()
                tokens += n
        if was_training:
            model.train()
        loss = float(total) / max(1, tokens)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}

    def _autocast(self):
        """Autocast to the compute dtype on a GPU (bf16 or fp16); float32 and the CPU compute as they are."""
        import torch

        if self.device != "cuda" or self.compute_dtype not in (torch.bfloat16, torch.float16):
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.compute_dtype)

    def _loss(self, model, batch) -> "tuple[torch.Tensor, int]":
        """A micro-batch's summed answer-token loss and its answer tokens: a plugin's
        :func:`~qlora_core.hookspecs.qlora_compute_loss`, else the core's cross-entropy."""
        found = self.hook.qlora_compute_loss(model=model, batch=batch, config=self.config)
        if found is not None:
            loss, n = found
            return loss, int(n)
        return _token_loss_sum(model, batch)

    def generate(self, prompt: str, max_new_tokens: int, add_special_tokens: bool = True, model: Any = None) -> str:
        """Greedy answer of the model to a formatted prompt."""
        from qlora_core.tools.inference import generate

        model = model if model is not None else self.model
        return generate(model, self.tokenizer, prompt, max_new_tokens, add_special_tokens=add_special_tokens)

    def _show_sample(self, run: Run, stage: str) -> None:
        n = self.config["train.sample_max_new_tokens"]
        if self.sample is None or n == 0:
            return
        if self.distributed_by_plugin:
            # Generation calls the model's inner modules, around the wrapper: a sharded model cannot run it.
            if stage == "before":
                self.hook.qlora_on_notice(run=run, message="no sample answers while the model is sharded across "
                                                           "processes; after the run: qlora generate RUN_DIR")
            return
        if not run.is_main_process:
            return
        prompt, reference = self.sample.prompt_and_answer()
        completion = self.generate(prompt, n, self.sample.add_special_tokens, model=run.model)
        eos = self.tokenizer.eos_token or ""
        reference = reference[: -len(eos)] if eos and reference.endswith(eos) else reference
        self.hook.qlora_on_sample(run=run, stage=stage, prompt=prompt, completion=completion,
                                  reference=reference.strip())

    def _forward_backward(self, model, examples, state, accelerator, run) -> tuple[float, int, int]:
        """Forward and backward over one optimizer step's examples, split into micro-batches: of
        ``micro_batch_size`` examples, or with ``train.packing`` of up to ``micro_batch_size x max_seq_length``
        tokens each (the same examples make the same step either way).

        Out of GPU memory with ``train.auto_find_batch_size``, the micro-batch is halved (and so the number of
        micro-batches, the gradient accumulation, doubled: the same examples make the same step) and the step
        is tried again. Returns (loss summed over answer tokens, answer tokens, tokens), over all processes.
        """
        import torch

        cfg = self.config
        device = input_device(model, accelerator.device)
        world = accelerator.num_processes
        while True:
            size = state.micro_batch_size
            groups = self._micro_batches(examples, size)
            batches = [{k: v.to(device) for k, v in self._collate(group).items()} for group in groups]
            targets = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                                   device=device)
            tokens = torch.tensor(sum(real_tokens(b) for b in batches), device=device)
            if world > 1:
                targets = accelerator.reduce(targets, reduction="sum")
                tokens = accelerator.reduce(tokens, reduction="sum")
            n_targets = max(1, int(targets))
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            try:
                for i, batch in enumerate(batches):
                    sync = nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
                    with sync, self._autocast():
                        part, _ = self._loss(model, batch)
                        # Normalise by the answer tokens of the whole step (all micro-batches, all processes),
                        # not per micro-batch; DDP/FSDP average gradients over processes, hence the factor.
                        accelerator.backward(part * world / n_targets)
                    loss_sum += part.detach().double()
            except torch.OutOfMemoryError:
                del batches
                model.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not cfg["train.auto_find_batch_size"] or size == 1:
                    raise UsageError(self._oom_message(run, size)) from None
                state.micro_batch_size = size // 2
                accum = math.ceil(len(examples) / state.micro_batch_size)
                self.hook.qlora_on_notice(
                    run=run, message=f"out of GPU memory at step {state.step + 1}: micro-batch {size} -> "
                                     f"{state.micro_batch_size}, gradient accumulation -> {accum} "
                                     f"(the effective batch is unchanged); going on")
                continue
            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, reduction="sum")
            return float(loss_sum), n_targets, int(tokens)

    def _max_micro_batch_tokens(self) -> int:
        """The most tokens a micro-batch holds (batch x sequence): with packing, micro-batch x max_seq_length;
        padded, micro-batch x the longest example."""
        cfg = self.config
        size = cfg["train.per_device_train_batch_size"]
        longest = max((len(x.input_ids) for x in self.train_examples), default=0)
        width = cfg["train.max_seq_length"] if cfg["train.packing"] else min(longest, cfg["train.max_seq_length"])
        return size * width

    def _oom_message(self, run: Run, size: int) -> str:
        from qlora_core.loop.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(run.output_dir)
        kept = f"; the last checkpoint, {ckpt}, is kept (resume with qlora run --resume {run.output_dir})" \
            if ckpt else ""
        return (f"out of GPU memory at step {run.step + 1} with a micro-batch of {size}: set "
                f"train.auto_find_batch_size=true, or lower train.per_device_train_batch_size and raise "
                f"train.gradient_accumulation_steps, lower lora.r or train.max_seq_length, keep gradient "
                f"checkpointing on, or add --plugin cpu-offload{kept}")

    def _loop(self, run: Run, model, optimizer, scheduler, accelerator, record: "RunRecord", state: "TrainState",
              rng: dict | None, params: list) -> RunResult:
        """The steps, the evaluations, the checkpoints and the exports; ``params``: what the optimizer steps (and
        gradient clipping works on)."""
        import torch

        from qlora_core.loop.checkpoint import save_checkpoint, set_rng_state

        cfg = self.config
        hook = self.hook
        device = accelerator.device
        world, rank = accelerator.num_processes, accelerator.process_index
        per_step = self._examples_per_step(world)
        n = len(self.train_examples)
        if state.step == 0:
            if self.eval_examples:
                ev = self.evaluate(model, accelerator)
                state.summary["eval_loss_before"] = ev["eval_loss"]
                record.metric({"step": 0, **ev})
                hook.qlora_on_evaluate(run=run, metrics={"step": 0, **ev})
            self._show_sample(run, "before")
        run.step = state.step
        hook.qlora_on_train_start(run=run)
        if rng is not None:
            set_rng_state(rng)  # last, so nothing before the first resumed step draws from them

        if device.type == "cuda":
            # Loading (and FSDP's sharding, which starts from the whole model on each GPU) and the evaluation
            # before training peak apart from training: both are reported, the per-step figures training's own.
            state.summary.setdefault("peak_gpu_memory_loading_gib", _busiest_gpu_peak_gib(device, world))
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        started = time.perf_counter() - state.train_seconds
        for step in range(state.step + 1, run.max_steps + 1):
            t0 = time.perf_counter()
            examples = self._step_examples(state.examples_seen, per_step, rank, world)
            lr = scheduler.get_last_lr()[0]
            hook.qlora_on_step_begin(run=run, step=step)
            loss_sum, n_targets, tokens = self._forward_backward(model, examples, state, accelerator, run)
            hook.qlora_on_after_backward(run=run, model=model, optimizer=optimizer)
            grad_norm = None
            if cfg["train.max_grad_norm"] > 0:
                grad_norm = accelerator.clip_grad_norm_(params, cfg["train.max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_before = state.examples_seen // n
            state.examples_seen += per_step
            state.step = run.step = step
            step_loss = loss_sum / n_targets
            if not math.isfinite(step_loss):
                raise UsageError(f"the loss became {step_loss} at step {step}; lower train.learning_rate "
                                 f"(now {cfg['train.learning_rate']:g}) or train.max_grad_norm")
            seconds = time.perf_counter() - t0
            state.all_tokens += tokens
            metrics = {"step": step, "epoch": round(state.examples_seen / n, 4), "loss": step_loss,
                       "learning_rate": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9),
                       "elapsed": time.perf_counter() - started}
            if device.type == "cuda":
                metrics["gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            state.summary.setdefault("first_loss", step_loss)
            w = state.window
            w["loss"] += loss_sum
            w["targets"] += n_targets
            w["tokens"] += tokens
            w["seconds"] += seconds
            hook.qlora_on_step_end(run=run, metrics=metrics)
            if step % cfg["train.logging_steps"] == 0 or step == run.max_steps or run.control.should_stop:
                logged = dict(metrics, loss=w["loss"] / w["targets"],
                              tokens_per_second=w["tokens"] / max(w["seconds"], 1e-9))
                record.metric(logged)
                hook.qlora_on_log(run=run, metrics=logged)
                state.summary["train_loss"] = logged["loss"]
                state.window = dict(_EMPTY_WINDOW)
            epochs_done = state.examples_seen // n
            for epoch in range(epoch_before + 1, epochs_done + 1):
                hook.qlora_on_epoch_end(run=run, epoch=epoch)
            control = run.control
            _agree(control, world, device)
            if self.eval_examples and step != run.max_steps and not control.should_stop and (
                    control.should_evaluate or (cfg["train.eval_steps"] and step % cfg["train.eval_steps"] == 0)):
                ev = {"step": step, **self.evaluate(model, accelerator)}
                record.metric(ev)
                hook.qlora_on_evaluate(run=run, metrics=ev)
                _agree(control, world, device)  # an evaluation callback may ask to stop (early stopping)
            stopping = control.should_stop and step != run.max_steps
            strategy = cfg["train.save_strategy"]
            save = step != run.max_steps and (
                control.should_save
                or (stopping and strategy != "no")
                or (strategy == "steps" and step % cfg["train.save_steps"] == 0)
                or (strategy == "epoch" and epochs_done > epoch_before))
            control.should_stop = control.should_save = control.should_evaluate = False
            if save:
                state.train_seconds = time.perf_counter() - started
                if run.is_main_process:
                    path = save_checkpoint(run.output_dir, step, accelerator.unwrap_model(model), optimizer,
                                           scheduler, state.to_dict(), cfg, self.plugins,
                                           keep=cfg["train.save_total_limit"])
                    hook.qlora_on_save(run=run, path=path)
                accelerator.wait_for_everyone()
            if stopping:
                state.summary["stopped_at_step"] = step
                hook.qlora_on_notice(run=run, message=f"a plugin stopped the run after step {step} of "
                                                      f"{run.max_steps}")
                break
        summary = state.summary
        summary["steps"] = run.step
        train_seconds = time.perf_counter() - started
        summary["train_seconds"] = train_seconds
        summary["tokens_per_second"] = state.all_tokens / max(train_seconds, 1e-9)
        if device.type == "cuda":
            summary["peak_gpu_memory_gib"] = _busiest_gpu_peak_gib(device, world)
        if self.eval_examples:
            ev = {"step": run.step, **self.evaluate(model, accelerator)}
            summary["eval_loss_after"] = ev["eval_loss"]
            record.metric(ev)
            hook.qlora_on_evaluate(run=run, metrics=ev)
        self._show_sample(run, "after")
        exports: list[Path] = []
        if run.is_main_process:
            for path in hook.qlora_export(run=run, model=model, tokenizer=self.tokenizer, output_dir=run.output_dir):
                if path is not None:
                    exports.append(Path(path))
                    hook.qlora_on_save(run=run, path=Path(path))
        accelerator.wait_for_everyone()
        hook.qlora_on_train_end(run=run, summary=summary)
        record.summary = summary
        return RunResult(run.output_dir, run.step, record.metrics, summary, exports)


_EMPTY_WINDOW = {"loss": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}


@dataclass
class TrainState:
    """Where a run stands, besides the weights and the optimizer: what a checkpoint needs to continue exactly.

    :ivar step: optimizer steps taken.
    :ivar examples_seen: position in the endless stream of training examples (epoch after epoch).
    :ivar micro_batch_size: per-device micro-batch (halved by ``train.auto_find_batch_size`` on OOM).
    :ivar window: sums since the last logged step (loss, answer tokens, tokens, seconds).
    :ivar summary: figures for the end-of-run summary gathered so far.
    """

    step: int = 0
    examples_seen: int = 0
    micro_batch_size: int = 1
    window: dict[str, float] = field(default_factory=lambda: dict(_EMPTY_WINDOW))
    summary: dict[str, Any] = field(default_factory=lambda: {"eval_loss_before": None, "eval_loss_after": None})
    all_tokens: int = 0
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}
