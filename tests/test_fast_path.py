"""The fused and restructured pieces of the training step against their plain references, on the CPU:
the chunked output head + cross-entropy, qlora's own layer checkpointing (with the offload path's bookkeeping),
the memory-budget arithmetic, and the lean k-bit preparation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_core import Job


def test_chunked_linear_cross_entropy_matches_the_reference_in_value_and_gradients():
    from qlora_plugins.fused_loss import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=g)
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk=8)  # 5 chunks, the last one partial
    (loss * 0.5).backward()  # a scaled upstream gradient must scale both gradients
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)


def test_chunked_linear_cross_entropy_without_gradients_and_for_a_frozen_head():
    from qlora_plugins.fused_loss import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g)  # frozen, like a QLoRA head
    targets = torch.randint(0, 50, (10,), generator=g)
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, chunk=3), ref)
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk=3)
    loss.backward()
    expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected)
    assert weight.grad is None


def _loss_and_grads(job, model, batch, fused=True):
    from qlora_plugins.fused_loss import token_loss_sum

    model.zero_grad(set_to_none=True)
    loss, _ = token_loss_sum(model, batch, fused)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_checkpointing_gives_the_gradients_of_no_checkpointing(tiny_config, tmp_path, dropout):
    """Same loss and LoRA gradients with every layer recomputed (qlora's own checkpointing, dropout replayed
    from the saved RNG state), with none recomputed, and with a budget's mix; the fused head+loss too."""
    from qlora_core.loop.data import collate
    from qlora_plugins.layers import layer_policy, set_checkpointed_layers

    cfg = dict(tiny_config, lora=dict(tiny_config.get("lora", {}), lora_dropout=dropout))
    job = Job(cfg, output_dir=tmp_path / "run")
    job.load_data()
    model = job.load_model()
    policy = layer_policy(model)
    assert policy is not None and policy.checkpointed == policy.layers >= 2  # the plugin's default
    # With a KV cache on, the recomputation must not attend to the keys its first pass left in the cache.
    model.get_base_model().config.use_cache = True
    model.train()
    batch = collate(job.train_examples[:4], job.tokenizer.pad_token_id)

    def run(fused=True):
        torch.manual_seed(123)  # the same dropout masks in every variant
        return _loss_and_grads(job, model, batch, fused)

    loss_ckpt, grads_ckpt = run()
    set_checkpointed_layers(model, 0)
    loss_plain, grads_plain = run()
    loss_unfused, grads_unfused = run(fused=False)
    set_checkpointed_layers(model, 1)
    assert layer_policy(model).checkpointed == 1
    loss_mixed, grads_mixed = run()
    for loss, grads in ((loss_ckpt, grads_ckpt), (loss_unfused, grads_unfused), (loss_mixed, grads_mixed)):
        torch.testing.assert_close(loss, loss_plain)
        assert grads.keys() == grads_plain.keys() and grads
        for k in grads:
            torch.testing.assert_close(grads[k], grads_plain[k], msg=k)
    # Every adapted layer got a gradient, the first decoder layer's too (its input needs no gradient).
    assert all(g.abs().sum() > 0 for k, g in grads_ckpt.items() if "lora_B" in k)


def test_checkpointed_layers_keep_nothing_but_their_input(tiny_config, tmp_path):
    """Recomputed layers hold no activations between forward and backward: fewer saved tensors."""
    from qlora_core.loop.data import collate
    from qlora_plugins.fused_loss import token_loss_sum
    from qlora_plugins.layers import set_checkpointed_layers

    job = Job(tiny_config, output_dir=tmp_path / "run")
    job.load_data()
    model = job.load_model()
    model.train()
    batch = collate(job.train_examples[:4], job.tokenizer.pad_token_id)

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = token_loss_sum(model, batch)
        loss.backward()
        return total

    checkpointed = saved_bytes()
    set_checkpointed_layers(model, 0)
    plain = saved_bytes()
    assert checkpointed < plain / 2


def test_budget_arithmetic():
    from qlora_plugins.layers import layers_within_budget

    gib = 2**30
    # 32 layers, 8 GiB peak with all recomputed, 1 GiB per kept layer
    assert layers_within_budget(32, 8 * gib, gib, 0.0) == 32
    assert layers_within_budget(32, 8 * gib, gib, 8 * gib) == 32  # no room above the lean peak
    assert layers_within_budget(32, 8 * gib, gib, 20 * gib) == 32 - 10  # 20 x 0.9 - 8 = 10 layers kept
    assert layers_within_budget(32, 8 * gib, gib, 200 * gib) == 0
    assert layers_within_budget(32, 8 * gib, 0, 200 * gib) == 32


