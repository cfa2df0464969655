"""Check every fused or restructured piece of qlora's fast path against its plain reference on a CUDA GPU:
forward values and gradients, printed as one JSON object (max abs / relative differences and pass/fail).

* the output head + cross-entropy: liger-kernel's fused kernel and qlora's chunked PyTorch function vs
  ``F.cross_entropy(hidden @ W.T)`` (bf16 inputs, Llama-3 vocabulary);
* liger-kernel's RMSNorm, RoPE and SwiGLU (the ``liger-kernels`` plugin) vs transformers' own Llama layer;
* qlora's checkpointing with CPU offload and lean recomputation (``qlora_plugins.layers``), torch.compile of the
  layers and the fused 4-bit + LoRA op (``qlora_plugins.fused_lora``) vs plain layers and PEFT's LoRA forward:
  loss and every LoRA gradient of a 4-bit model. A variant that fails is reported beside the others;
* qlora's single-kernel NF4 dequantization vs bitsandbytes' (bit for bit, and the time of each), and the fused op
  with the adapters' kept bf16 copies vs casting them;
* qlora's varlen attention for packed examples (torch's flash kernel) vs each example through sdpa alone, eager
  and compiled.

    python benchmarks/fused_check.py [--out FILE] [--check NAME ...]

Needs CUDA; without it, one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path


def _diff(a, b) -> dict[str, float]:
    a, b = a.float(), b.float()
    d = (a - b).abs().max().item()
    return {"max_abs": d, "rel": d / max(b.abs().max().item(), 1e-12)}


def check_loss(results: dict) -> None:
    import torch
    import torch.nn.functional as F

    from qlora_plugins.fused_loss import linear_cross_entropy_sum

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 4096, 4096, 128256
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    (ref_g,) = torch.autograd.grad(ref, hidden)
    for name, use_liger in (("liger_fused_linear_cross_entropy", True), ("chunked_linear_cross_entropy", False)):
        x = hidden.detach().clone().requires_grad_(True)
        loss = linear_cross_entropy_sum(x, weight, targets, use_liger=use_liger)
        loss.backward()
        r = {"loss": _diff(loss, ref), "grad_hidden": _diff(x.grad, ref_g)}
        r["ok"] = r["loss"]["rel"] < 1e-3 and r["grad_hidden"]["rel"] < 2e-2
        results[name] = r


def _tiny_llama(device: str, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, vocab_size=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)


def check_liger_layers(results: dict) -> None:
    import torch
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    ref = _tiny_llama("cuda")
    fused = copy.deepcopy(ref)
    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    out_ref = ref(input_ids=ids).logits.float()
    out_ref.square().mean().backward()
    from transformers.models.llama import modeling_llama

    saved = (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP)
    try:
        _apply_liger_kernel_to_instance(model=fused, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        out = fused(input_ids=ids).logits.float()
        out.square().mean().backward()
    finally:  # the rest of this script compares against transformers' own layers
        modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP = saved
    worst = max((_diff(p.grad, q.grad)["rel"], n) for (n, p), q in zip(fused.named_parameters(), ref.parameters()))
    r = {"logits": _diff(out, out_ref), "worst_grad_rel": worst[0], "worst_grad_param": worst[1]}
    r["ok"] = r["logits"]["rel"] < 2e-2 and r["worst_grad_rel"] < 5e-2
    results["liger_rmsnorm_rope_swiglu"] = r


def check_layers(results: dict) -> None:
    """qlora's checkpointing (+offload) and compile vs plain layers on a 4-bit model with LoRA."""
    import tempfile

    import torch

    from qlora_core import Job
    from qlora_core.tools.shapes import SHAPES, write_config_folder
    from qlora_plugins.fused_loss import token_loss_sum
    from qlora_plugins.layers import checkpoint_layers, compile_layers, layer_policy, set_checkpointed_layers
    from qlora_plugins.random_weights import build_direct

    shape = dict(SHAPES["llama3-1b"], num_hidden_layers=4)
    folder = write_config_folder(shape, Path(tempfile.mkdtemp()) / "m")
    variants, lean_status = {}, {}
    for name, ckpt, offload, comp, fused in (("plain", False, False, False, False),
                                             ("plain_again", False, False, False, False),
                                             ("checkpointed", True, False, False, False),
                                             ("checkpointed_offloaded", True, True, False, False),
                                             ("checkpointed_offloaded_compiled", True, True, True, False),
                                             ("checkpointed_lean", True, False, False, False),
                                             ("checkpointed_offloaded_compiled_lean", True, True, True, False),
                                             ("fused_lora", False, False, False, True),
                                             ("fused_lora_checkpointed_offloaded_compiled", True, True, True, True)):
        # One variant's failure is reported beside the others' figures (GPU time is scarce), and each variant
        # compiles afresh.
        torch._dynamo.reset()
        try:
            # No dropout: compiled code draws its dropout masks differently from eager code, so with dropout the
            # compiled variants could not be compared with the plain one.
            job = Job(None, plugins=["no:gradient-checkpointing"],
                      overrides=[("model.name_or_path", str(folder)), ("train.compile", False),
                                 ("lora.lora_dropout", 0.0), ("train.fused_lora", fused)])
            job.tokenizer = type("T", (), {"pad_token_id": 0})()
            model = job.load_model(base=build_direct(folder, "cuda", torch.bfloat16, seed=0))
            if ckpt:
                checkpoint_layers(model, offload=offload, lean="lean" in name)
            else:
                set_checkpointed_layers(model, 0)
            if comp:
                compile_layers(model)
            model.train()
            for pname, p in model.named_parameters():  # adapters away from zero, so every gradient is tested
                if "lora_B" in pname:
                    gen = torch.Generator().manual_seed(hash(pname) % 2**31)
                    with torch.no_grad():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, 1000, (2, 1024), generator=g).cuda()
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = token_loss_sum(model, batch)
            loss.backward()
            torch.cuda.synchronize()
            if "lean" in name:  # the first backward checked the lean recomputation; a second one uses it
                lean_ok = layer_policy(model).lean
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = token_loss_sum(model, batch)
                loss.backward()
                torch.cuda.synchronize()
                lean_status[name] = lean_ok
            variants[name] = (loss.detach().float(),
                              {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad})
            del model, job
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "ok": False}
        torch.cuda.empty_cache()
    if "plain" not in variants:
        return
    ref_loss, ref_grads = variants.pop("plain")
    for name, (loss, grads) in variants.items():
        worst = max((_diff(grads[k], ref_grads[k])["rel"], k) for k in ref_grads)
        r = {"loss": _diff(loss, ref_loss), "worst_grad_rel": worst[0], "worst_grad_param": worst[1],
             "all_grads_nonzero": all(bool(grads[k].abs().sum() > 0) for k in grads if "lora_B" in k)}
        # checkpointing replays the same bf16 maths: exact up to the run-to-run noise of the GPU kernels
        # ("plain_again" measures it); compiled kernels and the fused LoRA function round differently (bf16 noise)
        tol = 5e-2 if ("compiled" in name or "fused" in name or "offloaded" in name or "lean" in name) else 1e-6
        r["ok"] = r["loss"]["rel"] < max(tol, 1e-6) and r["worst_grad_rel"] <= tol and r["all_grads_nonzero"]
        if name in lean_status:  # the lean recomputation must have passed its own check, and been used
            r["lean_check_passed"] = lean_status[name]
            r["ok"] = r["ok"] and lean_status[name] is True
        results[name] = r


