"""A QLoRA run as one object: :class:`Job`, the Python API that ``qlora run`` is a thin layer over.

It holds a run's pieces and hands each step to the module that does it: setting up (:mod:`.setup`: config and
plugins), the model (:mod:`.model`), the data (:mod:`.data`), batching (:mod:`.batching`), the loss
(:mod:`.loss`), the loop (:mod:`.trainer`) and the run folder (:mod:`.record`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from qlora_core.framework.errors import UsageError
from qlora_core.framework.types import DatasetFormat, FormattedExample
from qlora_core.loop import model as _model
from qlora_core.loop.batching import Batching
from qlora_core.loop.data import (TokenizedExample, choose_format, default_held_out_split, held_out_split, load_rows,
                                  training_and_eval_rows)
from qlora_core.loop.determinism import prepare_environment
from qlora_core.loop.loss import compute_loss
from qlora_core.loop.prepare import (Encoder, PrepareReport, StreamedExamples, mark_text_checked, prepare_examples,
                                     source_identity, text_checked)
from qlora_core.loop.record import RunResult, check_output_dir
from qlora_core.loop.setup import compute_dtype_for, pick_device, resolve, run_config_file
from qlora_core.loop.trainer import Trainer

if TYPE_CHECKING:
    import torch


def _announce(line: str) -> None:
    print(f"qlora: {line}", file=sys.stderr, flush=True)


class Job:
    """One configured QLoRA run.

    ``Job(config, plugins=[...], overrides=["lora.r=32"], output_dir="runs/x").run()`` is what
    ``qlora run CONFIG --plugin ... --set ... --output ...`` does. The steps are also usable one by one:
    :meth:`load_tokenizer`, :meth:`load_data`, :meth:`load_model`, :meth:`train`. With ``run_folder`` the config
    is a run folder's ``config.yaml`` (as for ``resume`` and :meth:`from_run`): keys of plugins the run left out
    are dropped instead of refused.
    """

    def __init__(self, config: str | Path | Mapping[str, Any] | None = None, *, plugins: Sequence[str] = (),
                 overrides: Sequence[Any] = (), output_dir: str | Path | None = None, overwrite: bool = False,
                 resume: str | Path | None = None, run_folder: bool = False):
        self.resume_from: Path | None = None  # the run folder this job continues
        if resume is not None:
            if config is not None or plugins:
                raise UsageError("--resume continues a run with its own config.yaml and plugins; give no CONFIG "
                                 "or --plugin (--set may change keys such as train.max_steps)")
            config, output_dir, overwrite = run_config_file(resume), None, False
            self.resume_from = Path(resume)
        self.config, self.plugins = resolve(config, plugins, overrides, run_folder=run_folder or resume is not None)
        if self.config["train.deterministic"]:
            prepare_environment()  # before anything starts cuBLAS
        self.device = pick_device()
        self.plugins.hook.qlora_configure(config=self.config, device=self.device)
        self.compute_dtype = compute_dtype_for(self.config, self.device)
        self.output_dir = output_dir  # the run folder asked for (None: runs/<timestamp>)
        self.overwrite = overwrite
        check_output_dir(output_dir, overwrite)  # refuse before spending minutes on loading
        self._model_path: str | None = None
        self._data_paths: dict[str, str] = {}
        self._identities: dict[str, Any] = {}
        self.tokenizer: Any = None
        self.model: Any = None
        self.format: DatasetFormat | None = None
        self.train_examples: Sequence[TokenizedExample] = []
        self.eval_examples: Sequence[TokenizedExample] = []
        self.eval_formatted: Sequence[FormattedExample] = []  # the same held-out rows, as text
        self.data_reports: dict[str, PrepareReport] = {}  # "train" and "eval": what preparing the data gave
        self.eval_split: str | None = None  # where the held-out rows come from, for reports
        self.num_parameters = 0  # of the base model, once loaded
        self.sample: FormattedExample | None = None
        self.distributed_by_plugin = False  # a qlora_distribute_model plugin wrapped the model (FSDP)
        self._trainer: Trainer | None = None

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
        self.tokenizer = _model.load_tokenizer(self.config, self.hook, self.model_path(), path)
        return self.tokenizer

    def _formats(self) -> tuple[list[DatasetFormat], bool]:
        formats: list[DatasetFormat] = []
        for offered in self.hook.qlora_dataset_formats(config=self.config):
            formats.extend(offered or [])
        providers = self.plugins.implementers("qlora_dataset_formats")
        forced = any(i.requested for i in self.plugins.infos if i.name in providers)
        return formats, forced

    def _data_path(self, path: str) -> str:
        """A configured data path as the plugins resolve it (``qlora_resolve_data``, asked once per path)."""
        if path not in self._data_paths:
            self._data_paths[path] = self.hook.qlora_resolve_data(path=path, config=self.config) or path
        return self._data_paths[path]

    def load_data(self) -> tuple[Sequence[TokenizedExample], Sequence[TokenizedExample]]:
        """Load, format and tokenize the training and held-out data (:mod:`.prepare`: batched, across
        ``data.num_proc`` processes, kept in the data cache and read from it memory-mapped)."""
        cfg = self.config
        if self.tokenizer is None:
            self.load_tokenizer()
        if cfg["data.streaming"]:
            return self._stream_data()
        # Checking the rows' text reads all of them; data whose content an earlier run checked is not read
        # again, so a cached run of a million rows reads only the examples its steps need.
        keys = [k for k in ("data.path", "data.eval_path") if cfg[k]]
        known = cfg["data.cache"] and all(text_checked(self._identity(k)) for k in keys)
        train_rows, eval_rows, self.eval_split = training_and_eval_rows(cfg, self._data_path, check_text=not known)
        if cfg["data.cache"] and not known:
            for k in keys:
                mark_text_checked(self._identity(k))
        formats, forced = self._formats()
        self.format = choose_format(formats, list(train_rows.column_names), cfg["data.format"], forced)
        train_source, eval_source = self._sources(train_rows, eval_rows)
        self.train_examples, self.data_reports["train"] = prepare_examples(
            train_rows, self.format, self.tokenizer, cfg, "training data", train_source, announce=_announce)
        self.eval_formatted, self.eval_examples = [], []
        self.data_reports.pop("eval", None)
        if eval_rows is not None and len(eval_rows):
            self.eval_examples, self.data_reports["eval"] = prepare_examples(
                eval_rows, self.format, self.tokenizer, cfg, "eval data", eval_source, keep_text=True,
                announce=_announce)
            self.eval_formatted = self.eval_examples.formatted()
        self.sample = self.eval_formatted[0] if len(self.eval_formatted) else None
        return self.train_examples, self.eval_examples

    def _stream_data(self) -> tuple[Sequence[TokenizedExample], Sequence[TokenizedExample]]:
        """``data.streaming``: the training rows read as training goes (:class:`.prepare.StreamedExamples`);
        the held-out rows are the first ``data.max_eval_samples`` (1,000 when unset) of the eval split, prepared
        ahead."""
        from itertools import islice

        import datasets

        cfg = self.config
        if cfg["train.max_steps"] <= 0:
            raise UsageError("data.streaming reads the rows as training goes, so the number of steps cannot come "
                             "from train.num_train_epochs; set train.max_steps")
        if cfg["data.eval_fraction"] > 0:
            raise UsageError("data.eval_fraction needs every row ahead of training, which data.streaming does not "
                             "read; set data.eval_split or data.eval_path instead (or data.eval_fraction=0)")
        splits = load_rows(self._data_path(cfg["data.path"]), None, streaming=True)
        if cfg["data.split"] not in splits:
            raise UsageError(f"dataset {cfg['data.path']!r} has no split {cfg['data.split']!r}; "
                             f"it has: {', '.join(splits)} (set data.split)")
        train_rows = splits[cfg["data.split"]]
        first = next(iter(train_rows.take(1)), None)
        if first is None:
            raise UsageError(f"dataset {cfg['data.path']!r} split {cfg['data.split']!r} has no rows")
        formats, forced = self._formats()
        self.format = choose_format(formats, list(first), cfg["data.format"], forced)
        encoder = Encoder(self.format, self.tokenizer, cfg["train.max_seq_length"], cfg["data.train_on_prompt"],
                          "training data")
        self.train_examples = StreamedExamples(train_rows, encoder, cfg["data.shuffle_buffer"], cfg["train.seed"])
        self.data_reports = {}
        self.eval_formatted, self.eval_examples, self.eval_split = [], [], None
        eval_splits = (load_rows(self._data_path(cfg["data.eval_path"]), None, streaming=True,
                                 key="data.eval_path") if cfg["data.eval_path"] else None)
        held = eval_splits if eval_splits is not None else splits
        split = held_out_split(cfg, splits, eval_splits) or (
            default_held_out_split(cfg, splits) if eval_splits is None else None)
        if split is not None:
            at_most = cfg["data.max_eval_samples"] if cfg["data.max_eval_samples"] > 0 else 1000
            rows = datasets.Dataset.from_list(list(islice(iter(held[split]), at_most)))
            if len(rows):
                self.eval_split = split
                self.eval_examples, self.data_reports["eval"] = prepare_examples(
                    rows, self.format, self.tokenizer, cfg, "eval data", {}, keep_text=True, cache=False)
                self.eval_formatted = self.eval_examples.formatted()
        self.sample = self.eval_formatted[0] if len(self.eval_formatted) else None
        return self.train_examples, self.eval_examples

    def _identity(self, key: str, rows: Any = None) -> dict[str, Any]:
        """What identifies the content of the data a config key names (:func:`.prepare.source_identity`),
        computed once per path: local files are read for their digests."""
        path = self._data_path(self.config[key])
        if path not in self._identities or ("files" not in self._identities[path] and rows is not None):
            self._identities[path] = source_identity(path, rows)
        return self._identities[path]

    def _sources(self, train_rows: Any, eval_rows: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """What identifies the training and held-out rows for the data cache: the data's content and how the
        rows were chosen from it."""
        cfg = self.config
        identity = self._identity
        held_out = None
        if not cfg["data.eval_path"] and not cfg["data.eval_split"] and cfg["data.eval_fraction"] > 0:
            held_out = {"fraction": cfg["data.eval_fraction"], "seed": cfg["train.seed"]}
        train = {"data": identity("data.path", train_rows), "split": cfg["data.split"], "held_out": held_out}
        evals: dict[str, Any] = {}
        if eval_rows is not None:
            evals = {"data": identity("data.eval_path" if cfg["data.eval_path"] else "data.path", eval_rows),
                     "split": self.eval_split, "held_out": held_out, "at_most": cfg["data.max_eval_samples"]}
        return train, evals

    def load_base_model(self, for_training: bool = True) -> Any:
        """Load the base model, quantized by the quant plugin; for training, also prepared by the plugins
        (k-bit preparation, gradient checkpointing)."""
        if self.tokenizer is None:
            self.load_tokenizer()
        return _model.load_base_model(self.config, self.hook, self.model_path(), self.device, self.compute_dtype,
                                      for_training)

    def load_model(self, base: Any = None) -> Any:
        """Load the base model (quantized by the quant plugin), prepare it and add LoRA adapters.

        :param base: an already loaded base model to prepare and adapt instead (``qlora bench`` builds one
            straight into 4 bits from a config alone).
        """
        if base is None:
            model = self.load_base_model(for_training=True)
        else:
            model = base
            self.hook.qlora_model_loaded(model=model, config=self.config, for_training=True)
            self.hook.qlora_prepare_model(model=model, config=self.config)
        self.num_parameters = _model.parameter_count(model)
        self.model = _model.add_adapters(self.config, self.hook, model)
        return self.model

    @classmethod
    def from_run(cls, run_dir: str | Path, overrides: Sequence[Any] = ()) -> "Job":
        """The job of a finished (or checkpointed) run, rebuilt from its ``config.yaml`` with the same plugins;
        for evaluation, generation and merging. It has no output folder: nothing is written unless a caller
        does."""
        return cls(run_config_file(run_dir), overrides=overrides, run_folder=True)

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
        """Train the loaded model on the loaded data; write metrics, checkpoints, exports and the run's record
        (:class:`~qlora_core.loop.trainer.Trainer`). A job made with ``resume=RUN_DIR`` continues from that
        folder's latest complete checkpoint."""
        return self._training().train()

    def evaluate(self, model: Any = None, accelerator: Any = None) -> dict[str, float]:
        """Mean loss per answer token over the held-out data (and its perplexity)."""
        return self._training().evaluate(model, accelerator)

    def generate(self, prompt: str, max_new_tokens: int, add_special_tokens: bool = True, model: Any = None) -> str:
        """Greedy answer of the model to a formatted prompt."""
        from qlora_core.loop.generation import generate

        model = model if model is not None else self.model
        return generate(model, self.tokenizer, prompt, max_new_tokens, add_special_tokens=add_special_tokens)

    def _training(self) -> Trainer:
        """The loop of this job's loaded tokenizer, data and model (made again when they change)."""
        t = self._trainer
        if t is None or t.batching.examples is not self.train_examples or t.job.tokenizer is not self.tokenizer:
            self._trainer = t = Trainer(self)
        return t

    # The pieces of a step, for tools and tests that take one apart.

    def _batching(self) -> Batching:
        return self._training().batching

    def _collate(self, examples: Sequence[TokenizedExample]) -> "dict[str, torch.Tensor]":
        return self._batching().collate(examples)

    def _step_examples(self, start: int, count: int, rank: int, world: int) -> list[TokenizedExample]:
        return self._batching().step_examples(start, count, rank, world)

    def _loss(self, model, batch) -> "tuple[torch.Tensor, int]":
        return compute_loss(self.hook, self.config, model, batch)