def test_lean_kbit_preparation_keeps_dtypes_and_the_upcast_stays_selectable(tiny_config, tmp_path):
    bf16 = ["quant.bnb_4bit_compute_dtype=bfloat16"]
    lean = Job(tiny_config, overrides=bf16, output_dir=tmp_path / "a").load_base_model()
    assert not any(p.requires_grad for p in lean.parameters())
    upcast = Job(tiny_config, overrides=bf16 + ["quant.fp32_upcast=true"], output_dir=tmp_path / "b").load_base_model()
    assert not any(p.requires_grad for p in upcast.parameters())

    def norm_dtype(model):
        return next(p for n, p in model.named_parameters() if "norm" in n).dtype

    assert norm_dtype(lean) == torch.bfloat16  # kept in the compute dtype
    assert norm_dtype(upcast) == torch.float32  # PEFT's prepare_model_for_kbit_training


def _model_with_live_adapters(job):
    """``job``'s data loaded and its model in training mode, the LoRA B matrices drawn away from their zero
    init (from a seed per name: two jobs get the same) so that every adapter weight gets a gradient; with the
    first four training examples as a batch."""
    import zlib

    from qlora_core.loop.data import collate

    job.load_data()
    model = job.load_model()
    model.train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, collate(job.train_examples[:4], job.tokenizer.pad_token_id)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_layers_match_peft_in_output_and_gradients(tiny_config, tmp_path, dropout):
    """The fused 4-bit base + LoRA function against PEFT's own forward: same logits-side loss, same gradients
    of every adapter weight and of the layer inputs (dropout masks replayed from the same seed)."""
    from qlora_plugins.fused_lora import fuse_lora_layers

    cfg = dict(tiny_config, lora=dict(tiny_config.get("lora", {}), lora_dropout=dropout))
    job = Job(cfg, overrides=["train.compile=false"], output_dir=tmp_path / "run")
    model, batch = _model_with_live_adapters(job)

    def run():
        torch.manual_seed(7)
        return _loss_and_grads(job, model, batch)

    loss_peft, grads_peft = run()
    model.eval()
    with torch.no_grad():
        eval_peft = model(input_ids=batch["input_ids"][:1]).logits
    model.train()
    n = fuse_lora_layers(model)
    assert n == 7 * len(model.get_base_model().model.layers)  # q k v o gate up down in every layer
    assert fuse_lora_layers(model) == 0  # idempotent
    loss_fused, grads_fused = run()
    torch.testing.assert_close(loss_fused, loss_peft)
    for k in grads_peft:
        torch.testing.assert_close(grads_fused[k], grads_peft[k], msg=k)
    assert all(g.abs().sum() > 0 for g in grads_fused.values())
    # Evaluation and generation keep PEFT's forward (bitsandbytes' inference kernels): bit for bit the same.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"][:1]).logits, eval_peft)


def test_fused_lora_under_torch_compile_gives_peft_s_gradients(tiny_config, tmp_path):
    """Compiled decoder layers (inductor on the CPU) with the fused LoRA op: no graph break, and the same loss
    and adapter gradients as PEFT's uncompiled forward. On the H200 the earlier forms failed inside compiled
    layers (wrong gradients when traced, a flattened input at a graph break; the CPU showed neither), so the
    fused LoRA is now a custom op; benchmarks/fused_check.py checks the GPU."""
    def grads(overrides):
        job = Job(tiny_config, overrides=overrides, output_dir=tmp_path / str(len(overrides)))
        model, batch = _model_with_live_adapters(job)
        return _loss_and_grads(job, model, batch)

    from torch._dynamo.utils import counters

    loss_ref, grads_ref = grads(["train.compile=false", "train.fused_lora=false"])
    torch._dynamo.reset()
    counters.clear()
    loss, got = grads(["train.compile=true", "train.fused_lora=true"])
    assert not counters["graph_break"], dict(counters["graph_break"])  # the fused op is traced around
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for k in grads_ref:
        torch.testing.assert_close(got[k], grads_ref[k], rtol=1e-3, atol=1e-5, msg=k)


