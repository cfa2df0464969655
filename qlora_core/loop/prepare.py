"""A dataset's rows as training examples, at any size: batched, parallel, cached on disk, read memory-mapped.

Rows are rendered by the run's dataset format, tokenized a thousand at a time by the fast tokenizer and masked
from the tokens' character offsets with array operations (no Python loop over tokens). ``data.num_proc``
processes share the rows, each running ``datasets.Dataset.map`` over a contiguous part into an Arrow file, so
the examples keep the rows' order. The Arrow files are kept under :func:`~qlora_core.framework.paths.data_cache_dir`
in a folder named by a key of everything that changes them (:func:`cache_key`): the data's content, the format
(its code and version), the tokenizer, ``train.max_seq_length`` and the masking and selection options. A second
run, a resumption or another process of the same run on the machine opens them memory-mapped instead of
preparing again; one process prepares while the others wait for it (a file lock). The loop reads examples from
the mapped files (:class:`PreparedExamples`): resident memory does not grow with the dataset.

:func:`qlora_core.loop.data.tokenize_rows` is the same preparation one row at a time: the definition the
pipeline is tested against (the same examples, masks and order for every built-in format).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from qlora_core.framework.errors import UsageError
from qlora_core.framework.paths import data_cache_dir
from qlora_core.framework.types import DatasetFormat, FormattedExample
from qlora_core.loop.data import IGNORE_INDEX, TokenizedExample, row_problem

if TYPE_CHECKING:
    import datasets
    import numpy as np

    from qlora_core.framework.config import Config

#: Bumped when the prepared layout or the preparation itself changes: old cache entries are then not used.
PIPELINE_VERSION = 1
#: Rows a worker process must have to be worth starting (starting one costs about a second).
ROWS_PER_PROCESS = 4000
#: Rows formatted and tokenized at a time.
BATCH_ROWS = 1000
#: Datasets at least this large get a progress bar on a terminal and a line saying what was prepared.
REPORT_ROWS = 10_000

_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- the report


@dataclass
class PrepareReport:
    """What preparing a dataset gave.

    :ivar what: ``"training data"`` or ``"eval data"``.
    :ivar rows: rows read; ``kept`` of them became examples, ``dropped`` had no answer token within
        ``train.max_seq_length``; ``truncated`` of the kept ones were cut at ``train.max_seq_length``.
    :ivar tokens / answer_tokens: tokens of the kept examples, and those the loss covers.
    :ivar length_percentiles: example lengths in tokens at the 50th, 90th, 99th percentile and the longest.
    :ivar seconds: how long preparing took (when it was prepared, not when read from the cache).
    :ivar processes: processes that shared the rows.
    :ivar cached: read from the cache instead of prepared now.
    :ivar path: the cache folder (``None`` with ``data.cache: false``).
    """

    what: str
    rows: int
    kept: int
    dropped: int
    truncated: int
    tokens: int
    answer_tokens: int
    length_percentiles: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    processes: int = 1
    cached: bool = False
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for the terminal."""
        p = self.length_percentiles
        lengths = (f"; lengths p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']}" if p else "")
        how = ("from the cache" if self.cached else
               f"in {self.seconds:.1f} s ({self.rows / max(self.seconds, 1e-9):,.0f} rows/s, "
               f"{self.processes} process{'es' if self.processes > 1 else ''})")
        return (f"{self.what}: {self.rows:,} rows -> {self.kept:,} examples ({self.dropped:,} dropped, "
                f"{self.truncated:,} truncated), {self.tokens:,} tokens, {self.answer_tokens:,} answer tokens"
                f"{lengths}; {how}")


# --------------------------------------------------------------------------- the examples, memory-mapped


class PreparedExamples(Sequence[TokenizedExample]):
    """Prepared examples read from Arrow files: ``examples[i]`` is a :class:`TokenizedExample` made on demand.

    :ivar lengths: every example's length in tokens (a numpy array, the only per-example data held in memory).
    """

    def __init__(self, table: "datasets.Dataset"):
        import numpy as np

        self.table = table
        self._ids = _ListColumn(table.data.column("input_ids"))
        self._labels = _ListColumn(table.data.column("labels"))
        self.lengths = np.asarray(table.data.column("length").to_numpy(), dtype=np.int64)
        self.has_text = "text" in table.column_names

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range ({len(self)} examples)")
        return TokenizedExample(self._ids.get(i), self._labels.get(i))

    def formatted(self) -> Sequence[FormattedExample]:
        """The examples as text (kept for held-out data, which evaluation and samples read as text)."""
        if not self.has_text:
            raise ValueError("these examples were prepared without their text")
        return _FormattedView(self.table)


