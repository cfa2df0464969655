"""Using a finished run: load it for inference, generate answers, merge the adapter into a plain model.

- :func:`load_trained` loads a run's base model in 4 bits exactly as the run trained it, with the run's
  adapter on top (``PeftModel.from_pretrained``), and the dataset format the run was trained on, so prompts
  are rendered like the training data.
- :func:`generate` answers one prompt, greedy by default, streaming the text as it is produced.
- :func:`merge` writes a plain model folder (no ``quantization_config``) that
  ``AutoModelForCausalLM.from_pretrained`` loads on its own. The 4-bit base is *dequantized* first (each
  bitsandbytes ``Linear4bit`` becomes an ``nn.Linear`` holding exactly the weights the 4-bit forward
  computes with, which are what the adapter was trained against), then the adapter is merged into those
  weights. Merging into the 4-bit weights instead would re-quantize every merged weight and lose most of
  what the small adapter learned. The merged model is reloaded from disk and its logits compared with
  base-4bit + adapter; :class:`MergeReport` says by how much they differ.

``qlora generate`` and ``qlora merge`` are thin layers over these, and the ``merged-export`` plugin merges
at the end of a run with the same code (:func:`merge_adapter`).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from qlora_core.loop.data import choose_format, load_rows
from qlora_core.framework.errors import UsageError
from qlora_core.framework.formats import ChatTemplateFormat
from qlora_core.framework.types import DatasetFormat

if TYPE_CHECKING:
    import torch

    from qlora_core.loop.job import Job

#: ``--dtype`` / ``merge.dtype`` values; ``auto`` is the run's compute dtype (float32 on a CPU).
MERGE_DTYPES = ("auto", "bfloat16", "float16", "float32")

#: Written into a merged folder: where it came from and how close it is to base-4bit + adapter.
MERGE_REPORT_FILE = "qlora-merge.json"

# Prompts for the merge check, besides the first rows of the run's training data.
CHECK_PROMPTS = ("What is the capital of France?", "Write two sentences about the sea.")


# --------------------------------------------------------------------------- the run and its format


def _resume_hint(run_dir: Path) -> str:
    try:
        from qlora_core.loop.checkpoint import latest_checkpoint
    except ImportError:
        return ""
    try:
        has_checkpoint = latest_checkpoint(run_dir) is not None
    except Exception:
        return ""
    return f" (finish it first: qlora run --resume {run_dir})" if has_checkpoint else ""


def check_finished_run(run_dir: str | Path) -> Path:
    """Return the run's ``adapter/`` folder, or raise :class:`UsageError` saying why ``run_dir`` is not a
    finished run (not a folder, no ``config.yaml``, ``run.json`` not ``completed``, no ``adapter/``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder {str(run_dir)!r} does not exist; pass the folder `qlora run --output` wrote")
    from qlora_core.loop.setup import run_config_file

    run_config_file(run_dir)
    from qlora_core.loop.record import run_status

    status = run_status(run_dir)
    adapter = run_dir / "adapter"
    if status is not None and status.get("status") != "completed":
        error = f" ({status['error']})" if status.get("error") else ""
        missing = "" if (adapter / "adapter_config.json").is_file() else "; it has no adapter"
        raise UsageError(f"run {str(run_dir)!r} is not a finished run: run.json says status "
                         f"{status.get('status')!r}{error}{missing}{_resume_hint(run_dir)}")
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"run {str(run_dir)!r} has no adapter/ folder (no adapter_config.json): it is not a "
                         f"finished run, or it ran without the adapter-export plugin")
    return adapter


def peek_rows(job: "Job", n: int = 2) -> list[dict[str, Any]] | None:
    """The first ``n`` rows of the run's training data, read by streaming (nothing else is loaded), or
    ``None`` when the data cannot be read (moved, or a hub dataset while offline)."""
    try:
        rows = load_rows(job._data_path(job.config["data.path"]), job.config["data.split"], streaming=True)
        return [dict(row) for row in itertools.islice(rows, n)]
    except Exception:  # the format then falls back (see run_format)
        return None