def test_the_memory_budget_keeps_the_activations_of_the_layers_that_fit(tiny_config, tmp_path, monkeypatch):
    """train.gpu_memory_budget after the first step: from the measured peak (every layer recomputed) and one
    layer's activations, the layers that fit stop being recomputed, and the run is told so; later steps change
    nothing. The CUDA memory figures are stood in for on the CPU; the arithmetic and the switch are the
    gradient-checkpointing plugin's own, driven through its hooks as the loop calls them."""
    from types import SimpleNamespace

    from qlora_plugins.gradient_checkpointing import layer_policy
    from qlora_plugins.layers import layer_state

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 8 * gib)

    def on_cuda(job, model):
        notices = []
        run = SimpleNamespace(config=job.config, model=model, device="cuda", max_micro_batch_tokens=64,
                              accelerator=SimpleNamespace(device=SimpleNamespace(type="cuda")),
                              notice=notices.append)
        plugin = job.plugins.pm.get_plugin("gradient-checkpointing")
        plugin.qlora_on_train_start(run=run)
        return run, plugin, notices

    job = Job(tiny_config, overrides=["train.gpu_memory_budget=10"], output_dir=tmp_path / "run")
    job.load_data()
    model = job.load_model()
    layers = layer_policy(model).layers
    run, plugin, notices = on_cuda(job, model)
    assert notices == [f"decoder layers: {layer_policy(model).describe()}"]
    plugin.qlora_on_step_begin(run=run, step=1)
    assert layer_state(model).measure_next
    layer_state(model).layer_activation_bytes = gib // 2  # what the first recomputation measured
    layer_state(model).measure_next = False
    plugin.qlora_on_after_backward(run=run, model=model, optimizer=None)
    # 10 GiB x 0.9 - 8 GiB = 1 GiB of room: two layers of 0.5 GiB keep their activations
    assert layer_policy(model).checkpointed == layers - 2
    assert "2 of" in notices[1] and "keep their activations" in notices[1]
    # the next step measures and changes nothing
    plugin.qlora_on_step_begin(run=run, step=2)
    assert not layer_state(model).measure_next
    plugin.qlora_on_after_backward(run=run, model=model, optimizer=None)
    assert layer_policy(model).checkpointed == layers - 2 and len(notices) == 2
    # no budget: nothing measured, nothing changed
    plain = Job(tiny_config, output_dir=tmp_path / "plain")
    plain.load_data()
    plain_model = plain.load_model()
    run, plugin, notices = on_cuda(plain, plain_model)
    plugin.qlora_on_step_begin(run=run, step=1)
    assert not layer_state(plain_model).measure_next
    plugin.qlora_on_after_backward(run=run, model=plain_model, optimizer=None)
    assert layer_policy(plain_model).checkpointed == layers and len(notices) == 1


def _count_grad_only(monkeypatch) -> list:
    from qlora_plugins import layers

    calls = []
    original = layers._grad_only

    def counting(module, x, fill_nan):
        calls.append(fill_nan)
        return original(module, x, fill_nan)

    monkeypatch.setattr(layers, "_grad_only", counting)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_recompute_skips_the_output_projections_with_the_same_gradients(tiny_config, tmp_path, monkeypatch,
                                                                            dropout):
    """train.lean_recompute (the default): the first backward checks the lean recomputation against the full one
    (NaN in the skipped outputs), then every later recomputation skips the down projections' forward matmul;
    losses and adapter gradients stay those of no checkpointing at all."""
    from qlora_plugins.layers import layer_policy, layer_state, set_checkpointed_layers

    calls = _count_grad_only(monkeypatch)
    cfg = dict(tiny_config, lora=dict(tiny_config.get("lora", {}), lora_dropout=dropout))
    job = Job(cfg, output_dir=tmp_path / "run")
    model, batch = _model_with_live_adapters(job)
    n_layers = layer_policy(model).layers
    assert layer_policy(model).lean is None and layer_state(model).output_projections == n_layers
    assert "checked on the first backward" in layer_policy(model).describe()

    def run():
        torch.manual_seed(5)
        return _loss_and_grads(job, model, batch)

    loss_checked, grads_checked = run()
    assert layer_policy(model).lean is True
    # The check on the first layer to run backward (the last one): a NaN-filled lean recomputation, then its
    # backward leanly; then the other layers leanly.
    assert calls == [True, False] + [False] * (n_layers - 1)
    calls.clear()
    loss_lean, grads_lean = run()
    assert calls == [False] * n_layers  # every layer's down projection skipped, once
    calls.clear()
    set_checkpointed_layers(model, 0)
    loss_plain, grads_plain = run()
    assert not calls
    for loss, grads in ((loss_checked, grads_checked), (loss_lean, grads_lean)):
        torch.testing.assert_close(loss, loss_plain)
        for k in grads_plain:
            torch.testing.assert_close(grads[k], grads_plain[k], msg=k)
    assert all(g.abs().sum() > 0 for k, g in grads_lean.items() if "down_proj" in k)

    off = Job(tiny_config, overrides=["train.lean_recompute=false"], output_dir=tmp_path / "off")
    off.load_data()
    off_model = off.load_model()
    off_model.train()
    _loss_and_grads(off, off_model, batch)
    assert layer_policy(off_model).lean is False and not calls