def check_varlen(results: dict) -> None:
    """qlora's varlen attention (torch's flash kernel for packed examples) against each example through sdpa
    alone: output and the gradients of q, k and v, grouped-query heads, eager and inside torch.compile (two
    different packings, the second one recompiled with a dynamic length)."""
    import torch

    from qlora_plugins import varlen_packing as varlen

    def attention(q, k, v, cu):
        with varlen.packed_forward():
            return varlen.varlen_attention(None, q, k, v, None, scaling=q.shape[-1] ** -0.5, cu_seq_lens_q=cu)[0]

    def reference(q, k, v, cu):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        qs, ks, vs = (t[0].transpose(0, 1).float() for t in (q, k, v))
        return varlen._reference(qs, ks, vs, cu.cpu(), q.shape[-1] ** -0.5).unsqueeze(0)

    compiled = torch.compile(attention)
    g = torch.Generator(device="cuda").manual_seed(0)
    varlen._longest = 2048
    out: dict = {}
    for name, lengths, fn in (("eager", [700, 64, 1500, 33, 1800], attention),
                              ("compiled", [700, 64, 1500, 33, 1800], compiled),
                              ("compiled_other_lengths", [2048, 5, 999, 1200], compiled)):
        t = sum(lengths)
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(1, 32, t, 128, device="cuda", generator=g).bfloat16().requires_grad_(True)
        k = torch.randn(1, 8, t, 128, device="cuda", generator=g).bfloat16().requires_grad_(True)
        v = torch.randn(1, 8, t, 128, device="cuda", generator=g).bfloat16().requires_grad_(True)
        up = torch.randn(1, t, 32, 128, device="cuda", generator=g).bfloat16()
        got = fn(q, k, v, cu)
        grads = torch.autograd.grad(got, (q, k, v), up)
        q2, k2, v2 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
        ref = reference(q2, k2, v2, cu)
        ref_grads = torch.autograd.grad(ref, (q2, k2, v2), up.float())
        r = {"out": _diff(got, ref)}
        r.update({f"grad_{n}": _diff(a, b) for n, a, b in zip("qkv", grads, ref_grads)})
        r["ok"] = all(x["rel"] < 2e-2 for x in r.values())
        out[name] = r
    varlen._longest = None
    out["ok"] = all(r["ok"] for r in out.values())
    results["varlen_attention"] = out


