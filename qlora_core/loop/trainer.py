"""The training loop: the run's accelerator, distribution, optimizer and schedule, the steps with their
micro-batches and out-of-memory retry, evaluation, samples, checkpoints, the exports, and the callbacks at each
stage (:mod:`qlora_core.hookspecs`).
"""

from __future__ import annotations

import copy
import errno
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_core.framework.errors import UsageError
from qlora_core.framework.types import Run
from qlora_core.loop.batching import Batching
from qlora_core.loop.data import IGNORE_INDEX, padding_waste_of_lengths, real_tokens
from qlora_core.loop.determinism import deterministic
from qlora_core.loop.interrupt import Interrupted, StopSignals
from qlora_core.loop.loss import check_packed_attention, compute_loss
from qlora_core.loop.model import input_device
from qlora_core.loop.record import (RunLock, RunRecord, RunResult, default_output_dir, prepare_output_dir,
                                    run_status)

if TYPE_CHECKING:
    import torch


def make_accelerator(cpu: bool, fp16: bool) -> Any:
    """The run's ``accelerate.Accelerator``: processes, devices, gradient synchronisation, the fp16 loss scaler.

    The loop autocasts to the compute dtype itself (:meth:`Trainer._autocast`), so accelerate's mixed precision is
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


def _busiest_gpu_peak_gib(device, world: int) -> float:
    """The peak allocated GPU memory since the last reset, in GiB: the largest over the processes."""
    import torch

    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak) / 2**30


def _host_cpu_peak_gib(world: int) -> float:
    """The resident-memory peak so far of this machine's processes of the run, each process's own peak summed
    (which bounds the machine's peak from above), in GiB: the largest over the machines."""
    import resource
    import socket
    import sys

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peaks = [(socket.gethostname(), own)]
    if world > 1:
        import torch

        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, (socket.gethostname(), own))
    by_host: dict[str, int] = {}
    for host, peak in peaks:
        by_host[host] = by_host.get(host, 0) + peak
    return max(by_host.values()) / 2**30


def _agree(control, world: int, device, signals: "StopSignals | None" = None) -> None:
    """Across processes a flag a callback set on any one of them counts for all, so every process acts alike; so
    does a stop signal (``signals``) one of them received."""
    if world <= 1:
        return
    import torch

    signum = signals.received if signals is not None and signals.received is not None else 0
    asked = torch.tensor([control.should_stop, control.should_save, control.should_evaluate, signum],
                         dtype=torch.int32, device=device)
    torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
    stop, save, evaluate, signum = asked.tolist()
    control.should_stop, control.should_save, control.should_evaluate = bool(stop), bool(save), bool(evaluate)
    if signals is not None and signum:
        signals.received = int(signum)


def _completed(run_dir: Path) -> bool:
    """Whether a run folder's ``run.json`` says the run completed (its evaluation and exports done)."""
    return (run_status(run_dir) or {}).get("status") == "completed"


_DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
#: Examples per process whose packed rows are made to measure packing's filler before training.
FILLER_SAMPLE = 4096