def _fallback_format(formats: Sequence[DatasetFormat], tokenizer: Any) -> DatasetFormat:
    """The format to prompt in when the training data cannot be read: the run's ``chat`` format (the core's chat
    template rendering if no plugin offers one) when the tokenizer has a chat template, else its ``guanaco``."""
    name = "chat" if getattr(tokenizer, "chat_template", None) else "guanaco"
    for f in formats:
        if f.name == name:
            return f
    if name == "chat":
        return ChatTemplateFormat()
    raise UsageError("the run's training data cannot be read to tell its format, the tokenizer has no chat "
                     "template and no guanaco format is active; set data.format")


def run_format(job: "Job", tokenizer: Any, rows: list[dict[str, Any]] | None = None) -> DatasetFormat:
    """The dataset format the run trained with: ``data.format`` if set, else a requested formatter plugin,
    else the one detected from the training data's columns (read cheaply, see :func:`peek_rows`). When the
    data cannot be read: the chat format if the tokenizer has a chat template, else guanaco."""
    formats, forced = job._formats()
    wanted = job.config["data.format"]
    if wanted is not None:
        for f in formats:
            if f.name == wanted:
                return f
        return choose_format(formats, [], wanted)  # raises the usual "not a known format" error
    if forced and len(formats) == 1:
        return formats[0]
    rows = peek_rows(job) if rows is None else rows
    if rows:
        try:
            return choose_format(formats, list(rows[0]), None, forced)
        except UsageError:
            pass
    return _fallback_format(formats, tokenizer)