def check_nf4(results: dict) -> None:
    """qlora's single-kernel NF4 dequantization against bitsandbytes' ``dequantize_4bit``: the same bits for
    the Llama-3-8B layer shapes, with and without double quantization, uint8 and bf16 storage; and the time
    each takes (the GPU's, and the CPU's to launch one, which is what the training step waits on)."""
    import time

    import bitsandbytes.functional as bnbf
    import torch

    from qlora_plugins.nf4_kernel import dequantize_nf4

    out: dict = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [((4096, 4096), True, torch.uint8, torch.bfloat16), ((1024, 4096), True, torch.uint8, torch.bfloat16),
             ((14336, 4096), True, torch.uint8, torch.bfloat16), ((4096, 14336), True, torch.uint8, torch.bfloat16),
             ((4096, 14336), False, torch.uint8, torch.bfloat16), ((4096, 14336), True, torch.bfloat16,
                                                                    torch.bfloat16),
             ((96, 832), True, torch.uint8, torch.bfloat16), ((96, 832), True, torch.uint8, torch.float16),
             ((1024, 4096), True, torch.uint8, torch.float32), ((1024, 4096), False, torch.bfloat16, torch.float32)]
    for shape, nested, storage, dtype in cases:
        w = (torch.randn(shape, device="cuda", generator=g) * 0.02).to(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4",
                                           quant_storage=storage)
        got, expected = dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state)
        name = f"{shape[0]}x{shape[1]}_{'nested' if nested else 'plain'}_{str(storage)[6:]}_{str(dtype)[6:]}"
        out[name] = {"ok": got is not None and got.dtype == expected.dtype and bool(torch.equal(got, expected))}

    def timing(fn, packed, state, calls):
        fn(packed, state)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn(packed, state)
        cpu = (time.perf_counter() - t0) / calls
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls * 1e3, cpu * 1e6

    big = bnbf.quantize_4bit(torch.randn(4096, 14336, device="cuda", generator=g).bfloat16() * 0.02,
                             compress_statistics=True, quant_type="nf4")
    small = bnbf.quantize_4bit(torch.randn(256, 256, device="cuda", generator=g).bfloat16() * 0.02,
                               compress_statistics=True, quant_type="nf4")
    for label, fn in (("qlora_nf4", dequantize_nf4), ("bitsandbytes", bnbf.dequantize_4bit)):
        gpu_us, _ = timing(fn, *big, 50)
        _, cpu_us = timing(fn, *small, 500)  # tiny: the GPU keeps up, the loop runs at the CPU's pace
        out[f"time_{label}"] = {"gpu_us_4096x14336": round(gpu_us, 1), "cpu_us_per_call": round(cpu_us, 1)}
    # The sweep behind qlora_plugins.nf4_kernel's BLOCK and WARPS: each setting exact, and its GPU time.
    square = bnbf.quantize_4bit(torch.randn(4096, 4096, device="cuda", generator=g).bfloat16() * 0.02,
                                compress_statistics=True, quant_type="nf4")
    sweep = {}
    for block in (512, 1024, 2048, 4096):
        for warps in (4, 8):
            def fn(p, s, block=block, warps=warps):
                return dequantize_nf4(p, s, block=block, warps=warps)
            exact = all(bool(torch.equal(fn(*w), bnbf.dequantize_4bit(*w))) for w in (big, square, small))
            sweep[f"elements_{block}_{warps}"] = {"exact": exact, "us_4096x14336": round(timing(fn, *big, 50)[0], 1),
                                                  "us_4096x4096": round(timing(fn, *square, 50)[0], 1)}
    out["sweep"] = sweep
    out["sweep_all_exact"] = {"ok": all(v["exact"] for v in sweep.values())}
    out["ok"] = all(v.get("ok", True) for v in out.values())
    results["nf4_dequantize"] = out