def test_lean_recompute_is_refused_where_backward_reads_the_skipped_output(tiny_config, tmp_path, monkeypatch):
    """A projection whose output backward does read (here o_proj: the attention output feeds the next norm)
    fails the first backward's check: the model keeps the full recomputation and the right gradients."""
    from qlora_core.loop.data import collate
    from qlora_plugins import layers
    from qlora_plugins.layers import layer_policy, set_checkpointed_layers

    monkeypatch.setattr(layers, "OUTPUT_PROJECTIONS", ("o_proj",))
    calls = _count_grad_only(monkeypatch)
    job = Job(tiny_config, output_dir=tmp_path / "run")
    job.load_data()
    model = job.load_model()
    model.train()
    batch = collate(job.train_examples[:4], job.tokenizer.pad_token_id)
    loss_checked, grads_checked = _loss_and_grads(job, model, batch)
    assert layer_policy(model).lean is False and calls  # checked, and refused
    calls.clear()
    loss_again, grads_again = _loss_and_grads(job, model, batch)
    assert not calls
    set_checkpointed_layers(model, 0)
    loss_plain, grads_plain = _loss_and_grads(job, model, batch)
    for loss, grads in ((loss_checked, grads_checked), (loss_again, grads_again)):
        torch.testing.assert_close(loss, loss_plain)
        for k in grads_plain:
            torch.testing.assert_close(grads[k], grads_plain[k], msg=k)


def test_lean_recompute_under_torch_compile_traces_without_graph_breaks(tiny_config, tmp_path):
    """The skipped projection is a custom op torch.compile traces through (a graph break there once made the GPU
    hand the eager code a flattened view); gradients stay those of the uncompiled full recomputation."""
    from torch._dynamo.utils import counters

    from qlora_plugins.layers import layer_policy

    def grads(overrides):
        job = Job(tiny_config, overrides=overrides, output_dir=tmp_path / str(len(overrides)))
        model, batch = _model_with_live_adapters(job)
        _loss_and_grads(job, model, batch)  # the first backward checks the lean recomputation
        return _loss_and_grads(job, model, batch), layer_policy(model).lean

    (loss_ref, grads_ref), _ = grads(["train.compile=false", "train.lean_recompute=false"])
    torch._dynamo.reset()
    counters.clear()
    (loss, got), lean = grads(["train.compile=true", "train.lean_recompute=true"])
    assert lean is True
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for k in grads_ref:
        torch.testing.assert_close(got[k], grads_ref[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_nf4_single_kernel_formula_is_bitsandbytes_bit_for_bit(nested, storage):
    """qlora_plugins.nf4_kernel's arithmetic (here in PyTorch; benchmarks/fused_check.py compares the Triton kernel
    on the GPU): the same bits as bitsandbytes' dequantize_4bit, with and without double quantization, packed in
    uint8 or in FSDP's bf16 storage. Off CUDA the kernel declines and bitsandbytes does the work."""
    import bitsandbytes.functional as bnbf

    from qlora_plugins.nf4_kernel import dequantize_nf4, dequantize_nf4_reference
    from qlora_plugins.quant_weights import dense_weight

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(96, 64 * 13, generator=gen) * 0.02).to(dtype)  # 78 blocks: not a multiple of 256
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4",
                                           quant_storage=storage)
        expected = bnbf.dequantize_4bit(packed, state)
        got = dequantize_nf4_reference(packed, state)
        assert got.dtype == expected.dtype and got.shape == expected.shape == w.shape
        assert torch.equal(got, expected)
        assert (got.float() - w.float()).abs().max() < 0.2 * w.float().abs().max()  # it is the weight
        assert dequantize_nf4(packed, state) is None  # no CUDA here
        packed.quant_state = state
        assert torch.equal(dense_weight(packed, dtype), expected)  # the fallback