def format_prompt(fmt: DatasetFormat, tokenizer: Any, user_text: str) -> tuple[str, bool]:
    """``fmt.prompt(user_text)`` and whether the tokenizer should add its special tokens to it, as the
    training data was tokenized (not when the format's text already holds them, as a chat template's does)."""
    prompt = fmt.prompt(user_text, tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    add_special_tokens = fmt.name != "chat" and not (bos and prompt.startswith(bos))
    return prompt, add_special_tokens


# --------------------------------------------------------------------------- loading


def _load_tokenizer(job: "Job", adapter_dir: Path) -> Any:
    """The tokenizer saved with the adapter (as the run used it), else the base model's."""
    saved = any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return job.load_tokenizer(adapter_dir if saved else None)


def load_run_model(job: "Job", adapter_dir: str | Path) -> Any:
    """The run's base model, loaded as for its training (quantized by the quant plugin), in the numerics its
    evaluations ran in, with the adapter from ``adapter_dir`` on top (PEFT, not trainable), in eval mode."""
    from peft import PeftModel

    # The quant plugin puts the base in the numerics the run's evaluations ran in (qlora_model_loaded).
    base = job.load_base_model(for_training=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def load_trained(run_dir: str | Path, overrides: Sequence[Any] = ()) -> tuple["Job", Any, Any, DatasetFormat]:
    """Load a finished run for inference.

    :returns: ``(job, model, tokenizer, fmt)``: the run's rebuilt :class:`~qlora_core.loop.job.Job`, its base
        model in 4 bits with the adapter (a ``PeftModel`` in eval mode), the tokenizer saved with the
        adapter, and the run's dataset format (``fmt.prompt(text, tokenizer)`` renders a question like the
        training data; :func:`format_prompt` also says how to tokenize it).
    :raises UsageError: when ``run_dir`` is not a finished run.
    """
    from qlora_core.loop.job import Job

    adapter_dir = check_finished_run(run_dir)
    job = Job.from_run(run_dir, overrides=overrides)
    tokenizer = _load_tokenizer(job, adapter_dir)
    fmt = run_format(job, tokenizer)
    job.format = fmt
    model = load_run_model(job, adapter_dir)
    job.model = model
    return job, model, tokenizer, fmt


# --------------------------------------------------------------------------- dequantize and merge


def dequantize_model(job: "Job", model: Any, dtype: "torch.dtype") -> Any:
    """The base model as a plain one in ``dtype``: the quant plugin replaces its quantized layers by plain
    linear layers holding the weights they compute with (:func:`~qlora_core.hookspecs.qlora_dequantize_model`);
    an unquantized model is only cast."""
    plain = job.hook.qlora_dequantize_model(model=model, dtype=dtype)
    return plain if plain is not None else model.to(dtype)


def resolve_dtype(name: str, job: "Job") -> "torch.dtype":
    """A ``--dtype`` / ``merge.dtype`` value; ``auto`` is the run's compute dtype."""
    import torch

    if name not in MERGE_DTYPES:
        raise UsageError(f"dtype {name!r} is not one of {', '.join(MERGE_DTYPES)}")
    return job.compute_dtype if name == "auto" else getattr(torch, name)


@dataclass
class MergeReport:
    """How close the merged model is to what it replaces.

    :ivar output_dir: the merged model's folder.
    :ivar dtype: the merged model's dtype.
    :ivar max_abs_diff: the largest absolute difference between the logits of the merged model (reloaded
        from disk) and those of base-4bit + adapter, over every position of the check texts.
    :ivar logit_scale: the largest absolute logit of base-4bit + adapter over the same positions.
    :ivar adapter_effect: the largest absolute logit difference the adapter makes (base-4bit + adapter
        against base-4bit alone): what a merge that lost the adapter would be off by.
    :ivar num_texts / num_tokens: what was compared.
    """

    output_dir: str
    dtype: str
    max_abs_diff: float
    logit_scale: float
    adapter_effect: float
    num_texts: int
    num_tokens: int

    def summary(self) -> str:
        return (f"merged model vs base-4bit + adapter ({self.num_texts} texts, {self.num_tokens} tokens, "
                f"{self.dtype}): max |logit difference| {self.max_abs_diff:.3g}; logits up to "
                f"{self.logit_scale:.3g} in absolute value; the adapter itself changes them by up to "
                f"{self.adapter_effect:.3g}")


def check_texts(job: "Job", fmt: DatasetFormat, tokenizer: Any,
                rows: list[dict[str, Any]] | None = None) -> list[tuple[str, bool]]:
    """Texts to compare logits on: the first training rows rendered in full (prompt and answer, where the
    adapter matters most) and a few questions rendered as prompts, each with its ``add_special_tokens``."""
    texts: list[tuple[str, bool]] = []
    for row in (peek_rows(job) if rows is None else rows) or []:
        try:
            example = fmt.format(row, tokenizer)
        except Exception:
            continue
        texts.append((example.text, example.add_special_tokens))
    texts.extend(format_prompt(fmt, tokenizer, q) for q in CHECK_PROMPTS)
    return texts


def _logits(model: Any, tokenizer: Any, texts: list[tuple[str, bool]], max_length: int) -> list["torch.Tensor"]:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for text, special in texts:
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=special, truncation=True,
                            max_length=max_length).to(device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_merge_output(output_dir: str | Path, overwrite: bool, run_dir: str | Path | None = None) -> Path:
    """Refuse an output that is a file, a non-empty folder without ``overwrite``, or that holds the run."""
    from qlora_core.loop.record import check_output_dir

    out = Path(output_dir)
    if run_dir is not None:
        run, target = Path(run_dir).resolve(), out.resolve()
        inside = (target, *target.parents)
        if target == run or target in run.parents or any(run / name in inside for name in ("adapter", "checkpoints")):
            raise UsageError(f"--output {str(out)!r} would replace the run folder, its adapter or its checkpoints; "
                             f"choose a folder outside {str(run_dir)!r} (or a new sub-folder of it)")
    check_output_dir(out, overwrite)
    return out


def merge_adapter(job: "Job", adapter_dir: str | Path, output_dir: str | Path, dtype: "torch.dtype",
                  tokenizer: Any, fmt: DatasetFormat | None = None, overwrite: bool = False,
                  source: str | None = None, adapter_name: str | None = None) -> MergeReport:
    """Merge the adapter in ``adapter_dir`` into ``job``'s dequantized base and save a plain model folder.

    1. base-4bit + adapter, loaded as the run trained it, gives the reference logits;
    2. the base is loaded in 4 bits again, dequantized to ``dtype`` (:func:`dequantize_model`), the adapter
       loaded onto it and merged (``merge_and_unload``);
    3. the merged model and the tokenizer are saved into a temporary folder next to ``output_dir``;
    4. the merged model is reloaded from there in ``dtype`` and its logits compared with the reference;
    5. the report is written into the folder (``qlora-merge.json``), which is renamed to ``output_dir``.

    One model is in memory at a time. ``output_dir`` is checked first (see :func:`check_merge_output`).
    ``source`` (the run folder) and ``adapter_name`` (the adapter, when ``adapter_dir`` is a temporary copy)
    are recorded in the report file.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    out = Path(output_dir)
    from qlora_core.loop.record import check_output_dir

    check_output_dir(out, overwrite)
    rows = peek_rows(job)
    fmt = fmt if fmt is not None else run_format(job, tokenizer, rows)
    texts = check_texts(job, fmt, tokenizer, rows)
    max_length = max(16, min(job.config["train.max_seq_length"], 256))

    reference = load_run_model(job, adapter_dir)
    ref_logits = _logits(reference, tokenizer, texts, max_length)
    with reference.disable_adapter():
        plain_logits = _logits(reference, tokenizer, texts, max_length)
    del reference
    _free()

    base = dequantize_model(job, job.load_base_model(for_training=False), dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, base
        _free()
        device = {"": "cuda"} if job.device == "cuda" else {"": "cpu"}
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map=device).eval()
        new_logits = _logits(reloaded, tokenizer, texts, max_length)
        del reloaded
        _free()
        report = MergeReport(
            output_dir=str(out), dtype=str(dtype).replace("torch.", ""),
            max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(new_logits, ref_logits)),
            logit_scale=max(float(a.abs().max()) for a in ref_logits),
            adapter_effect=max(float((a - b).abs().max()) for a, b in zip(ref_logits, plain_logits)),
            num_texts=len(texts), num_tokens=sum(a.shape[0] for a in ref_logits))
        record = {"source_run": source, "adapter": adapter_name or str(adapter_dir),
                  "base_model": job.config["model.name_or_path"], "format": fmt.name, **asdict(report)}
        (tmp / MERGE_REPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        check_output_dir(out, overwrite)  # nothing appeared there meanwhile
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def merge(run_dir: str | Path, output_dir: str | Path, dtype: str = "auto", overwrite: bool = False,
          overrides: Sequence[Any] = ()) -> MergeReport:
    """Merge a finished run's adapter into its dequantized base model and save it as a plain model folder
    (see :func:`merge_adapter`).

    :param dtype: ``bfloat16``, ``float16``, ``float32`` or ``auto`` (the run's compute dtype).
    :raises UsageError: when ``run_dir`` is not a finished run, or ``output_dir`` is not empty (without
        ``overwrite``) or would replace the run.
    """
    from qlora_core.loop.job import Job

    adapter_dir = check_finished_run(run_dir)
    check_merge_output(output_dir, overwrite, run_dir)
    job = Job.from_run(run_dir, overrides=overrides)
    torch_dtype = resolve_dtype(dtype, job)
    tokenizer = _load_tokenizer(job, adapter_dir)
    return merge_adapter(job, adapter_dir, output_dir, torch_dtype, tokenizer, overwrite=overwrite,
                         source=str(run_dir))