class _ListColumn:
    """Random access to a list column of an Arrow table without copying it: each chunk's values and offsets as
    (memory-mapped) numpy arrays."""

    def __init__(self, column: Any):
        import numpy as np

        self.values, self.offsets, starts = [], [], [0]
        for chunk in column.chunks:
            self.values.append(chunk.values.to_numpy(zero_copy_only=False))
            self.offsets.append(chunk.offsets.to_numpy())
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts, dtype=np.int64)

    def get(self, i: int) -> list[int]:
        import numpy as np

        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = i - int(self.starts[k])
        off = self.offsets[k]
        return self.values[k][off[j]:off[j + 1]].tolist()


class _FormattedView(Sequence[FormattedExample]):
    def __init__(self, table: "datasets.Dataset"):
        self.table = table.select_columns(["text", "spans", "add_special_tokens"])

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        flat = row["spans"]
        spans = tuple((flat[k], flat[k + 1]) for k in range(0, len(flat), 2))
        return FormattedExample(row["text"], spans, add_special_tokens=row["add_special_tokens"])


# --------------------------------------------------------------------------- formatting and tokenizing a batch


class Encoder:
    """The batched ``map`` function: rows to tokenized, masked examples, with what the report needs.

    Its output columns: ``input_ids`` and ``labels`` (int32 lists), ``length``, ``answer_tokens``,
    ``truncated`` and the row's ``index``; with ``keep_text`` also ``text``, ``spans`` (flat start/end pairs)
    and ``add_special_tokens``. Rows without an answer token are left out.
    """

    def __init__(self, fmt: DatasetFormat, tokenizer: Any, max_seq_length: int, train_on_prompt: bool, what: str,
                 keep_text: bool = False, offset: int = 0):
        self.fmt, self.tokenizer, self.max_seq_length = fmt, tokenizer, max_seq_length
        self.train_on_prompt, self.what, self.keep_text, self.offset = train_on_prompt, what, keep_text, offset
        self.progress: Callable[[int], None] | None = None

    def format_rows(self, batch: Mapping[str, list], indices: Sequence[int]) -> list[FormattedExample]:
        names = list(batch)
        out = []
        for j, index in enumerate(indices):
            row = {k: batch[k][j] for k in names}
            try:
                out.append(self.fmt.format(row, self.tokenizer))
            except UsageError:
                raise
            except (KeyError, TypeError, ValueError) as e:
                raise UsageError(row_problem(self.what, self.offset + index, row, self.fmt, e)) from None
        return out

    def tokenize(self, formatted: Sequence[FormattedExample]) -> tuple[list[list[int]], list[Any], list[bool]]:
        """Token ids, character offsets and whether each example was cut at ``max_seq_length``, calling the
        tokenizer once per value of ``add_special_tokens`` in the batch."""
        n = len(formatted)
        ids: list[Any] = [None] * n
        offsets: list[Any] = [None] * n
        truncated = [False] * n
        for flag in (True, False):
            which = [j for j in range(n) if bool(formatted[j].add_special_tokens) is flag]
            if not which:
                continue
            enc = self.tokenizer([formatted[j].text for j in which], add_special_tokens=flag, truncation=True,
                                 max_length=self.max_seq_length, return_offsets_mapping=True,
                                 return_overflowing_tokens=True)
            # The first piece of each text is what truncation keeps; further pieces mean it was cut.
            for piece, sample in enumerate(enc["overflow_to_sample_mapping"]):
                j = which[sample]
                if ids[j] is None:
                    ids[j], offsets[j] = enc["input_ids"][piece], enc["offset_mapping"][piece]
                else:
                    truncated[j] = True
        return ids, offsets, truncated

    def labels(self, formatted: Sequence[FormattedExample], ids: Sequence[Sequence[int]],
               offsets: Sequence[Any]) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        """Flat token ids and labels of the batch and each example's length.

        A token is in an answer when its characters overlap an answer span (as in
        :func:`~qlora_core.loop.data.tokenize_example`). The batch's texts are laid end to end (each starting
        after the previous one's end) so one sorted search answers every token: with the spans sorted by start,
        those starting before a token's end are a prefix, and the token overlaps one of them when the largest end
        in that prefix is past the token's start. Spans of earlier texts end before this text starts, so they
        never match.
        """
        import numpy as np

        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat_ids = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        if self.train_on_prompt:
            return flat_ids, flat_ids.copy(), lengths
        text_len = np.fromiter((len(f.text) + 1 for f in formatted), dtype=np.int64, count=len(formatted))
        base = np.concatenate([[0], np.cumsum(text_len)[:-1]])
        offs = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offsets)), dtype=np.int64,
                           count=2 * len(flat_ids)).reshape(-1, 2)
        tok_base = np.repeat(base, lengths)
        start, end = offs[:, 0] + tok_base, offs[:, 1] + tok_base
        counts = np.fromiter((len(f.train_spans) for f in formatted), dtype=np.int64, count=len(formatted))
        spans = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(f.train_spans
                                                                                        for f in formatted)),
                            dtype=np.int64, count=2 * int(counts.sum())).reshape(-1, 2)
        span_base = np.repeat(base, counts)
        order = np.argsort(spans[:, 0] + span_base, kind="stable")
        span_start = (spans[:, 0] + span_base)[order]
        reach = np.maximum.accumulate((spans[:, 1] + span_base)[order]) if len(order) else span_start
        before = np.searchsorted(span_start, end, side="left")  # spans starting before each token's end
        inside = np.zeros(len(flat_ids), dtype=bool)
        has = before > 0
        inside[has] = reach[before[has] - 1] > start[has]
        inside &= end > start
        return flat_ids, np.where(inside, flat_ids, IGNORE_INDEX), lengths

    def __call__(self, batch: Mapping[str, list], indices: Sequence[int]) -> Any:
        import numpy as np
        import pyarrow as pa

        formatted = self.format_rows(batch, indices)
        ids, offsets, truncated = self.tokenize(formatted)
        flat_ids, flat_labels, lengths = self.labels(formatted, ids, offsets)
        # Answer tokens: labels that count (the first of an example predicts nothing).
        example = np.repeat(np.arange(len(lengths)), lengths)
        counts = flat_labels != IGNORE_INDEX
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        counts[starts[lengths > 0]] = False
        answer = np.bincount(example, weights=counts, minlength=len(lengths)).astype(np.int64)
        keep = np.flatnonzero(answer > 0)
        token_keep = (answer > 0)[example] if len(example) else np.zeros(0, dtype=bool)
        kept_lengths = lengths[keep]
        list_offsets = pa.array(np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int32))
        out = {
            "input_ids": pa.ListArray.from_arrays(list_offsets, pa.array(flat_ids[token_keep].astype(np.int32))),
            "labels": pa.ListArray.from_arrays(list_offsets, pa.array(flat_labels[token_keep].astype(np.int32))),
            "length": pa.array(kept_lengths.astype(np.int32)),
            "answer_tokens": pa.array(answer[keep].astype(np.int32)),
            "truncated": pa.array([truncated[j] for j in keep], type=pa.bool_()),
            "index": pa.array([self.offset + int(indices[j]) for j in keep], type=pa.int64()),
        }
        if self.keep_text:
            out["text"] = pa.array([formatted[j].text for j in keep], type=pa.string())
            out["spans"] = pa.array([[c for s in formatted[j].train_spans for c in s] for j in keep],
                                    type=pa.list_(pa.int32()))
            out["add_special_tokens"] = pa.array([bool(formatted[j].add_special_tokens) for j in keep],
                                                 type=pa.bool_())
        if self.progress is not None:
            self.progress(len(indices))
        return pa.table(out)


