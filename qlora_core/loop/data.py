"""Loading datasets, choosing their format, and turning rows into token ids with loss masks."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from qlora_core.framework.errors import UsageError
from qlora_core.framework.hub import offline_unless_reachable, unreachable_note
from qlora_core.framework.types import DatasetFormat, FormattedExample

if TYPE_CHECKING:
    import datasets
    import torch

    from qlora_core.framework.config import Config

#: The label of a token the loss does not cover (the prompt, padding, filler): PyTorch's cross-entropy default.
IGNORE_INDEX = -100

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(path: str, split: str | None, streaming: bool = False,
              key: str = "data.path", check_text: bool = True) -> "datasets.DatasetDict | datasets.Dataset":
    """Load a local json/jsonl/csv/parquet file or folder, or a hub dataset id, with ``datasets``.

    Data that cannot serve is a :class:`UsageError` naming ``key``, the file and, where it is known, the line,
    and how to fix it: a missing path, an empty file, a line that is not valid JSON (or not an object), bytes
    that are not UTF-8, a split without rows. The ``datasets`` library's own log lines about a failure are kept
    off the terminal.

    :param split: the split to return, or ``None`` for every split (a ``DatasetDict``).
    :param streaming: read rows lazily instead of preparing the whole dataset (to peek at a few rows).
    :param key: the config key ``path`` comes from, for messages (``data.eval_path``).
    :param check_text: check that every text is UTF-8 (reading all of the data once); a caller that knows this
        content was checked before leaves it out.
    """
    import datasets

    datasets.disable_progress_bars()
    p = Path(path).expanduser()
    if p.is_file():
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise UsageError(f"data file {path!r} ({key}) has an unknown type; use .json, .jsonl, .csv or "
                             f".parquet (rename it if it holds one of them)")
    elif not p.is_dir() and _looks_local(path):
        raise UsageError(f"data path {path!r} does not exist ({key}); check the path, or point {key} at a json, "
                         f"jsonl, csv or parquet file or folder")
    try:
        with _quiet_datasets():
            if p.is_file():
                # A single file is one split, named "train" by datasets.
                loaded = datasets.load_dataset(builder, data_files={"train": str(p)}, streaming=streaming)
            elif p.is_dir():
                loaded = datasets.load_dataset(str(p), streaming=streaming)
            else:
                offline_unless_reachable()  # a hub dataset: fail at once when offline, not after the retries
                loaded = datasets.load_dataset(path, streaming=streaming)
    except Exception as e:  # datasets raises many kinds; the user needs the file, the line and the reason
        raise UsageError(_load_failure(path, p, key, e)) from None
    if not streaming:
        _check_loaded(loaded, path, p, key, check_text)
    if split is None:
        return loaded
    if split not in loaded:
        raise UsageError(
            f"dataset {path!r} has no split {split!r}; it has: {', '.join(loaded)} (set data.split)")
    return loaded[split]


def _looks_local(path: str) -> bool:
    """Whether a data path that does not exist is meant as a local file or folder, not a hub dataset id
    (``name`` or ``owner/name``)."""
    if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in _BUILDERS:
        return True
    return (os.sep != "/" and os.sep in path) or path.count("/") > 1


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Keep the ``datasets`` library's log lines (``Failed to load JSON from file ...``) off the terminal while
    it loads: its failures are reported as one line of ours."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


#: What a data file of each type holds, for messages.
_LAYOUT = {".jsonl": "one JSON object a line", ".json": "a JSON list of objects, or one object a line",
           ".csv": "a header line, then one row a line", ".parquet": "a parquet table"}


def _data_files(p: Path) -> list[Path]:
    """The data files a local data path loads: the file, or a folder's json/jsonl/csv/parquet files."""
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _BUILDERS
                  and not any(part.startswith(".") for part in f.relative_to(p).parts))


