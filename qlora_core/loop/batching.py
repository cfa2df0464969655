"""A run's micro-batches: the order of the training examples epoch after epoch (the same for a run and its
resumption), each process's share of a step, the micro-batches of a step, and how they are collated (a plugin's
:func:`~qlora_core.hookspecs.qlora_collate`, else right-padded or packed into rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from qlora_core.loop.data import TokenizedExample, collate, collate_packed, real_tokens, token_budget_batches

if TYPE_CHECKING:
    import torch


def epoch_order(n: int, seed: int, epoch: int) -> "torch.Tensor":
    """The order of ``n`` training examples in ``epoch``: a seeded permutation, the same on every run (a
    tensor: 8 bytes an example, where a list would take 36)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


class Batching:
    """How a run's training examples become micro-batches.

    :param config: the run's config (batch sizes, ``train.packing``, ``train.max_seq_length``, ``train.seed``).
    :param hook: the run's hooks (``qlora_collate``).
    :param pad_token_id: the tokenizer's pad token.
    :param examples: the training examples.
    """

    def __init__(self, config: Any, hook: Any, pad_token_id: int, examples: Sequence[TokenizedExample]):
        self.config = config
        self.hook = hook
        self.pad_token_id = pad_token_id
        self.examples = examples
        self._order_cache: dict[str, Any] = {}
        self._lengths: Any = None

    @property
    def lengths(self) -> Any:
        """Every training example's length in tokens (a numpy array; prepared examples carry it)."""
        if self._lengths is None:
            import numpy as np

            given = getattr(self.examples, "lengths", None)
            self._lengths = (np.asarray(given) if given is not None else
                             np.fromiter((len(x.input_ids) for x in self.examples), dtype=np.int64,
                                         count=len(self.examples)))
        return self._lengths

    def step_lengths(self, start: int, count: int, rank: int, world: int) -> Any:
        """The lengths of :meth:`step_examples`'s examples, without making the examples."""
        import numpy as np

        n = len(self.examples)
        parts = []
        pos = start
        while count > 0:
            epoch, offset = divmod(pos, n)
            take = min(count, n - offset)
            parts.append(self.epoch_order(epoch)[offset:offset + take].numpy())
            pos += take
            count -= take
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self.lengths[ids[rank::world]]

    def collate(self, examples: Sequence[TokenizedExample]) -> "dict[str, torch.Tensor]":
        """One micro-batch: with ``train.packing`` packed into rows of up to ``train.max_seq_length`` tokens
        (attention within each example costs what it would unpacked: one long row would cost its square), else
        right-padded. A plugin's :func:`~qlora_core.hookspecs.qlora_collate` comes first."""
        batch = self.hook.qlora_collate(examples=examples, config=self.config, pad_token_id=self.pad_token_id)
        if batch is not None:
            return batch
        if self.config["train.packing"]:
            return collate_packed(examples, self.config["train.max_seq_length"], self.pad_token_id)
        return collate(examples, self.pad_token_id)

    def micro_batches(self, examples: Sequence[TokenizedExample], size: int) -> list[list[TokenizedExample]]:
        """A step's examples in micro-batches: of ``size`` examples, or with ``train.packing`` of up to
        ``size x train.max_seq_length`` tokens (packed into rows by :meth:`collate`)."""
        if self.config["train.packing"]:
            return token_budget_batches(examples, size * self.config["train.max_seq_length"])
        return [list(examples[i:i + size]) for i in range(0, len(examples), size)]

    def examples_per_step(self, world: int) -> int:
        """Examples in one optimizer step across all processes: the effective batch."""
        cfg = self.config
        return cfg["train.per_device_train_batch_size"] * cfg["train.gradient_accumulation_steps"] * world

    def epoch_order(self, epoch: int) -> "torch.Tensor":
        """The data order of one epoch: a seeded permutation, the same for a run and its resumption."""
        if self._order_cache.get("epoch") != epoch:
            self._order_cache = {"epoch": epoch, "order": epoch_order(len(self.examples),
                                                                      self.config["train.seed"], epoch)}
        return self._order_cache["order"]

    def epochs(self, seen: int) -> tuple[float, int]:
        """How far ``seen`` examples are into the data: ``(epochs as a fraction, whole epochs)``; a stream's
        whole passes only (its length is known once one was read)."""
        if getattr(self.examples, "streaming", False):
            done = self.examples.passes_done(seen)
            return float(done), done
        n = len(self.examples)
        return round(seen / n, 4), seen // n

    def step_examples(self, start: int, count: int, rank: int, world: int) -> list[TokenizedExample]:
        """This process's share of the examples ``start .. start+count`` of the endless epoch-by-epoch stream."""
        if getattr(self.examples, "streaming", False):
            return self.examples.take(start, count)[rank::world]
        n = len(self.examples)
        ids: list[int] = []
        pos = start
        while len(ids) < count:
            epoch, offset = divmod(pos, n)
            take = min(count - len(ids), n - offset)
            ids.extend(self.epoch_order(epoch)[offset:offset + take].tolist())
            pos += take
        return [self.examples[i] for i in ids[rank::world]]

    def max_micro_batch_tokens(self) -> int:
        """The most tokens a micro-batch holds (batch x sequence): with packing, micro-batch x max_seq_length;
        padded, micro-batch x the longest example."""
        cfg = self.config
        size = cfg["train.per_device_train_batch_size"]
        if getattr(self.examples, "streaming", False):
            return size * cfg["train.max_seq_length"]
        longest = int(self.lengths.max()) if len(self.lengths) else 0
        width = cfg["train.max_seq_length"] if cfg["train.packing"] else min(longest, cfg["train.max_seq_length"])
        return size * width

    def filler_waste(self, examples: Sequence[TokenizedExample], micro_batch_size: int) -> float:
        """The share of the tokens computed on ``examples`` (this process's, in order) that is filler: each step's
        examples in the run's micro-batches (:meth:`micro_batches`), made by :meth:`collate`, their real tokens
        against all they hold (``input_ids``)."""
        step = micro_batch_size * self.config["train.gradient_accumulation_steps"]
        computed = real = 0
        for i in range(0, len(examples), step):
            for group in self.micro_batches(examples[i:i + step], micro_batch_size):
                batch = self.collate(group)
                computed += batch["input_ids"].numel()
                real += real_tokens(batch)
        return (computed - real) / computed if computed else 0.0

    def padding_message(self, waste: dict[str, Any]) -> str:
        mb, share = waste["micro_batch_size"], f"{waste['padding_waste']:.1%}"
        counts = f"{waste['padding_tokens']:,} of {waste['padded_tokens']:,} tokens an epoch"
        if self.config["train.packing"]:
            return (f"packing: micro-batches of up to {mb} x train.max_seq_length tokens "
                    f"({waste.get('packed_filler_waste', 0.0):.1%} filler); "
                    f"padded micro-batches of {mb} would be {share} padding ({counts})")
        return (f"padding: {share} of the tokens in micro-batches of {mb} are padding ({counts}); "
                f"train.packing=true would compute only the {waste['real_tokens']:,} real ones")