# --------------------------------------------------------------------------- the cache key


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    """A content digest of a file (read in 1 MiB pieces)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_identity(path: str, rows: Any) -> dict[str, Any]:
    """What identifies a dataset's content: the digests of its local files, or for a hub dataset the Arrow
    files ``datasets`` made of it (their paths name the revision)."""
    p = Path(path).expanduser()
    if p.is_file():
        return {"files": {p.name: file_digest(p)}}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".")
                                                                          for part in f.relative_to(p).parts))
        return {"files": {str(f.relative_to(p)): file_digest(f) for f in files}}
    cache_files = sorted(f["filename"] for f in getattr(rows, "cache_files", []) or [])
    return {"hub": path, "arrow": cache_files}


def _checked_marker(identity: Mapping[str, Any]) -> Path:
    return data_cache_dir() / "checked" / _digest(json.dumps(identity, sort_keys=True).encode())


def text_checked(identity: Mapping[str, Any]) -> bool:
    """Whether data of this content (:func:`source_identity` of local files) was read whole and found to be
    valid text by an earlier run (:func:`mark_text_checked`): a run then need not read it all again."""
    return "files" in identity and _checked_marker(identity).is_file()


def mark_text_checked(identity: Mapping[str, Any]) -> None:
    """Record that data of this content was checked (local files only; nothing when the cache is not writable)."""
    if "files" not in identity:
        return
    marker = _checked_marker(identity)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of what tokenizing and formatting read from the tokenizer: its vocabulary, rules and special
    tokens (``tokenizer.json``), its chat template and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = repr(tokenizer)
    if backend is not None:
        # The truncation and padding the last call asked for are kept on the tokenizer too; they are not its
        # own (transformers sets them again on every call), so they are left out while it is written out.
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            rules = backend.to_str()
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
    parts = [type(tokenizer).__name__, rules,
             str(getattr(tokenizer, "chat_template", None)), repr(getattr(tokenizer, "special_tokens_map", {})),
             str(getattr(tokenizer, "eos_token", None)), str(getattr(tokenizer, "bos_token", None))]
    return _digest("\x00".join(parts).encode())


def format_identity(fmt: DatasetFormat) -> dict[str, Any]:
    """What identifies a dataset format's behaviour: its name, class, attributes, the source of every module
    its class is built from, and the version of the package it comes from."""
    modules = {}
    for cls in type(fmt).__mro__:
        if cls is object:
            continue
        try:
            source = inspect.getsource(sys.modules[cls.__module__])
        except (OSError, TypeError, KeyError):
            source = ""
        modules[cls.__module__] = _digest(source.encode())
    top = sys.modules.get(type(fmt).__module__.split(".")[0])
    attributes = {k: repr(v) for k, v in sorted(vars(fmt).items())} if hasattr(fmt, "__dict__") else {}
    return {"name": fmt.name, "class": f"{type(fmt).__module__}.{type(fmt).__qualname__}", "modules": modules,
            "version": str(getattr(top, "__version__", "")), "attributes": attributes}


def cache_key(parts: Mapping[str, Any]) -> str:
    """The cache folder's name for a preparation described by ``parts`` (JSON-able)."""
    return _digest(json.dumps({"pipeline": PIPELINE_VERSION, **parts}, sort_keys=True, default=repr).encode())