def _reason(e: BaseException) -> str:
    """The first line of an exception's message; below datasets' ``An error occurred while generating the
    dataset``, the message of the exception it wraps."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if text and text != "An error occurred while generating the dataset":
            return text.splitlines()[0].rstrip(".")
        current = current.__cause__ or current.__context__
    return type(e).__name__


def _load_failure(path: str, p: Path, key: str, e: BaseException) -> str:
    """The message for data that ``datasets`` failed to load: the first problem found in its files, else the
    library's reason."""
    if p.is_file() or p.is_dir():
        files = _data_files(p)
        if p.is_dir() and not files:
            return (f"{key}: folder {path!r} holds no .json, .jsonl, .csv or .parquet file; put the data files in "
                    f"it, or point {key} at a file")
        for f in files:
            problem = _file_problem(f, key)
            if problem:
                return f"{key}: {problem}"
        if "corresponds to no data" in str(e):  # datasets' words for a split without rows (a csv header only)
            return f"{key}: dataset {path!r} has no rows; put the examples in it, or point {key} at other data"
        layout = _LAYOUT.get(p.suffix.lower()) if p.is_file() else None
        return (f"{key}: could not load dataset {path!r}: {_reason(e)}; check that it holds "
                f"{layout or 'json, jsonl, csv or parquet files'}")
    return (f"{key}: {path!r} is no local file or folder, and the hub dataset of that name could not be loaded: "
            f"{unreachable_note(_reason(e))}; check the name (or the path), or download the dataset and point {key} "
            f"at its files")


def _file_problem(f: Path, key: str) -> str | None:
    """What is wrong with one data file, naming it and the line where it can be told; ``None`` if nothing is
    found (parquet files are only checked for being empty)."""
    suffix = f.suffix.lower()
    if suffix == ".parquet":
        return f"{f} is empty; write the rows into it, or point {key} at another file" \
            if f.stat().st_size == 0 else None
    raw = f.read_bytes()
    if not raw.strip():
        return f"{f} is empty; put the examples in it ({_LAYOUT[suffix]}), or point {key} at another file"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return (f"{f} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}); save the "
                f"file as UTF-8, or fix that line")
    if suffix == ".csv":
        return None
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # more than one value: JSON lines, checked line by line below
                return (f"{f} line {e.lineno} is not valid JSON ({e.msg}: column {e.colno}); fix that line, or "
                        f"point {key} at another file")
        else:
            items = doc if isinstance(doc, list) else None
            for i, item in enumerate(items or []):
                if not isinstance(item, dict):
                    return (f"{f} item {i} of its list is {_json_kind(item)}, not an object of fields (such as "
                            f'{{"text": ...}}); make every item an object')
            return None
    return _json_lines_problem(f, text, key)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _json_lines_problem(f: Path, text: str, key: str) -> str | None:
    """The first line of a JSON-lines file that is not valid JSON, or not an object."""
    for n, line in enumerate(text.split("\n"), 1):
        body = line.strip()
        if not body:
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            column = e.colno + len(line) - len(line.lstrip())
            return (f"{f} line {n} is not valid JSON ({e.msg}: column {column}); fix that line, or point {key} at "
                    f"another file")
        if not isinstance(obj, dict):
            return (f'{f} line {n} is {_json_kind(obj)}, not an object of fields (such as {{"text": ...}}); make '
                    f"every line one JSON object")
    return None


def _check_loaded(loaded: Any, path: str, p: Path, key: str, check_text: bool = True) -> None:
    """Refuse loaded data with an empty split, or with text that is not UTF-8 (pyarrow's json and csv readers
    let such bytes through; they would fail only when a row is read)."""
    import pyarrow as pa

    for name, rows in loaded.items():
        where = f" (split {name!r})" if len(loaded) > 1 else ""
        if len(rows) == 0:
            raise UsageError(f"{key}: dataset {path!r}{where} has no rows; put the examples in it, or point {key} "
                             f"at other data")
        if not check_text:
            continue
        try:
            rows.data.table.validate(full=True)
        except pa.ArrowInvalid as e:
            if "utf8" not in str(e).lower():
                continue
            found = next((problem for f in _data_files(p) if (problem := _file_problem(f, key))), None)
            raise UsageError(f"{key}: {found}" if found else
                             f"{key}: dataset {path!r}{where} holds text that is not UTF-8; save it as UTF-8") from None


