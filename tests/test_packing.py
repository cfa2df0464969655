"""Padding-free packing (``train.packing``): examples packed into rows of up to max_seq_length tokens, attention
and loss kept within each example."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml

from qlora_core import cli
from qlora_core.loop.data import (IGNORE_INDEX, TokenizedExample, collate, collate_packed, pack_rows, packed_waste,
                             padding_waste, real_tokens)
from qlora_core.framework.errors import UsageError
from qlora_core import Job, model_inputs
from qlora_core.loop.loss import check_packed_attention
from qlora_core.loop.loss import token_loss_sum as _token_loss_sum
from qlora_plugins import fused_loss
from qlora_plugins import varlen_packing as varlen

from conftest import write_jsonl


def ragged_examples(vocab: int, lengths=(5, 17, 9, 30), seed: int = 0) -> list[TokenizedExample]:
    """Examples of the given lengths whose second half is the answer (labels), the rest prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2:]))
    return out


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    # use_cache stays at its default (True): the trainer must not let a cache turn off packed-sequence detection.
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [None, 32])
def test_packed_forward_gives_each_example_the_logits_it_has_alone(attn, row_tokens):
    """One row, or rows of up to 32 tokens ending in filler segments: every example's logits as alone."""
    model = tiny_llama(attn)
    examples = ragged_examples(200)  # 5, 17, 9, 30 tokens: with rows of 32, [30] [5 17 9] and a filler of 1
    batch = collate_packed(examples, row_tokens)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    rows = [list(examples)] if row_tokens is None else pack_rows(examples, row_tokens)
    assert logits.shape[0] == len(rows) == (1 if row_tokens is None else 2)
    for r, row in enumerate(rows):
        start = 0
        for x in row:
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([x.input_ids])).logits[0]
            n = len(x.input_ids)
            torch.testing.assert_close(logits[r, start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_rows_are_packed_longest_first_up_to_the_row_size_with_filler_segments():
    examples = ragged_examples(200, lengths=(3, 5, 2, 6))
    rows = pack_rows(examples, 8)
    assert [[len(x.input_ids) for x in row] for row in rows] == [[2, 6], [3, 5]]  # first fit, longest first
    batch = collate_packed(examples, row_tokens=8, pad_token_id=7)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert real_tokens(batch) == 16
    uneven = collate_packed(ragged_examples(200, lengths=(6, 3, 2)), row_tokens=6, pad_token_id=7)
    assert uneven["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]  # a filler of 1
    assert uneven["input_ids"][1, -1] == 7 and uneven["labels"][1, -1] == IGNORE_INDEX
    assert real_tokens(uneven) == 11
    assert pack_rows(ragged_examples(200, lengths=(9, 2)), 8) == [[ragged_examples(200, lengths=(9, 2))[0]],
                                                                  [ragged_examples(200, lengths=(9, 2))[1]]]


def test_packed_batch_is_one_row_with_positions_restarting_and_no_padding():
    examples = ragged_examples(200, lengths=(3, 5, 2))
    batch = collate_packed(examples)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["input_ids"][0].tolist() == [t for x in examples for t in x.input_ids]
    assert "attention_mask" not in batch  # with one, transformers would not read the boundaries from positions


def test_no_example_is_predicted_from_the_previous_examples_last_token():
    # Labels on every token (train_on_prompt): each example's first token is a label, and would be a target
    # predicted from the previous example's last token if the boundary were not masked.
    examples = [TokenizedExample(ids, list(ids)) for ids in ([5, 6, 7], [8, 9], [10, 11, 12, 13])]
    labels = collate_packed(examples)["labels"][0].tolist()
    assert labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, 11, 12, 13]
    padded = collate(examples, pad_token_id=0)
    assert int((padded["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(x.num_target_tokens for x in examples) == 6


@pytest.fixture
def lora_model(tiny_config, tmp_path):
    """The tiny Llama in 4 bits with LoRA, its B matrices made non-zero so every adapter gets a gradient."""
    model = Job(tiny_config, output_dir=tmp_path / "run").load_model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def token_loss(model, batch):
    """The loss as a run computes it: the fused-loss plugin's (the head on the answer positions), or the core's
    (the model's logits) for a model the plugin does not serve."""
    found = fused_loss.token_loss_sum(model, batch)
    return found if found is not None else _token_loss_sum(model, batch)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = token_loss(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), n, grads


@pytest.mark.parametrize("head", ["answer-positions", "full-logits"])
def test_a_packed_micro_batch_gives_the_padded_loss_and_lora_gradients(lora_model, head, monkeypatch):
    if head == "full-logits":  # the path of architectures whose head cannot run on chosen positions only
        monkeypatch.setattr(fused_loss, "_PLAIN_HEAD_MODELS", frozenset())
    model = lora_model
    model.train()
    examples = ragged_examples(model.get_input_embeddings().weight.shape[0], lengths=(7, 25, 12, 40))
    pad_loss, pad_n, pad_grads = loss_and_grads(model, collate(examples, pad_token_id=0))
    # one row, rows of up to 45 tokens ([40 + a filler of 4] and [25 12 7]), and one row for the varlen attention
    for batch in (collate_packed(examples), collate_packed(examples, row_tokens=45),
                  collate_packed(examples, varlen=True)):
        if "cu_seq_lens" in batch:
            with varlen.attention_of(model):
                pack_loss, pack_n, pack_grads = loss_and_grads(model, batch)
        else:
            pack_loss, pack_n, pack_grads = loss_and_grads(model, batch)
        assert pack_n == pad_n == sum(x.num_target_tokens for x in examples)
        assert pack_loss == pytest.approx(pad_loss, rel=1e-5)
        assert len(pack_grads) == len(pad_grads) > 0
        for name, grad in pad_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(pack_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_model_whose_attention_crosses_packed_examples_is_refused(lora_model, monkeypatch):
    check_packed_attention(lora_model)  # transformers keeps attention within each example
    import transformers.masking_utils as masking

    # As if transformers did not read the boundaries from position_ids (older versions, or with a cache).
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(UsageError, match="train.packing: .* lets packed examples attend to each other"):
        check_packed_attention(lora_model)


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                      **kwargs):
    """Attention as flash attention's varlen path does it: the examples' bounds from position_ids, no mask."""
    import torch.nn.functional as F

    bounds = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    is_causal=True, scale=scaling)
                     for a, b in zip(bounds, bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def test_an_attention_that_takes_the_bounds_from_positions_only_passes_the_packing_check():
    # No CPU flash attention here; this stand-in ignores the attention mask as flash attention's varlen path
    # does, so the check must not rely on a mask to show what crossing would change.
    from transformers import AttentionInterface

    AttentionInterface.register("qlora_test_varlen", _varlen_attention)
    model = tiny_llama("qlora_test_varlen")
    examples = ragged_examples(200)
    with torch.no_grad():
        packed = model(**model_inputs(collate_packed(examples))).logits[0]
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    start = len(examples[0].input_ids)
    torch.testing.assert_close(packed[start:start + len(examples[1].input_ids)], alone, atol=1e-5, rtol=1e-5)
    check_packed_attention(model)


def test_padding_waste_of_a_ragged_list():
    examples = [TokenizedExample([1] * n, [1] * n) for n in (2, 8, 4, 4, 6)]
    # Micro-batches of 2: [2, 8] -> 2 x 8, [4, 4] -> 2 x 4, [6] -> 1 x 6: 30 tokens computed, 24 real.
    assert padding_waste(examples, 2) == {"micro_batch_size": 2, "examples": 5, "real_tokens": 24,
                                          "padded_tokens": 30, "padding_tokens": 6, "padding_waste": 0.2}
    assert padding_waste(examples, 1)["padding_waste"] == 0.0


def test_qlora_run_with_packing_trains_counts_real_tokens_and_writes_an_adapter(tiny_config, tmp_path, capsys):
    cfg = copy.deepcopy(tiny_config)
    # Ragged answers: from a few words to a long list, so micro-batches would need padding.
    rows = [{"text": f"### Human: List {i} items.### Assistant: " + ", ".join(f"item {j}" for j in range(1 + 3 * i))}
            for i in range(8)]
    cfg["data"]["path"] = str(write_jsonl(tmp_path / "ragged.jsonl", rows))
    cfg["train"].update(max_steps=2, per_device_train_batch_size=4)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    code = cli.main(["run", str(config), "--output", str(out), "--set", "train.packing=true"])
    assert code == 0, capsys.readouterr()
    assert (out / "adapter" / "adapter_config.json").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed"
    waste = record["summary"]["padding_waste"]
    assert waste["real_tokens"] < waste["padded_tokens"] and waste["padding_waste"] > 0.2
    # Each step's tokens are the real tokens of its examples, as the padded path counts them.
    job = Job(config, overrides=["train.packing=true"])
    job.load_data()
    # The filler reported is what the run's micro-batches held: on the CPU rows of up to max_seq_length tokens.
    first_epoch = job._step_examples(0, len(job.train_examples), 0, 1)
    expected = packed_waste(first_epoch, micro_batch_size=4, row_tokens=64, step_examples=4)
    assert waste["packed_filler_waste"] == pytest.approx(expected)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    for i, row in enumerate(steps):
        examples = job._step_examples(4 * i, 4, 0, 1)
        assert row["tokens"] == sum(len(x.input_ids) for x in examples)
        assert row["tokens_per_second"] > 0


def test_token_budget_batches_fill_rows_in_order():
    from qlora_core.loop.data import token_budget_batches

    examples = [TokenizedExample(list(range(n)), list(range(n))) for n in (5, 3, 4, 10, 2, 1)]
    groups = token_budget_batches(examples, 8)
    assert [[len(x.input_ids) for x in g] for g in groups] == [[5, 3], [4], [10], [2, 1]]
    assert [x for g in groups for x in g] == examples  # every example once, in order


def test_packing_makes_fewer_fuller_micro_batches_for_the_same_step(tiny_config, tmp_path, monkeypatch):
    """With gradient accumulation, packed micro-batches hold up to micro-batch x max_seq_length tokens (in rows of
    up to max_seq_length): the step's short examples take fewer forward passes, and the step (same examples)
    trains the same."""
    cfg = copy.deepcopy(tiny_config)
    cfg["train"].update(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                        max_seq_length=64, sample_max_new_tokens=0)
    calls = []
    real = fused_loss.token_loss_sum

    def counting(model, batch, fused=True):
        if model.training:
            calls.append(batch["input_ids"].shape)
        return real(model, batch, fused)

    monkeypatch.setattr(fused_loss, "token_loss_sum", counting)
    padded = Job(cfg, output_dir=tmp_path / "padded").run()
    padded_calls, calls[:] = list(calls), []
    packed = Job(cfg, overrides=["train.packing=true"], output_dir=tmp_path / "packed").run()
    assert len(padded_calls) == 2 * 4  # 4 micro-batches of 2 examples a step
    assert len(calls) < len(padded_calls)  # the guanaco rows are short: several fit a 128-token micro-batch
    assert all(shape[1] <= 64 for shape in calls)  # ... in rows of up to max_seq_length tokens
    losses = [[r["loss"] for r in result.metrics if "loss" in r] for result in (padded, packed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_packed_waste_counts_the_filler_of_each_micro_batch_s_rows():
    examples = ragged_examples(200, lengths=(6, 3, 2, 8))
    # one step of 4 examples, micro-batches of up to 2 x 8 tokens: [6 3 2] -> first fit [6 2] [3] (width 8),
    # spread evenly [6] [3 2] (width 6, filler 1 of 12); then [8] (no filler): 1 of 20 computed tokens
    assert [[len(x.input_ids) for x in row] for row in pack_rows(examples[:3], 8)] == [[6], [3, 2]]
    assert packed_waste(examples, micro_batch_size=2, row_tokens=8, step_examples=4) == pytest.approx(1 / 20)
    assert packed_waste(ragged_examples(200, lengths=(4, 4)), 1, 8, 2) == 0.0


def test_varlen_attention_gives_each_example_the_logits_it_has_alone():
    """qlora's varlen attention (one row, bounds from cu_seq_lens, no mask): on the CPU its reference, each
    example through sdpa alone; grouped-query heads (4 query, 2 key/value) included."""
    model = tiny_llama("sdpa")
    before = varlen.use_varlen(model)
    assert before == "sdpa" and model.config._attn_implementation == varlen.NAME
    examples = ragged_examples(200)
    batch = collate_packed(examples, row_tokens=32, varlen=True)  # varlen: one row whatever row_tokens says
    assert batch["input_ids"].shape == (1, 61) and batch["cu_seq_lens"].tolist() == [0, 5, 22, 31, 61]
    assert "attention_mask" not in batch and int(batch["real_token_count"]) == 61
    seen = []  # whether a packed forward is open while the decoder layers run
    hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(varlen._active))
    with torch.no_grad():  # the decoder's call carries cu_seq_lens_q: a packed forward, its mask function makes none
        logits = model(**model_inputs(batch)).logits[0]
    start = 0
    for x in examples:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([x.input_ids])).logits[0]  # no cu_seq_lens: sdpa's own path
        torch.testing.assert_close(logits[start:start + len(x.input_ids)], alone, atol=1e-5, rtol=1e-5)
        start += len(x.input_ids)
    hook.remove()
    assert seen == [1] + [0] * len(examples) and varlen._active == 0
    check_packed_attention(model, lambda group: collate_packed(group, varlen=True))
    # Without the bounds the same row would be one sequence: the check sees the difference it relies on.
    with torch.no_grad():
        crossed = model(input_ids=batch["input_ids"]).logits[0]
    assert (crossed[5:22] - logits[5:22]).abs().max() > 1e-3
    # A packed forward that fails leaves no packed forward open behind it (the next forward gets its mask).
    two_rows = {k: v.repeat(2, 1) if k in ("input_ids", "position_ids") else v for k, v in batch.items()}
    with torch.no_grad(), pytest.raises(ValueError, match="one packed row"):
        model(**model_inputs(two_rows))
    assert varlen._active == 0
    varlen.restore(model, before)
    assert model.config._attn_implementation == "sdpa"
    assert not varlen._hooked  # the decoder's hooks are gone with the attention


def test_qlora_run_with_varlen_packing_matches_the_padded_run(tiny_config, tmp_path):
    """train.packing_attention=varlen end to end: same per-step losses as the padded run, no filler reported,
    and the model's own attention back after training."""
    cfg = copy.deepcopy(tiny_config)
    rows = [{"text": f"### Human: List {i} items.### Assistant: " + ", ".join(f"item {j}" for j in range(1 + 3 * i))}
            for i in range(8)]
    cfg["data"]["path"] = str(write_jsonl(tmp_path / "ragged.jsonl", rows))
    cfg["train"].update(max_steps=2, per_device_train_batch_size=4)
    losses = {}
    for name, sets in (("padded", []), ("varlen", ["train.packing=true", "train.packing_attention=varlen"])):
        job = Job(cfg, overrides=sets, output_dir=tmp_path / name)
        result = job.run()
        losses[name] = [m["loss"] for m in result.metrics if "loss" in m]
        if name == "varlen":
            assert result.summary["padding_waste"]["packed_filler_waste"] == 0.0
            assert job.model.config._attn_implementation != "qlora_varlen"
    assert losses["varlen"] == pytest.approx(losses["padded"], rel=1e-4)


def test_varlen_packing_inside_a_ddp_or_fsdp_wrapper_keeps_the_bounds(lora_model):
    """Under DDP/FSDP the loss runs inside the wrapper's forward (install_loss_forward): it must pass
    cu_seq_lens on, or the examples would attend to each other; a packed forward without them is an error."""
    from qlora_plugins.fused_loss import install_loss_forward

    class Wrapper(torch.nn.Module):  # what DDP and FSDP look like to the trainer: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = lora_model
    model.eval()
    examples = ragged_examples(model.get_input_embeddings().weight.shape[0], lengths=(7, 25, 12, 40))
    with torch.no_grad():
        pad_loss, _ = token_loss(model, collate(examples, pad_token_id=0))
        assert install_loss_forward(model)
        batch = collate_packed(examples, varlen=True)
        before = varlen.use_varlen(model)
        try:
            wrapped, _ = token_loss(Wrapper(model), batch)
            assert float(wrapped) == pytest.approx(float(pad_loss), rel=1e-5)
            dropped = {k: v for k, v in batch.items() if k != "cu_seq_lens"}
            with varlen.packed_forward(), pytest.raises(RuntimeError, match="without cu_seq_lens_q"):
                model(**model_inputs(dropped))
        finally:
            varlen.restore(model, before)


def test_varlen_is_refused_for_attention_it_does_not_implement(tiny_config, tmp_path):
    """Sliding windows and soft-capping are not in the varlen attention: such a model is named unsupported, and
    an explicit train.packing_attention=varlen is a usage error before any output folder exists."""
    model = tiny_llama("sdpa")
    assert varlen.unsupported(model, 2048) is None
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 512
    assert "sliding-window" in varlen.unsupported(model, 2048)
    assert varlen.unsupported(model, 512) is None  # no example outgrows the window: it changes nothing
    model.config.layer_types, model.config.sliding_window = None, None
    model.config.attn_logit_softcapping = 50.0
    assert "soft-capping" in varlen.unsupported(model)

    folder = tmp_path / "softcapped"  # the tiny model, its config saying its attention logits are soft-capped
    shutil.copytree(tiny_config["model"]["name_or_path"], folder)
    model_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(model_config, attn_logit_softcapping=30.0)))
    cfg = copy.deepcopy(tiny_config)
    cfg["model"]["name_or_path"] = str(folder)
    job = Job(cfg, overrides=["train.packing=true", "train.packing_attention=varlen"], output_dir=tmp_path / "run")
    with pytest.raises(UsageError, match="train.packing_attention: varlen attention cannot stand in .* soft-capping"):
        job.run()
    assert not (tmp_path / "run").exists()


def test_varlen_attention_refuses_arguments_it_would_ignore():
    q = torch.randn(1, 4, 6, 8)
    k = v = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = varlen.varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, sliding_window=None)
    assert out.shape == (1, 6, 4, 8)
    with pytest.raises(ValueError, match="softcap"):
        varlen.varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, softcap=30.0)
    saved = varlen._longest
    try:
        varlen._longest = 2048
        with pytest.raises(ValueError, match="sliding window"):
            varlen.varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, sliding_window=512)
        varlen._longest = 512  # examples of at most the window: the window changes nothing
        out2, _ = varlen.varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, sliding_window=512)
        torch.testing.assert_close(out2, out)
    finally:
        varlen._longest = saved