class Trainer:
    """Trains a job's loaded model on its loaded data (:meth:`train`), and evaluates it (:meth:`evaluate`).

    :param job: the :class:`~qlora_core.loop.job.Job` whose config, plugins, tokenizer, data and model it uses.
    """

    def __init__(self, job: Any):
        self.job = job
        self.config = job.config
        self.hook = job.hook
        self.batching = Batching(job.config, job.hook, job.tokenizer.pad_token_id, job.train_examples)
        self._packing_checked = False
        self._mode: str | None = None  # "train" or "eval", as the plugins were last told (qlora_on_mode)
        self._lock = RunLock()

    def train(self) -> RunResult:
        """Train the loaded model on the loaded data; write metrics, checkpoints, exports and the run's record.

        A job made with ``resume=RUN_DIR`` continues from that folder's latest complete checkpoint.
        """
        import torch
        from transformers import get_scheduler

        from qlora_core.loop.checkpoint import latest_checkpoint, load_adapter_weights, load_checkpoint

        cfg = self.config
        accelerator = make_accelerator(cpu=self.job.device == "cpu",
                                       fp16=self.job.device == "cuda" and self.job.compute_dtype == torch.float16)
        # The main process holds the run folder's lock from here to the end of the run (a second run into the
        # same folder is refused while this one lives).
        lock = self._lock = RunLock()
        try:
            if self.job.resume_from is not None:
                out = Path(self.job.resume_from)
                if accelerator.is_main_process:
                    lock.acquire(out)
            elif accelerator.is_main_process:
                out = prepare_output_dir(self.job.output_dir or default_output_dir(), self.job.overwrite, lock)
            else:
                out = Path(self.job.output_dir or "runs/unnamed")
            accelerator.wait_for_everyone()  # the run folder exists before any process goes on
            return self._train(accelerator, out)
        finally:
            lock.release()

    def _train(self, accelerator, out: Path) -> RunResult:
        import torch
        from transformers import get_scheduler

        from qlora_core.loop.checkpoint import (checkpoint_dirs, latest_checkpoint, load_adapter_weights,
                                                load_checkpoint, resumable_checkpoint, set_aside)

        cfg = self.config
        ckpt, passed_over = None, []
        if self.job.resume_from is not None:
            ckpt, passed_over = resumable_checkpoint(out)  # the newest intact one
            if ckpt is None:
                raise UsageError(f"run folder {str(out)!r} has no complete checkpoint to resume from "
                                 f"(checkpoints are written every train.save_steps steps)")
            if accelerator.is_main_process:
                # What a run killed while writing a checkpoint, or deleting an old one, left behind.
                for partial in [*(out / "checkpoints").glob(".step-*.partial"),
                                *(out / "checkpoints").glob(".step-*.removed")]:
                    shutil.rmtree(partial, ignore_errors=True)
            if passed_over and accelerator.is_main_process:
                # The refused newer checkpoints are set aside (hidden, not deleted), so that neither the next
                # resume nor train.save_total_limit's pruning takes them for checkpoints of this run.
                for newer in checkpoint_dirs(out):
                    if newer.name > ckpt.name:
                        set_aside(newer)
            load_adapter_weights(ckpt, self.job.model)  # before a plugin shards the model
        model = self.hook.qlora_distribute_model(model=self.job.model, accelerator=accelerator, config=cfg)
        self.job.distributed_by_plugin = model is not None
        if model is None:
            # DDP across processes; one process trains the model as it is (accelerate would only wrap its forward
            # in an autocast of the process's precision, which the loop does itself).
            model = accelerator.prepare_model(self.job.model, device_placement=False) \
                if accelerator.num_processes > 1 else self.job.model
        params = [p for p in model.parameters() if p.requires_grad]
        chosen = self.hook.qlora_optimizer_params(params=params, model=model, config=cfg)
        if chosen is not None:
            params = list(chosen)  # what the optimizer steps and gradient clipping works on
        optimizer = self.hook.qlora_optimizer(params=params, config=cfg)
        if optimizer is None:
            raise UsageError("no optimizer plugin is active; add one, e.g. --plugin adamw")
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)

        per_step = self.batching.examples_per_step(accelerator.num_processes)
        if cfg["train.max_steps"] > 0:
            max_steps = cfg["train.max_steps"]
        else:
            max_steps = max(1, math.ceil(cfg["train.num_train_epochs"] * len(self.job.train_examples) / per_step))
        scheduler = self.hook.qlora_lr_scheduler(optimizer=optimizer, num_training_steps=max_steps, config=cfg)
        if scheduler is None:
            scheduler = get_scheduler(cfg["train.lr_scheduler_type"], optimizer,
                                      num_warmup_steps=cfg["train.warmup_steps"], num_training_steps=max_steps)

        state = TrainState(micro_batch_size=cfg["train.per_device_train_batch_size"])
        rng = None
        if ckpt is not None:
            saved, rng = load_checkpoint(ckpt, None, optimizer, scheduler)
            state = TrainState(**saved)
            # A run stopped at its end before its evaluation and exports were done (interrupted there) resumes
            # into them; a completed one trains on only with a longer horizon.
            if state.step >= max_steps and _completed(out):
                raise UsageError(f"the run already completed {state.step} of {max_steps} steps; to train on, "
                                 f"raise train.max_steps (--set train.max_steps=N) or train.num_train_epochs")
        elif accelerator.is_main_process:
            self._check_free_space(out, params)

        run = Run(config=cfg, output_dir=out, max_steps=max_steps, is_main_process=accelerator.is_main_process,
                  device=str(accelerator.device), compute_dtype=str(self.job.compute_dtype).replace("torch.", ""),
                  model=model, tokenizer=self.job.tokenizer, accelerator=accelerator, optimizer=optimizer,
                  lr_scheduler=scheduler,
                  num_train_examples=len(self.job.train_examples), num_eval_examples=len(self.job.eval_examples),
                  max_micro_batch_tokens=self.batching.max_micro_batch_tokens(), notify=self.hook.qlora_on_notice)
        run.step = state.step
        if self._lock.took_over:
            self.hook.qlora_on_notice(run=run, message=self._lock.took_over)
        record = None
        # From here on a run exists: however it ends early, run.json and the plugins are told (a plugin that
        # changed the model for the run, such as the varlen attention or the adapters' bf16 copies, undoes it).
        try:
            if ckpt is not None:
                for message in passed_over:  # newer checkpoints that differ from their manifests
                    self.hook.qlora_on_notice(run=run, message=message)
                self.hook.qlora_on_resume(run=run, checkpoint=ckpt)
            if self.job.num_parameters:
                from qlora_core.loop.guidance import guidance_warnings

                for message in guidance_warnings(cfg, self.job.num_parameters, accelerator.num_processes,
                                                 storage=False):
                    self.hook.qlora_on_notice(run=run, message=message)
            if cfg["train.packing"]:
                with self._autocast():
                    self._check_packing(model)
            if state.step == 0 and not getattr(self.job.train_examples, "streaming", False):
                # This process's micro-batches of the first epoch, in the order they will be trained on (the
                # packed rows' filler measured on the first FILLER_SAMPLE examples: it needs the rows made).
                rank, world = accelerator.process_index, accelerator.num_processes
                n = len(self.job.train_examples)
                waste = padding_waste_of_lengths(self.batching.step_lengths(0, n, rank, world),
                                                 state.micro_batch_size)
                if cfg["train.packing"]:
                    mine = self.batching.step_examples(0, min(n, FILLER_SAMPLE * world), rank, world)
                    waste["packed_filler_waste"] = self.batching.filler_waste(mine, state.micro_batch_size)
                state.summary["padding_waste"] = waste
                if cfg["train.packing"] or waste["padding_waste"] >= 0.2:
                    self.hook.qlora_on_notice(run=run, message=self.batching.padding_message(waste))
            record = RunRecord(out, accelerator.is_main_process)
            if state.step:
                record.resume(cfg, self.job.plugins, state.step)
            else:
                record.start(cfg, self.job.plugins)
            signals = StopSignals(announce=lambda message: self.hook.qlora_on_notice(run=run, message=message))
            with deterministic(cfg["train.deterministic"]), signals:
                try:
                    result = self._loop(run, model, optimizer, scheduler, accelerator, record, state, rng, params,
                                        signals)
                except OSError as e:
                    if e.errno not in _DISK_ERRORS:
                        raise
                    ckpt = latest_checkpoint(out)
                    kept = (f"the last complete checkpoint, {ckpt.name}, is intact: free space and resume with "
                            f"qlora run --resume {out}") if ckpt else "no checkpoint was written yet"
                    raise UsageError(f"could not write in {out} ({e.strerror}); {kept}") from None
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            if record is not None:
                try:
                    record.finish(status, error=e)
                except OSError:  # a full disk: the error above says so
                    pass
            self.hook.qlora_on_train_failed(run=run, error=e, status=status)
            raise
        record.finish("completed")
        return result

    def _check_free_space(self, out: Path, params: list) -> None:
        """Refuse to start when the run folder's disk cannot hold two checkpoints and the adapter: the adapter
        (4 bytes a trainable parameter at most) and the optimizer's state (8 bytes a parameter for AdamW's two
        float32 moments, the most any built-in optimizer keeps) each time."""

        trainable = sum(p.numel() for p in params)
        checkpoint = trainable * 12 + 2**20
        need = 2 * checkpoint + trainable * 4
        free = shutil.disk_usage(out).free
        if free < need:
            raise UsageError(f"the disk of {out} has {free / 2**20:.1f} MiB free; this run's checkpoints need about "
                             f"{need / 2**20:.1f} MiB (two checkpoints and the adapter); free space or choose "
                             f"another --output")

    def _loop(self, run: Run, model, optimizer, scheduler, accelerator, record: "RunRecord", state: "TrainState",
              rng: dict | None, params: list, signals: StopSignals) -> RunResult:
        """The steps, the evaluations, the checkpoints and the exports; ``params``: what the optimizer steps (and
        gradient clipping works on).

        Checkpoints are written every ``train.save_steps`` steps or at each epoch's end (``train.save_strategy``),
        and whatever the strategy at the last step and when a stop signal arrives (:mod:`~qlora_core.loop.interrupt`):
        a finished run can always be continued with a longer horizon, and a preempted one loses no step.
        """
        import torch

        from qlora_core.loop.checkpoint import latest_checkpoint, save_checkpoint, set_rng_state

        cfg = self.config
        hook = self.hook
        device = accelerator.device
        world, rank = accelerator.num_processes, accelerator.process_index
        per_step = self.batching.examples_per_step(world)
        if state.step == 0:
            self._set_mode(run, "eval")
            if self.job.eval_examples:
                ev = self.evaluate(model, accelerator)
                state.summary["eval_loss_before"] = ev["eval_loss"]
                record.metric({"step": 0, **ev})
                hook.qlora_on_evaluate(run=run, metrics={"step": 0, **ev})
            self._show_sample(run, "before")
        run.step = state.step
        _agree(run.control, world, device, signals)
        if signals.received is not None:
            raise Interrupted(signals.received, run.output_dir, state.step, run.max_steps,
                              latest_checkpoint(run.output_dir) if state.step else None)
        hook.qlora_on_train_start(run=run)
        if rng is not None:
            set_rng_state(rng)  # last, so nothing before the first resumed step draws from them

        # Loading (and FSDP's sharding) and the evaluation before training peak apart from training: both are
        # reported, the per-step figures training's own.
        state.summary.setdefault("peak_cpu_memory_loading_gib", _host_cpu_peak_gib(world))
        if device.type == "cuda":
            state.summary.setdefault("peak_gpu_memory_loading_gib", _busiest_gpu_peak_gib(device, world))
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        started = time.perf_counter() - state.train_seconds
        for step in range(state.step + 1, run.max_steps + 1):
            t0 = time.perf_counter()
            examples = self.batching.step_examples(state.examples_seen, per_step, rank, world)
            lr = scheduler.get_last_lr()[0]
            self._set_mode(run, "train")
            hook.qlora_on_step_begin(run=run, step=step)
            loss_sum, n_targets, tokens = self._forward_backward(model, examples, state, accelerator, run)
            hook.qlora_on_after_backward(run=run, model=model, optimizer=optimizer)
            # The gradient norm, clipped to train.max_grad_norm (0: measured, not clipped). The same on every
            # process (the gradients and the loss are reduced), so all of them skip a non-finite step alike.
            max_norm = cfg["train.max_grad_norm"]
            grad_norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
            step_loss = loss_sum / n_targets
            finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(float(grad_norm)))
            # An fp16 run's loss scaler skips steps whose gradients overflowed and lowers its scale: that is
            # its normal working, not a fault to count.
            if finite or (accelerator.scaler is not None and math.isfinite(step_loss)):
                optimizer.step()
                state.nonfinite_streak = 0
            else:
                self._skip_nonfinite(run, state, step, step_loss, grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _, epoch_before = self.batching.epochs(state.examples_seen)
            state.examples_seen += per_step
            state.step = run.step = step
            seconds = time.perf_counter() - t0
            state.all_tokens += tokens
            norm = float(grad_norm) if grad_norm is not None else None
            epoch, epochs_done = self.batching.epochs(state.examples_seen)
            metrics = {"step": step, "epoch": epoch,
                       "loss": step_loss, "learning_rate": lr,
                       "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
                       "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9),
                       "elapsed": time.perf_counter() - started}
            if not finite:
                metrics["skipped"] = True
            if device.type == "cuda":
                metrics["gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            w = state.window
            if finite:
                state.summary.setdefault("first_loss", step_loss)
                w["loss"] += loss_sum
                w["targets"] += n_targets
            else:
                w["skipped"] = w.get("skipped", 0) + 1
            w["tokens"] += tokens
            w["seconds"] += seconds
            hook.qlora_on_step_end(run=run, metrics=metrics)
            if (step % cfg["train.logging_steps"] == 0 or step == run.max_steps or run.control.should_stop) \
                    and w["targets"]:
                # The loss averaged over the window's steps (the skipped ones left out, and counted).
                logged = dict(metrics, loss=w["loss"] / w["targets"],
                              tokens_per_second=w["tokens"] / max(w["seconds"], 1e-9))
                logged.pop("skipped", None)
                if w.get("skipped"):
                    logged["skipped_steps"] = w["skipped"]
                record.metric(logged)
                hook.qlora_on_log(run=run, metrics=logged)
                state.summary["train_loss"] = logged["loss"]
                state.window = dict(_EMPTY_WINDOW)
            for epoch in range(epoch_before + 1, epochs_done + 1):
                hook.qlora_on_epoch_end(run=run, epoch=epoch)
            control = run.control
            _agree(control, world, device, signals)
            if self.job.eval_examples and step != run.max_steps and not control.should_stop and (
                    control.should_evaluate or (cfg["train.eval_steps"] and step % cfg["train.eval_steps"] == 0)):
                self._set_mode(run, "eval")
                ev = {"step": step, **self.evaluate(model, accelerator)}
                record.metric(ev)
                hook.qlora_on_evaluate(run=run, metrics=ev)
                _agree(control, world, device)  # an evaluation callback may ask to stop (early stopping)
            stopping = control.should_stop and step != run.max_steps
            strategy = cfg["train.save_strategy"]
            signalled = signals.received is not None
            save = (step == run.max_steps or signalled
                    or control.should_save
                    or (stopping and strategy != "no")
                    or (strategy == "steps" and step % cfg["train.save_steps"] == 0)
                    or (strategy == "epoch" and epochs_done > epoch_before))
            control.should_stop = control.should_save = control.should_evaluate = False
            if save:
                self._set_mode(run, "eval")
                state.train_seconds = time.perf_counter() - started
                if run.is_main_process:
                    path = save_checkpoint(run.output_dir, step, accelerator.unwrap_model(model), optimizer,
                                           scheduler, state.to_dict(), cfg, self.job.plugins,
                                           keep=cfg["train.save_total_limit"])
                    hook.qlora_on_save(run=run, path=path)
                accelerator.wait_for_everyone()
            if signalled:
                raise Interrupted(signals.received, run.output_dir, step, run.max_steps,
                                  latest_checkpoint(run.output_dir))
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
        summary["peak_cpu_memory_gib"] = _host_cpu_peak_gib(world)
        if device.type == "cuda":
            summary["peak_gpu_memory_gib"] = _busiest_gpu_peak_gib(device, world)
        self._set_mode(run, "eval")  # the evaluation, the sample and the exports see the weights as trained
        if self.job.eval_examples:
            ev = {"step": run.step, **self.evaluate(model, accelerator)}
            summary["eval_loss_after"] = ev["eval_loss"]
            record.metric(ev)
            hook.qlora_on_evaluate(run=run, metrics=ev)
        self._show_sample(run, "after")
        _agree(run.control, world, device, signals)
        if signals.received is not None:  # the end state is checkpointed: a resume does the exports
            raise Interrupted(signals.received, run.output_dir, run.step, run.max_steps,
                              latest_checkpoint(run.output_dir))
        exports: list[Path] = []
        if run.is_main_process:
            for path in hook.qlora_export(run=run, model=model, tokenizer=self.job.tokenizer, output_dir=run.output_dir):
                if path is not None:
                    exports.append(Path(path))
                    hook.qlora_on_save(run=run, path=Path(path))
        accelerator.wait_for_everyone()
        hook.qlora_on_train_end(run=run, summary=summary)
        record.summary = summary
        return RunResult(run.output_dir, run.step, record.metrics, summary, exports)

    def _set_mode(self, run: Run, mode: str) -> None:
        """Tell the plugins the loop switches between training and evaluating, saving or exporting (only when
        it does: consecutive evaluations and saves are one switch)."""
        if self._mode != mode:
            self._mode = mode
            self.hook.qlora_on_mode(run=run, mode=mode)

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
            groups = self.batching.micro_batches(examples, size)
            batches = [{k: v.to(device) for k, v in self.batching.collate(group).items()} for group in groups]
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

    def evaluate(self, model: Any = None, accelerator: Any = None) -> dict[str, float]:
        """Mean loss per answer token over the held-out data (and its perplexity)."""
        import torch

        model = model if model is not None else self.job.model
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
            for i in range(0, len(self.job.eval_examples), bs):
                batch = {k: v.to(device) for k, v in self.batching.collate(self.job.eval_examples[i:i + bs]).items()}
                loss, n = self._loss(model, batch)
                total += loss.double()
                tokens += n
        if was_training:
            model.train()
        loss = float(total) / max(1, tokens)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}

    def _check_packing(self, model) -> None:
        """Refuse packing for a model whose attention would cross the packed examples, probing it with the
        micro-batches the run makes (:meth:`_collate`)."""
        if not self._packing_checked:
            check_packed_attention(model, self.batching.collate)
            self._packing_checked = True

    def _autocast(self):
        """Autocast to the compute dtype on a GPU (bf16 or fp16); float32 and the CPU compute as they are."""
        import torch

        if self.job.device != "cuda" or self.job.compute_dtype not in (torch.bfloat16, torch.float16):
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.job.compute_dtype)

    def _loss(self, model, batch) -> "tuple[torch.Tensor, int]":
        return compute_loss(self.hook, self.config, model, batch)

    def _show_sample(self, run: Run, stage: str) -> None:
        n = self.config["train.sample_max_new_tokens"]
        if self.job.sample is None or n == 0:
            return
        if self.job.distributed_by_plugin:
            # Generation calls the model's inner modules, around the wrapper: a sharded model cannot run it.
            if stage == "before":
                self.hook.qlora_on_notice(run=run, message="no sample answers while the model is sharded across "
                                                           "processes; after the run: qlora generate RUN_DIR")
            return
        if not run.is_main_process:
            return
        prompt, reference = self.job.sample.prompt_and_answer()
        # Under plain data parallelism the model is wrapped (DistributedDataParallel has no generate): this
        # process generates with the module itself, which runs no collective.
        model = run.accelerator.unwrap_model(run.model) if run.accelerator is not None else run.model
        completion = self.job.generate(prompt, n, self.job.sample.add_special_tokens, model=model)
        eos = self.job.tokenizer.eos_token or ""
        reference = reference[: -len(eos)] if eos and reference.endswith(eos) else reference
        self.hook.qlora_on_sample(run=run, stage=stage, prompt=prompt, completion=completion,
                                  reference=reference.strip())

    def _skip_nonfinite(self, run: Run, state: "TrainState", step: int, loss: float, grad_norm: Any) -> None:
        """A step whose loss or gradients are not finite changes no weight: it is skipped (the optimizer does not
        step; the data and the schedule move on) and counted; ``train.max_nonfinite_steps`` in a row stop the run,
        its adapters still as the last good step left them."""
        from qlora_core.loop.checkpoint import latest_checkpoint

        state.nonfinite_streak += 1
        state.summary["nonfinite_steps"] = state.summary.get("nonfinite_steps", 0) + 1
        what = f"the loss was {loss}" if not math.isfinite(loss) else f"the gradient norm was {float(grad_norm)}"
        limit = self.config["train.max_nonfinite_steps"]
        if state.nonfinite_streak >= limit:
            ckpt = latest_checkpoint(run.output_dir)
            good = (f"the last good checkpoint is {ckpt} (qlora run --resume {run.output_dir} continues from it)"
                    if ckpt else "no checkpoint was written before it")
            raise UsageError(f"{what} at step {step}: {state.nonfinite_streak} steps in a row were not finite "
                             f"(train.max_nonfinite_steps={limit}); stopped there, {good}; lower "
                             f"train.learning_rate (now {self.config['train.learning_rate']:g}) or check the data")
        self.hook.qlora_on_notice(run=run, message=f"step {step} skipped: {what} ({state.nonfinite_streak} in a "
                                                   f"row; the run stops after {limit})")

    def _oom_message(self, run: Run, size: int) -> str:
        from qlora_core.loop.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(run.output_dir)
        kept = f"; the last checkpoint, {ckpt}, is kept (resume with qlora run --resume {run.output_dir})" \
            if ckpt else ""
        return (f"out of GPU memory at step {run.step + 1} with a micro-batch of {size}: set "
                f"train.auto_find_batch_size=true, or lower train.per_device_train_batch_size and raise "
                f"train.gradient_accumulation_steps, lower lora.r or train.max_seq_length, keep gradient "
                f"checkpointing on, or add --plugin cpu-offload{kept}")


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
    #: steps in a row whose loss or gradients were not finite (skipped)
    nonfinite_streak: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}