# --------------------------------------------------------------------------- preparing


def default_processes() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def processes_for(rows: int, wanted: int) -> int:
    """Worker processes for ``rows`` rows: ``wanted`` (0: every core), fewer when there are too few rows to
    be worth a process each."""
    wanted = wanted or default_processes()
    return max(1, min(wanted, rows // ROWS_PER_PROCESS))


def prepare_examples(rows: "datasets.Dataset", fmt: DatasetFormat, tokenizer: Any, config: "Config", what: str,
                     source: Mapping[str, Any], keep_text: bool = False,
                     announce: Callable[[str], None] | None = None,
                     cache: bool | None = None) -> tuple[PreparedExamples, PrepareReport]:
    """Format, tokenize and mask ``rows``; from the cache when it has them.

    :param source: what identifies the rows (:func:`source_identity` plus how they were selected), part of the
        cache key.
    :param keep_text: keep each example's text and answer spans too (:meth:`PreparedExamples.formatted`).
    :param announce: called with a line saying what was prepared or found, for datasets of at least
        :data:`REPORT_ROWS` rows.
    :param cache: whether to use the data cache (default: ``data.cache``); rows taken from a stream are not
        cached, having no content to key them by but themselves.
    :raises UsageError: a row that does not fit the format (naming it), no row with an answer token, or a cache
        folder that cannot be written.
    """
    max_len, on_prompt = config["train.max_seq_length"], config["data.train_on_prompt"]
    parts = {"what": what, "source": source, "format": format_identity(fmt), "tokenizer": tokenizer_identity(tokenizer),
             "max_seq_length": max_len, "train_on_prompt": on_prompt, "keep_text": keep_text, "rows": len(rows)}
    key = cache_key(parts)
    encoder = Encoder(fmt, tokenizer, max_len, on_prompt, what, keep_text)
    procs = processes_for(len(rows), config["data.num_proc"])
    if config["data.cache"] if cache is None else cache:
        root = data_cache_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the data cache {root} ({e.strerror or e}); set QLORA_DATA_CACHE to a "
                             f"writable folder, or data.cache=false") from None
        from filelock import FileLock

        with FileLock(str(root / f".{key}.lock")):  # another process of this run (or another run) may be preparing
            folder = root / key
            found = _open(folder)
            if found is not None:
                examples, report = found
                report.cached = True
            else:
                examples, report = _prepare_into(rows, encoder, procs, root, key, what)
    else:
        examples, report = _prepare_into(rows, encoder, procs, None, key, what)
    if not len(examples):
        raise UsageError(f"{what}: no row has answer tokens within train.max_seq_length={max_len} "
                         f"({report.dropped} dropped); raise train.max_seq_length or check the data")
    if announce is not None and report.rows >= REPORT_ROWS:
        announce(report.line() + (f"; kept in {report.path}" if report.path and not report.cached else ""))
    return examples, report


def _open(folder: Path) -> tuple[PreparedExamples, PrepareReport] | None:
    """A complete cache entry, opened; ``None`` when there is none (or it is damaged)."""
    import datasets

    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
        parts = [datasets.Dataset.from_file(str(folder / name)) for name in info["files"]]
        table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        report = PrepareReport(**info["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report.path = str(folder)
    return PreparedExamples(table), report


def _prepare_into(rows: "datasets.Dataset", encoder: Encoder, procs: int, root: Path | None, key: str,
                  what: str) -> tuple[PreparedExamples, PrepareReport]:
    """Prepare into a new folder; in the cache it is written under a temporary name and renamed when complete,
    so an interrupted preparation never leaves an entry that looks finished."""
    import datasets

    if root is None:
        work = Path(tempfile.mkdtemp(prefix="qlora-prepared-"))
        _remove_at_exit(work)
    else:
        for stale in root.glob(f".{key}.tmp-*"):  # under the lock: left by an interrupted preparation
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    began = time.perf_counter()
    try:
        with _progress(what, len(rows)) as advance:
            files = _map_parts(rows, encoder, procs, work, advance)
        parts = [datasets.Dataset.from_file(str(work / name)) for name in files]
        table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        examples = PreparedExamples(table)
        report = _report(what, len(rows), table, examples, time.perf_counter() - began, procs)
        if root is None:
            return examples, report
        (work / _MANIFEST).write_text(json.dumps({"files": files, "report": report.to_dict()}, indent=1))
        folder = root / key
        if folder.exists():  # damaged (no manifest): replaced
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    opened = _open(folder)
    if opened is None:
        raise UsageError(f"the prepared data in {folder} cannot be read back; delete it, or set data.cache=false")
    report.path = str(folder)
    return opened[0], report


def _report(what: str, rows: int, table: "datasets.Dataset", examples: PreparedExamples, seconds: float,
            procs: int) -> PrepareReport:
    import numpy as np

    lengths = examples.lengths
    pct = ({"p50": int(np.percentile(lengths, 50)), "p90": int(np.percentile(lengths, 90)),
            "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max())} if len(lengths) else {})
    answer = int(np.asarray(table.data.column("answer_tokens").to_numpy(), dtype=np.int64).sum())
    truncated = int(np.asarray(table.data.column("truncated").to_numpy(zero_copy_only=False)).sum())
    return PrepareReport(what, rows, len(lengths), rows - len(lengths), truncated, int(lengths.sum()), answer, pct,
                         round(seconds, 3), procs)


def _map_parts(rows: "datasets.Dataset", encoder: Encoder, procs: int, work: Path,
               advance: Callable[[int], None]) -> list[str]:
    """Run the encoder over ``rows`` in ``procs`` contiguous parts, each into ``part-N.arrow`` in ``work``."""
    bounds = [len(rows) * i // procs for i in range(procs + 1)]
    names = [f"part-{i:05d}.arrow" for i in range(procs)]
    if procs == 1:
        encoder.progress = advance
        try:
            _map_part(rows, encoder, 0, len(rows), work / names[0])
        finally:
            encoder.progress = None
        return names
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    global _FORKED
    _FORKED = (rows, encoder, bounds, [work / n for n in names], counter)
    # The tokenizer must not use threads in the forked processes; setting this before forking also keeps the
    # tokenizers library from warning about it. It is put back once the workers exist.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ctx.Pool(procs) as pool:
            _restore_env("TOKENIZERS_PARALLELISM", previous)
            pending = pool.map_async(_forked_part, range(procs))
            done = 0
            while not pending.ready():
                pending.wait(0.2)
                now = counter.value
                advance(now - done)
                done = now
            problems = [p for p in pending.get() if p]
    finally:
        _restore_env("TOKENIZERS_PARALLELISM", previous)
        _FORKED = None
    if problems:
        raise UsageError(problems[0])  # the parts are in row order: the first is the first bad row
    return names


_FORKED: Any = None


def _forked_part(i: int) -> str | None:
    rows, encoder, bounds, paths, counter = _FORKED

    def count(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    encoder.offset, encoder.progress = bounds[i], count
    try:
        _map_part(rows, encoder, bounds[i], bounds[i + 1], paths[i])
    except UsageError as e:
        return str(e)
    return None


def _map_part(rows: "datasets.Dataset", encoder: Encoder, start: int, stop: int, path: Path) -> None:
    import datasets

    part = rows.select(range(start, stop)) if (start, stop) != (0, len(rows)) else rows
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        part.map(encoder, batched=True, batch_size=BATCH_ROWS, with_indices=True, remove_columns=part.column_names,
                 cache_file_name=str(path), load_from_cache_file=False, new_fingerprint=path.stem + str(start),
                 keep_in_memory=False)
    finally:
        if was:
            datasets.enable_progress_bars()


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _remove_at_exit(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, True)


class _progress:
    """A rich progress bar on stderr (rows done, rows per second) while a large dataset is prepared on a
    terminal; nothing otherwise. Entered, it gives the function that advances it."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.bar = what, total, None

    def __enter__(self) -> Callable[[int], None]:
        if self.total < REPORT_ROWS or not sys.stderr.isatty():
            return lambda n: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:,.0f} rows/s" if task.speed else "")

        self.bar = Progress(TextColumn("preparing {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("rows"), Rate(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total)
        return lambda n: self.bar.advance(task, n) if n else None

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- streamed data


class StreamedExamples:
    """Training examples made from a stream of rows as training reads them (``data.streaming``): nothing is
    downloaded or prepared ahead, and memory holds one batch of rows at a time.

    The stream is read pass after pass, each pass shuffled in a buffer of ``data.shuffle_buffer`` rows with a
    seed of ``train.seed`` and the pass, so a run and its resumption see the same examples in the same order (a
    resumption reads the stream again up to where the run stopped). ``len()`` is the examples of one pass once a
    pass has been read whole, 0 before.
    """

    streaming = True

    def __init__(self, rows: Any, encoder: Encoder, shuffle_buffer: int, seed: int):
        self.rows, self.encoder, self.shuffle_buffer, self.seed = rows, encoder, shuffle_buffer, seed
        self.pass_length: int | None = None  # examples in one pass, once one was read whole
        self._pass, self._pos, self._it = 0, 0, self._read(0)  # _pos: examples handed out from the start

    def __len__(self) -> int:
        return self.pass_length or 0

    def __bool__(self) -> bool:
        return True

    def _read(self, n: int) -> Iterator[TokenizedExample]:
        rows = self.rows
        if self.shuffle_buffer:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            rows.set_epoch(n)
        start = 0
        for batch in rows.iter(batch_size=BATCH_ROWS):
            names = list(batch)
            size = len(batch[names[0]]) if names else 0
            table = self.encoder(batch, range(start, start + size))
            start += size
            ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
            yield from (TokenizedExample(i, l) for i, l in zip(ids, labels))

    def take(self, start: int, count: int) -> list[TokenizedExample]:
        """The examples ``start .. start+count`` of the endless stream, pass after pass."""
        if start < self._pos:  # a resumption (or a rewind): read again from the first pass
            self._pass, self._pos, self._it = 0, 0, self._read(0)
        out: list[TokenizedExample] = []
        while len(out) < count or self._pos < start:
            try:
                example = next(self._it)
            except StopIteration:
                if self.pass_length is None:
                    self.pass_length = self._pos if self._pass == 0 else self.pass_length
                if not self.pass_length:
                    raise UsageError(f"{self.encoder.what}: the stream has no row with answer tokens within "
                                     f"train.max_seq_length={self.encoder.max_seq_length}; raise "
                                     f"train.max_seq_length or check the data") from None
                self._pass += 1
                self._it = self._read(self._pass)
                continue
            if self._pos >= start:
                out.append(example)
            self._pos += 1
        return out

    def passes_done(self, seen: int) -> int:
        """Whole passes over the stream in the first ``seen`` examples (0 until a pass's length is known)."""
        return seen // self.pass_length if self.pass_length else 0