_INTERPRETED_NF4 = """
import json, sys
import torch
import bitsandbytes.functional as bnbf
from qlora_plugins import nf4_kernel as nf4

gen = torch.Generator().manual_seed(5)
results = []
# rows a whole number of blocks (bitsandbytes' CPU quantizer then lays blocks out flat, as its CUDA one does);
# the odd count is 1-D (bitsandbytes returns it as one row: the values are compared)
for shape, blocksize in (((96, 832), 64), ((24, 512), 128), ((40, 256), 256), ((2145,), 64)):
    for nested in (True, False):
        for storage in (torch.uint8, torch.bfloat16):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                if storage == torch.bfloat16 and shape == (2145,):
                    continue  # bf16 storage needs whole pairs of bytes
                w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
                packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                                   quant_type="nf4", quant_storage=storage)
                got = nf4._dequantize(packed, state, block=1024)
                expected = bnbf.dequantize_4bit(packed, state)
                diff = (got.float().reshape(-1) - expected.float().reshape(-1)).abs()
                step = (expected.float().abs().reshape(-1) * 2.0 ** -7).clamp_min(2.0 ** -133)  # one bf16 step
                results.append({"shape": list(shape), "blocksize": blocksize, "nested": nested,
                                "storage": str(storage), "dtype": str(dtype),
                                "equal": bool(torch.equal(got.reshape(-1), expected.reshape(-1))),
                                "within_one_bf16_step": bool((diff <= step).all()),
                                "shape_dtype": list(got.shape) == list(shape) and got.dtype == expected.dtype})
print(json.dumps(results))
"""


def test_the_nf4_kernel_itself_on_triton_s_cpu_interpreter(tmp_path):
    """The Triton kernel's own code (not the formula) on Triton's CPU interpreter, against bitsandbytes: bit for
    bit for float32 and float16 outputs, with and without double quantization, uint8 and bf16 storage,
    blocksizes 64 to 256, an odd number of values. For bf16 outputs the interpreter rounds by truncation (numpy
    has no bf16), so within one bf16 step; on the GPU benchmarks/fused_check.py finds those bit for bit too."""
    import json
    import os
    import subprocess
    import sys

    import triton  # noqa: F401 - a test dependency: the interpreter runs the kernel on the CPU

    done = subprocess.run([sys.executable, "-c", _INTERPRETED_NF4], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 4 * 2 * 2 * 3 - 2 * 3  # the odd count has no bf16 storage
    for r in results:
        assert r["shape_dtype"], r
        if r["dtype"] == "torch.bfloat16":
            assert r["within_one_bf16_step"], r
        else:
            assert r["equal"], r


def test_nf4_formula_handles_an_odd_number_of_values():
    """An odd count leaves the last packed byte half used: the formula takes only the values the shape has."""
    import bitsandbytes.functional as bnbf

    from qlora_plugins.nf4_kernel import dequantize_nf4_reference

    w = torch.randn(2145, generator=torch.Generator().manual_seed(4))
    for nested in (True, False):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        assert packed.numel() * 2 == 2146
        assert torch.equal(dequantize_nf4_reference(packed, state), bnbf.dequantize_4bit(packed, state))


def test_compute_copies_follow_the_parameters():
    """FlatParams' bf16 copies of float32 adapters: equal to a cast after creation and after each sync, stale
    in between (the trainer syncs after every optimizer step), gone after drop."""
    from qlora_plugins.flat_params import FlatParams

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((8, 16), (16, 8), (3,))]
    flat = FlatParams(params)
    assert flat.add_compute_copies(torch.bfloat16) == 3
    for p in params:
        assert p.qlora_compute_copy.dtype == torch.bfloat16 and p.qlora_compute_copy.shape == p.shape
        assert torch.equal(p.qlora_compute_copy, p.detach().to(torch.bfloat16))
    with torch.no_grad():
        flat.params[0].add_(1.0)  # what an optimizer step does to the buffer
    assert not torch.equal(params[1].qlora_compute_copy, params[1].detach().to(torch.bfloat16))
    flat.sync_compute_copies()
    for p in params:
        assert torch.equal(p.qlora_compute_copy, p.detach().to(torch.bfloat16))
    flat.drop_compute_copies()
    assert not any(hasattr(p, "qlora_compute_copy") for p in params)
    assert FlatParams([torch.nn.Parameter(torch.ones(4))]).add_compute_copies(torch.float32) == 0  # same dtype