def check_compute_copies(results: dict) -> None:
    """The fused LoRA op given the adapters' kept bf16 copies against the op casting them itself, on a real
    4-bit weight: the output and every gradient identical."""
    import bitsandbytes as bnb
    import torch

    from qlora_plugins import nf4_kernel
    from qlora_plugins.fused_lora import _ops
    from qlora_plugins.quant_weights import register_quant_weight

    nf4_kernel.set_enabled(True)  # as under the fused-lora plugin's default train.fast_dequant
    op = _ops()
    layer = bnb.nn.Linear4bit(4096, 1024, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(1024, 4096) * 0.02, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.cuda()
    register_quant_weight(layer)
    g = torch.Generator(device="cuda").manual_seed(2)
    x0 = torch.randn(2, 512, 4096, device="cuda", generator=g).bfloat16()
    a0 = torch.randn(16, 4096, device="cuda", generator=g) * 0.01
    b0 = torch.randn(1024, 16, device="cuda", generator=g) * 0.01

    def run(copies: bool):
        x = x0.clone().requires_grad_(True)
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        ac, bc = (a.detach().bfloat16(), b.detach().bfloat16()) if copies else (None, None)
        y = op(x, x, layer.weight, None, a, b, ac, bc, 2.0, True)
        y.float().square().mean().backward()
        return y, x.grad, a.grad, b.grad

    same = [bool(torch.equal(p, q)) for p, q in zip(run(True), run(False))]
    results["fused_lora_compute_copies"] = {"output_x_grad_a_grad_b_grad_identical": same, "ok": all(same)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    checks = (check_nf4, check_compute_copies, check_loss, check_liger_layers, check_layers, check_varlen)
    names = [c.__name__.removeprefix("check_") for c in checks]
    parser.add_argument("--check", action="append", choices=names, help="run only these checks (repeatable)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: fused_check needs a CUDA GPU; run it on the GPU machine", file=sys.stderr)
        return 2
    results: dict = {"gpu": torch.cuda.get_device_name(0)}
    for check in checks:
        if args.check and check.__name__.removeprefix("check_") not in args.check:
            continue
        try:
            check(results)
        except Exception as e:  # noqa: BLE001 - report and go on with the other checks
            results[check.__name__] = {"error": f"{type(e).__name__}: {e}", "ok": False}
    results["all_ok"] = all(v.get("ok", True) for v in results.values() if isinstance(v, dict))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
