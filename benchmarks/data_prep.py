"""Data preparation at scale: qlora's pipeline beside a bare batched tokenizer pass, cold and cached, and the
resident memory of a run's data.

For each size given (default 50,000 and 1,000,000 rows) it writes a generated guanaco-format JSONL file (one
to three turns, 30 to 380 words in all, words drawn from a fixed list, seeded), then measures, each in a fresh
process so that timings and peak memory are its own:

- ``bare``: the fast tokenizer's batched call over the rows' texts, 1,000 at a time, with its own threads,
  ids only: what tokenizing alone costs (reading the texts is not timed);
- ``first``: ``Job.load_data()`` with empty caches (``datasets``' and qlora's): reading the file, formatting,
  tokenizing, masking and writing the prepared Arrow files;
- ``cached``: the same again, the prepared data found in the cache;
- ``memory``: the resident memory a run's data adds: after the cached ``load_data()`` and reading 20,000
  examples in training order (as the loop does), over the process before loading the data; the process's own
  memory (anonymous) apart from the pages of the memory-mapped Arrow files it has read (file-backed: the
  kernel reads ahead around each example, and drops them again when memory is short).

    python benchmarks/data_prep.py [--rows 50000 1000000] [--work DIR] [--num-proc N] [--output results.json]

Targets on 2 CPU cores: ``first`` at most 1.5 times ``bare``, ``cached`` under 10% of ``first``, and at a
million rows under about 1 GiB of memory. The figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his her an be have it are this which or had not "
         "but what all were when we there can been one do if will would more so who up out about them some could "
         "into than then its only other new time these two may first any like over such our even most after also "
         "made many well way before must through back years where much your because good each those people "
         "river mountain garden library window engine question answer history science music").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """``n`` guanaco rows of 30 to 380 words in all."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            total = rng.randint(30, 380)
            turns = rng.randint(1, 3)
            parts = []
            for t in range(turns):
                words = max(2, total // (2 * turns))
                human = " ".join(rng.choices(WORDS, k=max(1, words // 2)))
                answer = " ".join(rng.choices(WORDS, k=words + words // 2))
                parts.append(f"### Human: {human}### Assistant: {answer}")
            f.write(json.dumps({"text": "".join(parts)}) + "\n")


def config(data: Path, num_proc: int) -> dict:
    return {"model": {"name_or_path": "embedded:smollm2-135m-instruct"},
            "data": {"path": str(data), "num_proc": num_proc},
            "train": {"max_seq_length": 512}}


def rss_mib() -> dict[str, float]:
    """This process's resident memory now, from /proc (MiB): ``anon``, what it holds itself (heap, arrays), and
    ``file``, pages of memory-mapped files (the prepared Arrow files) that it has read, which the kernel drops
    again when memory is short, as it does the page cache."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            for key, name in (("RssAnon:", "anon"), ("RssFile:", "file")):
                if line.startswith(key):
                    out[name] = int(line.split()[1]) / 1024
    return out


def phase(name: str, data: Path, num_proc: int) -> dict:
    """One measurement, in this (fresh) process."""
    from qlora_core import Job

    if name == "bare":
        import datasets

        job = Job(config(data, num_proc))
        tok = job.load_tokenizer()
        texts = datasets.load_dataset("json", data_files=str(data), split="train")["text"]
        began = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 1000):
            enc = tok(texts[i:i + 1000], truncation=True, max_length=512)
            tokens += sum(len(x) for x in enc["input_ids"])
        return {"seconds": time.perf_counter() - began, "tokens": tokens}
    import datasets  # noqa: F401  (the libraries' own memory is not the data's)
    import pyarrow  # noqa: F401

    job = Job(config(data, num_proc))
    job.load_tokenizer()
    before = rss_mib()
    began = time.perf_counter()
    job.load_data()
    seconds = time.perf_counter() - began
    out = {"seconds": seconds, "report": job.data_reports["train"].to_dict()}
    if name == "memory":
        batching = job._batching()
        for start in range(0, 20_000, 1000):
            batching.step_examples(start, 1000, 0, 1)
        after = rss_mib()
        out["extra_anon_mib"] = after["anon"] - before["anon"]
        out["extra_file_mib"] = after["file"] - before["file"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(name: str, data: Path, num_proc: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--data", str(data),
                          "--num-proc", str(num_proc)], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 1_000_000])
    parser.add_argument("--work", type=Path, help="folder for the generated data and caches (default: a temporary "
                                                  "one, removed at the end)")
    parser.add_argument("--num-proc", type=int, default=0, help="data.num_proc (0: one process per core)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.data, args.num_proc)))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-data-prep-"))
    results = []
    try:
        for n in args.rows:
            folder = work / f"rows-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            data = folder / "data.jsonl"
            if not data.is_file():
                print(f"writing {n:,} rows to {data} ...", file=sys.stderr, flush=True)
                write_rows(data, n)
            for cache in ("hf", "prepared"):
                shutil.rmtree(folder / cache, ignore_errors=True)
            env = dict(os.environ, HF_DATASETS_CACHE=str(folder / "hf"), QLORA_DATA_CACHE=str(folder / "prepared"),
                       HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            row = {"rows": n, "file_mib": data.stat().st_size / 2**20}
            for name in ("bare", "first", "cached", "memory"):
                print(f"{n:,} rows: {name} ...", file=sys.stderr, flush=True)
                row[name] = measure(name, data, args.num_proc, env)
            row["first_over_bare"] = row["first"]["seconds"] / row["bare"]["seconds"]
            row["cached_over_first"] = row["cached"]["seconds"] / row["first"]["seconds"]
            results.append(row)
            report = row["first"]["report"]
            print(f"{n:,} rows ({row['file_mib']:.0f} MiB, {report['tokens']:,} tokens, {report['processes']} "
                  f"processes): bare tokenizer {row['bare']['seconds']:.1f} s | first {row['first']['seconds']:.1f} s "
                  f"({row['first_over_bare']:.2f}x bare, peak {row['first']['peak_rss_mib']:,.0f} MiB) | cached "
                  f"{row['cached']['seconds']:.2f} s ({row['cached_over_first']:.1%} of first) | after 20,000 examples "
                  f"read: +{row['memory']['extra_anon_mib']:,.0f} MiB of the process's own memory, "
                  f"+{row['memory']['extra_file_mib']:,.0f} MiB of mapped file pages", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