def test_the_fused_op_computes_the_same_with_compute_copies():
    """The fused LoRA op given the adapters' bf16 copies: the output and every gradient identical to the op
    casting the float32 adapters itself (the gradients still reach the float32 parameters)."""
    from qlora_plugins.fused_lora import _ops

    op = _ops()
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 16, generator=gen).to(torch.bfloat16)
    x0 = torch.randn(2, 5, 16, generator=gen).to(torch.bfloat16)
    a0, b0 = torch.randn(4, 16, generator=gen), torch.randn(24, 4, generator=gen)

    def run(copies: bool):
        x = x0.clone().requires_grad_(True)
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        ac, bc = (a.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16)) if copies else (None, None)
        y = op(x, x, weight, None, a, b, ac, bc, 2.0, True)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return y, x.grad, a.grad, b.grad

    for got, expected in zip(run(True), run(False)):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)
    assert run(True)[2].dtype == torch.float32


def test_training_with_compute_copies_matches_casting_each_use(tiny_config, tmp_path, monkeypatch):
    """bf16 compute with the fused op and flat parameters: three steps with the kept bf16 copies give the
    losses of three steps casting the adapters at each use, so the copies follow every optimizer step."""
    from qlora_plugins.flat_params import FlatParams

    def losses(name, *extra):
        job = Job(tiny_config, overrides=["quant.bnb_4bit_compute_dtype=bfloat16", "train.fused_lora=true",
                                          "train.compile=false", "train.optim=adamw", *extra],
                  output_dir=tmp_path / name)
        result = job.run()
        return [m["loss"] for m in result.metrics if "loss" in m], job

    made = []
    original = FlatParams.add_compute_copies
    monkeypatch.setattr(FlatParams, "add_compute_copies",
                        lambda self, dtype: made.append(original(self, dtype)) or made[-1])
    with_copies, job = losses("copies")
    assert made and made[0] > 0  # the copies were used
    assert not any(hasattr(p, "qlora_compute_copy") for p in job.model.parameters())  # dropped after the run
    casting, _ = losses("casting", "train.adapter_compute_copy=false")
    assert len(made) == 1  # not made when switched off
    assert len(with_copies) == 3 and with_copies == casting


def test_a_kernel_that_fails_to_run_falls_back_to_bitsandbytes_with_a_warning(monkeypatch):
    """Triton unable to build the NF4 kernel (an old GPU, a broken install): one warning, None (the caller
    uses bitsandbytes), and no further attempt in this process."""
    import bitsandbytes.functional as bnbf

    from qlora_plugins import nf4_kernel as nf4

    launches = []

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                raise RuntimeError("no kernel image is available for execution on the device")
            return launch

    monkeypatch.setattr(nf4, "_KERNEL", Broken())
    monkeypatch.setattr(nf4, "_supported", lambda weight, state: True)  # as on a GPU
    packed, state = bnbf.quantize_4bit(torch.randn(64, 128), compress_statistics=True, quant_type="nf4")
    with pytest.warns(UserWarning, match="NF4 dequantization failed .*no kernel image"):
        assert nf4.dequantize_nf4(packed, state) is None
    assert nf4._KERNEL is False and len(launches) == 1
    assert nf4.dequantize_nf4(packed, state) is None and len(launches) == 1  # not tried again


@pytest.mark.parametrize("where", ["before the loop", "in the loop"])
def test_a_failed_run_leaves_no_compute_copies_behind(tiny_config, tmp_path, monkeypatch, where):
    """The adapters' bf16 copies are removed however the run ends, before its loop or in it: a copy left on a
    parameter would be read, stale, by the next run's fused op even with the copies switched off."""
    from qlora_core.loop.record import RunRecord
    from qlora_core.loop.trainer import Trainer

    seen = []

    def fail(self, *args, **kwargs):
        seen.extend(p for p in job.model.parameters() if hasattr(p, "qlora_compute_copy"))
        raise RuntimeError("the run failed")

    if where == "in the loop":  # its first step: the copies were made when training started
        monkeypatch.setattr(Trainer, "_forward_backward", fail)
    else:  # the run record is started after the optimizer and the flat buffer are made
        monkeypatch.setattr(RunRecord, "start", fail)
    job = Job(tiny_config, overrides=["quant.bnb_4bit_compute_dtype=bfloat16", "train.fused_lora=true",
                                      "train.compile=false", "train.optim=adamw"], output_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="the run failed"):
        job.run()
    assert bool(seen) == (where == "in the loop")  # the copies exist only while the loop runs
    assert not any(hasattr(p, "qlora_compute_copy") for p in job.model.parameters())