def choose_format(formats: Sequence[DatasetFormat], columns: Sequence[str], wanted: str | None,
                  forced: bool = False) -> DatasetFormat:
    """Pick the dataset format: by name, forced (a requested formatter plugin), or detected from columns."""
    known = ", ".join(f"{f.name} ({' + '.join(f.fields)})" for f in formats) or "none"
    if wanted is not None:
        for f in formats:
            if f.name == wanted:
                return _check_fields(f, columns)
        raise UsageError(f"data.format {wanted!r} is not a known format; known: {known} (set data.format to one of "
                         f"them, leave it unset to detect the format, or add the plugin that offers it)")
    if forced and len(formats) == 1:
        return _check_fields(formats[0], columns)
    for f in formats:
        if f.matches(columns):
            return f
    raise UsageError(
        f"dataset fields {', '.join(columns) or '(none)'} fit no known format; known formats: {known}; rename the "
        f"fields to one format's, or add a plugin with a format for them")


def _check_fields(fmt: DatasetFormat, columns: Sequence[str]) -> DatasetFormat:
    # A format the user names only needs its fields; matches() is stricter, to keep detection unambiguous.
    missing = [name for name in fmt.fields if name not in columns]
    if missing:
        raise UsageError(f"dataset has fields {', '.join(columns) or '(none)'} but format {fmt.name!r} needs "
                         f"{', '.join(fmt.fields)} (missing: {', '.join(missing)}); rename the fields, or choose the "
                         f"format they fit with data.format")
    return fmt


def row_problem(what: str, index: int, row: Any, fmt: DatasetFormat, error: Exception) -> str:
    """The message for a row that a format cannot render: rows of two formats in one dataset (datasets gives a
    row the fields it lacks as null), a field the format needs left without a value, or the format's reason."""
    fields = tuple(getattr(fmt, "fields", ()))
    values = dict(row) if isinstance(row, dict) else {}
    absent = [name for name in fields if name in values and values[name] is None]
    present = [name for name, value in values.items() if value is not None and name not in fields]
    if absent and present:
        return (f"{what} rows mix formats: row {index} has {', '.join(present)} but no {', '.join(absent)}, the "
                f"fields of format {fmt.name!r} that the dataset's other rows give; put each format's rows in a file "
                f"of its own and train on one (or convert the rows to one format)")
    if absent:
        return (f"{what} row {index} has no value for {', '.join(absent)} (null or missing), which format "
                f"{fmt.name!r} needs; fill it in or drop the row")
    return (f"{what} row {index} does not fit format {fmt.name!r}: {type(error).__name__}: {error}; fix the row, or "
            f"choose the format it is in with data.format")


@dataclass(frozen=True)
class TokenizedExample:
    """One training example as token ids, with the labels the loss compares the model's predictions to.

    :ivar input_ids: the tokens the model sees.
    :ivar labels: the same tokens where the loss covers them (the answers), :data:`IGNORE_INDEX` elsewhere.
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        # Labels are compared with the next token's prediction, so the first label never counts.
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def tokenize_example(example: FormattedExample, tokenizer: Any, max_seq_length: int,
                     train_on_prompt: bool = False) -> TokenizedExample:
    """Tokenize a formatted example; tokens outside its answer spans get the label ``-100``.

    A token counts as part of an answer when its characters overlap an answer span. The result is
    truncated to ``max_seq_length`` tokens.
    """
    enc = tokenizer(example.text, return_offsets_mapping=True, add_special_tokens=example.add_special_tokens,
                    truncation=True, max_length=max_seq_length)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return TokenizedExample(ids, list(ids))
    spans = example.train_spans
    labels = []
    for tok, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(s < se and e > ss for ss, se in spans) if e > s else False
        labels.append(tok if inside else IGNORE_INDEX)
    return TokenizedExample(ids, labels)


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> "dict[str, torch.Tensor]":
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    import torch

    width = max(len(x.input_ids) for x in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _row_width(rows: Sequence[Sequence[TokenizedExample]]) -> int:
    """The tokens of the fullest row: what every packed row is filled up to."""
    return max(sum(len(x.input_ids) for x in row) for row in rows)


def pack_rows(batch: Sequence[TokenizedExample], capacity: int) -> list[list[TokenizedExample]]:
    """Examples into as few rows of at most ``capacity`` tokens as first fit (longest first) finds, then spread
    evenly over that many rows (each example, longest first, into the emptiest row it fits), so that the rows'
    width, and the filler that pads them to it, is small. An example longer than ``capacity`` gets a row of
    its own. Rows keep the examples' order, so packing is deterministic."""
    lengths = [len(x.input_ids) for x in batch]
    order = sorted(range(len(batch)), key=lambda i: -lengths[i])

    def first_fit() -> list[list[int]]:
        rows: list[list[int]] = []
        fill: list[int] = []
        for i in order:
            for r, used in enumerate(fill):
                if used + lengths[i] <= capacity:
                    rows[r].append(i)
                    fill[r] += lengths[i]
                    break
            else:
                rows.append([i])
                fill.append(lengths[i])
        return rows

    def balanced(k: int) -> list[list[int]] | None:
        rows: list[list[int]] = [[] for _ in range(k)]
        fill = [0] * k
        for i in order:
            r = min(range(k), key=lambda j: fill[j])
            if fill[r] and fill[r] + lengths[i] > capacity:
                return None
            rows[r].append(i)
            fill[r] += lengths[i]
        return rows

    def width(rows: list[list[int]]) -> int:
        return max(sum(lengths[i] for i in row) for row in rows)

    rows = first_fit()
    even = balanced(len(rows))
    if even is not None and width(even) < width(rows):
        rows = even
    return [[batch[i] for i in sorted(row)] for row in rows]


def collate_packed(batch: Sequence[TokenizedExample], row_tokens: int | None = None,
                   pad_token_id: int = 0, varlen: bool = False) -> "dict[str, torch.Tensor]":
    """Padding-free packing: the micro-batch's examples concatenated into one row, or with ``row_tokens`` into
    rows of at most that many tokens (:func:`pack_rows`).

    ``position_ids`` restart at 0 for every example: the attention implementations read the example
    boundaries from them (see :func:`qlora_core.loop.loss.check_packed_attention`), so attention stays within
    each example and costs what the examples alone would, not the square of a long row. The first label of
    every example is masked, so no example's first token is predicted from the previous example's last one; the
    padded path never predicts it either (a row's first label has no prediction), so both paths compute the
    same loss over the same answer tokens. With ``varlen`` (one row, ``row_tokens`` ignored) the batch also
    has ``cu_seq_lens``, the examples' cumulative lengths (int32), for a variable-length attention kernel,
    which needs no mask and no filler. There is no ``attention_mask``: with one, transformers would not
    look for packed sequences and would let the examples attend to each other. Rows shorter than the longest
    end with a filler segment of ``pad_token_id`` (positions from 0, no labels): a sequence of its own that
    no example attends to. ``real_token_count`` is the examples' tokens, fillers left out.
    """
    import torch

    rows = [list(batch)] if row_tokens is None or varlen else pack_rows(batch, row_tokens)
    width = _row_width(rows)
    ids, labels, positions = [], [], []
    for row in rows:
        row_ids = [t for x in row for t in x.input_ids]
        row_labels = [t for x in row for t in x.labels]
        row_pos = [p for x in row for p in range(len(x.input_ids))]
        filler = width - len(row_ids)
        ids.append(row_ids + [pad_token_id] * filler)
        labels.append(row_labels + [IGNORE_INDEX] * filler)
        row_pos += list(range(filler))
        positions.append(row_pos)
    ids_t = torch.tensor(ids, dtype=torch.long)
    labels_t = torch.tensor(labels, dtype=torch.long)
    positions_t = torch.tensor(positions, dtype=torch.long)
    labels_t[positions_t == 0] = IGNORE_INDEX
    real = sum(len(x.input_ids) for x in batch)
    out = {"input_ids": ids_t, "position_ids": positions_t, "labels": labels_t,
           "real_token_count": torch.tensor(real, dtype=torch.long)}
    if varlen:
        lengths = torch.tensor([0] + [len(x.input_ids) for x in rows[0]], dtype=torch.int32)
        out["cu_seq_lens"] = lengths.cumsum(0, dtype=torch.int32)
    return out


def real_tokens(batch: "dict[str, torch.Tensor]") -> int:
    """Tokens of a collated micro-batch that are not padding."""
    if "real_token_count" in batch:  # packed rows: their filler segments left out
        return int(batch["real_token_count"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def token_budget_batches(examples: Sequence[TokenizedExample], budget: int) -> list[list[TokenizedExample]]:
    """Split ``examples`` (in order) into micro-batches of at most ``budget`` tokens each (an example longer than
    the budget gets a micro-batch of its own): how packing fills each row, so that short examples make fewer,
    fuller forward passes instead of more, emptier ones."""
    out: list[list[TokenizedExample]] = []
    current: list[TokenizedExample] = []
    used = 0
    for x in examples:
        n = len(x.input_ids)
        if current and used + n > budget:
            out.append(current)
            current, used = [], 0
        current.append(x)
        used += n
    if current:
        out.append(current)
    return out


def packed_waste(examples: Sequence[TokenizedExample], micro_batch_size: int, row_tokens: int,
                 step_examples: int) -> float:
    """The filler segments' share of the tokens packing computes on ``examples`` (in order, ``step_examples``
    a step): each step's examples in micro-batches of up to ``micro_batch_size x row_tokens`` tokens, each
    packed into rows of up to ``row_tokens`` (as the trainer does)."""
    computed = real = 0
    for i in range(0, len(examples), max(1, step_examples)):
        for group in token_budget_batches(examples[i:i + step_examples], micro_batch_size * row_tokens):
            rows = pack_rows(group, row_tokens)
            computed += len(rows) * _row_width(rows)
            real += sum(len(x.input_ids) for x in group)
    return (computed - real) / computed if computed else 0.0


def padding_waste(examples: Sequence[TokenizedExample], micro_batch_size: int) -> dict[str, Any]:
    """What padding costs on ``examples`` taken ``micro_batch_size`` at a time, in order
    (:func:`padding_waste_of_lengths` of their lengths)."""
    return padding_waste_of_lengths([len(x.input_ids) for x in examples], micro_batch_size)


def padding_waste_of_lengths(lengths: Sequence[int], micro_batch_size: int) -> dict[str, Any]:
    """What padding costs on examples of these lengths taken ``micro_batch_size`` at a time, in order.

    :returns: ``real_tokens``; ``padded_tokens``, the tokens the padded path computes (each micro-batch is as
        wide as its longest example); ``padding_tokens`` and ``padding_waste``, their difference and its share
        of ``padded_tokens``; with packing, the tokens computed are the real ones and the waste is 0.
    """
    import numpy as np

    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (got {micro_batch_size})")
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(lengths.sum())
    padded = 0
    if len(lengths):
        starts = np.arange(0, len(lengths), micro_batch_size)
        widths = np.maximum.reduceat(lengths, starts)
        sizes = np.diff(np.append(starts, len(lengths)))
        padded = int((widths * sizes).sum())
    return {"micro_batch_size": micro_batch_size, "examples": len(lengths), "real_tokens": real,
            "padded_tokens": padded, "padding_tokens": padded - real,
            "padding_waste": (padded - real) / padded if padded else 0.0}


def tokenize_rows(rows: Any, fmt: DatasetFormat, tokenizer: Any, config: "Config",
                  what: str) -> tuple[list[FormattedExample], list[TokenizedExample]]:
    """Format and tokenize every row, one at a time; rows that end up with no answer tokens are dropped.

    The definition of a run's examples: :func:`qlora_core.loop.prepare.prepare_examples` makes the same ones in
    batches, in parallel and cached, and is tested against this.

    :returns: the kept rows, formatted and tokenized, in the same order.
    """
    kept: list[FormattedExample] = []
    out: list[TokenizedExample] = []
    dropped = 0
    for i, row in enumerate(rows):
        try:
            formatted = fmt.format(row, tokenizer)
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(row_problem(what, i, row, fmt, e)) from None
        tok = tokenize_example(formatted, tokenizer, config["train.max_seq_length"], config["data.train_on_prompt"])
        if tok.num_target_tokens == 0:
            dropped += 1
            continue
        kept.append(formatted)
        out.append(tok)
    if not out:
        raise UsageError(
            f"{what}: no row has answer tokens within train.max_seq_length={config['train.max_seq_length']} "
            f"({dropped} dropped); raise train.max_seq_length or check the data")
    return kept, out


def held_out_split(cfg: "Config", splits: Mapping[str, Any], eval_splits: Mapping[str, Any] | None) -> str | None:
    """The split the config names for the held-out rows: ``data.eval_path``'s (``eval_splits``) split
    ``data.eval_split``, else its test, validation or train split; else ``data.path``'s ``data.eval_split``;
    ``None`` when neither key names one. A split that is not there is a :class:`UsageError`."""
    if eval_splits is not None:
        split = cfg["data.eval_split"] or next((s for s in ("test", "validation", "train") if s in eval_splits),
                                               None)
        if split not in eval_splits:
            raise UsageError(f"eval dataset {cfg['data.eval_path']!r} has no split {split!r}; "
                             f"it has: {', '.join(eval_splits)} (set data.eval_split)")
        return split
    if cfg["data.eval_split"]:
        if cfg["data.eval_split"] not in splits:
            raise UsageError(f"dataset {cfg['data.path']!r} has no split {cfg['data.eval_split']!r}; "
                             f"it has: {', '.join(splits)} (set data.eval_split)")
        return cfg["data.eval_split"]
    return None


def default_held_out_split(cfg: "Config", splits: Mapping[str, Any]) -> str | None:
    """Without a named split or a ``data.eval_fraction``: ``data.path``'s test or validation split, if it has one
    besides ``data.split``."""
    return next((s for s in ("test", "validation") if s in splits and s != cfg["data.split"]), None)


def training_and_eval_rows(cfg: "Config", data_path: Callable[[str], str],
                           check_text: bool = True) -> tuple[Any, Any, str | None]:
    """The training rows and the held-out rows of a run, and where the held-out ones come from.

    The held-out rows are ``data.eval_path``'s split (``data.eval_split``, else test, validation or train), else
    ``data.path``'s ``data.eval_split``, else a ``data.eval_fraction`` of the training rows (seeded), else
    ``data.path``'s test or validation split if it has one; at most ``data.max_eval_samples`` of them.

    :param data_path: maps a configured path to the one to load (the plugins' ``qlora_resolve_data``).
    :returns: ``(train_rows, eval_rows or None, eval_split or None)``.
    """
    splits = load_rows(data_path(cfg["data.path"]), None, check_text=check_text)
    if cfg["data.split"] not in splits:
        raise UsageError(f"dataset {cfg['data.path']!r} has no split {cfg['data.split']!r}; "
                         f"it has: {', '.join(splits)} (set data.split)")
    train_rows = splits[cfg["data.split"]]
    eval_rows, eval_split = None, None
    eval_splits = (load_rows(data_path(cfg["data.eval_path"]), None, key="data.eval_path", check_text=check_text)
                   if cfg["data.eval_path"] else None)
    named = held_out_split(cfg, splits, eval_splits)
    if named is not None:
        eval_rows, eval_split = (eval_splits if eval_splits is not None else splits)[named], named
    elif cfg["data.eval_fraction"] > 0:
        if len(train_rows) < 2:
            raise UsageError(f"data.eval_fraction needs at least 2 training rows ({cfg['data.path']!r} has "
                             f"{len(train_rows)}); add rows, or set data.eval_fraction=0")
        parts = train_rows.train_test_split(test_size=cfg["data.eval_fraction"], seed=cfg["train.seed"])
        train_rows, eval_rows = parts["train"], parts["test"]
        eval_split = f"{cfg['data.split']} (held-out fraction {cfg['data.eval_fraction']:g})"
    else:
        eval_split = default_held_out_split(cfg, splits)
        eval_rows = splits[eval_split] if eval_split is not None else None
    if eval_rows is not None and cfg["data.max_eval_samples"] > 0:
        eval_rows = eval_rows.select(range(min(len(eval_rows), cfg["data.max_eval_samples"])))
    return train_rows, eval_rows, eval_split
