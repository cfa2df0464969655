"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models")
for qlora's 4-bit base: ``--plugin loftq``.

QLoRA starts every adapter at zero (``B = 0``), so training begins from the quantized model ``Q(W)`` and has to
learn back what 4 bits lost before it learns the task. LoftQ starts each adapter at the best rank-``r``
approximation of the quantization error instead: with the residual ``W - Q(W)`` = ``U S Vh`` (its SVD),

    B = U[:, :r] sqrt(S[:r]) / sqrt(s),   A = sqrt(S[:r]) Vh[:r] / sqrt(s),   s = the adapter's scaling

so that the layer computes ``Q(W) + s B A``, the closest a rank-``r`` correction can bring it to ``W`` (Eckart-Young).
``W`` is read from the base model's safetensors (lazily, one layer at a time), ``Q(W)`` is what bitsandbytes
computes with (``bitsandbytes.functional.dequantize_4bit`` of the loaded 4-bit weight), and ``s`` is PEFT's
``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA): PEFT's own ``replace_lora_weights_loftq`` leaves
the scaling out, which over-corrects by ``s`` whenever ``lora_alpha != r``.

The base stays ``Q(W)``, bit for bit the weights every later load of the run quantizes again (evaluation, merging,
export, resume), so a trained adapter means the same thing everywhere. LoftQ's alternating variant (``T > 1``
steps that quantize ``W - B A`` instead of ``W``) would change the base itself, and every one of those reloads would
have to redo it exactly; for a base fixed at ``Q(W)`` the one-step initialisation here is already the optimum.

The figures of the run (each layer's quantization error before and after, relative to its weight) go to
``RUN_DIR/loftq.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from qlora_core import ConfigError, Option, hookimpl

PLUGIN = "loftq"
STATS_ATTR = "qlora_loftq_stats"  # set on the PEFT model, written into the run folder at the start of training


@hookimpl
def qlora_config_options():
    return [
        Option("loftq.weights", "str", None,
               "the base model's unquantized weights: a folder of safetensors (sharded or not) or one .safetensors "
               "file (null: the folder the base model was loaded from)", nullable=True),
    ]


@hookimpl
def qlora_configure(config, device):
    if not config["quant.load_in_4bit"]:
        raise ConfigError(["loftq: initialises the adapters against a 4-bit base, but quant.load_in_4bit is false "
                           "(drop --plugin loftq, or set quant.load_in_4bit=true)"])
    given = config["loftq.weights"]
    if given and not Path(given).expanduser().exists():
        raise ConfigError([_missing(given)])


def _missing(given: str) -> str:
    return (f"loftq.weights: {given!r} does not exist (a folder of safetensors or one .safetensors file of the "
            "unquantized base model)")


class SafetensorsWeights:
    """The tensors of a checkpoint (one ``.safetensors`` file, or a folder of them, sharded through
    ``model.safetensors.index.json`` or not), read lazily by name."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        if path.is_file():
            files = [path]
        else:
            index = path / "model.safetensors.index.json"
            if index.is_file():
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                files = [path / n for n in names]
            else:
                files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConfigError([f"loftq: {path} holds no .safetensors file; LoftQ needs the base model's "
                               "unquantized weights (set loftq.weights to their folder)"])
        self.path = path
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def get(self, key: str, prefix: str | None):
        """The tensor ``key``, also found under the model's base prefix (``model.``) added or removed, as
        checkpoints of the same architecture differ in it."""
        candidates = [key]
        if prefix:
            if key.startswith(prefix + "."):
                candidates.append(key[len(prefix) + 1:])
            else:
                candidates.append(f"{prefix}.{key}")
        for name in candidates:
            handle = self._where.get(name)
            if handle is not None:
                return handle.get_tensor(name)
        raise ConfigError([f"loftq: {self.path} has no tensor {key!r}: it is not this model's checkpoint "
                           "(set loftq.weights to the unquantized weights of model.name_or_path)"])


def weights_path(base_model: Any, config) -> Path:
    """Where the unquantized weights are: ``loftq.weights``, else the folder the base was loaded from (a local
    folder, or a hub model in the local cache)."""
    given = config["loftq.weights"]
    source = given or str(getattr(base_model, "name_or_path", "") or "")
    path = Path(source).expanduser()
    if path.exists():
        return path
    if given:
        raise ConfigError([_missing(given)])
    if source:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, revision=config["model.revision"], local_files_only=True,
                                          allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not a hub id, or not in the local cache
            pass
    raise ConfigError([f"loftq: the base model's unquantized weights are not on disk (model {source or '?'!r} "
                       "was not loaded from a folder); set loftq.weights to a folder of its safetensors"])


def lora_layers_on_4bit(model) -> list[tuple[str, Any, Any]]:
    """``(name, LoRA layer, bitsandbytes Linear4bit)`` for every adapted 4-bit linear layer of a PEFT model."""
    import bitsandbytes as bnb

    found = []
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "get_base_layer"):
            continue
        base = module.get_base_layer()
        if isinstance(base, bnb.nn.Linear4bit):
            found.append((name, module, base))
    return found


def loftq_factors(residual, r: int, scaling: float):
    """``(A, B, error_after)`` with ``scaling * B @ A`` the best rank-``r`` approximation of ``residual``
    (float32), and the Frobenius norm of what remains."""
    import torch

    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    r = min(r, S.numel())
    root = S[:r].sqrt() / math.sqrt(scaling)
    B = U[:, :r] * root
    A = root[:, None] * Vh[:r]
    return A, B, float(S[r:].square().sum().sqrt())


@hookimpl(tryfirst=True)
def qlora_adapter_model(model, config):
    """Set every adapter on a 4-bit layer to LoftQ's initialisation (first, before any plugin fuses or compiles
    the layers)."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    layers = lora_layers_on_4bit(model)
    if not layers:
        raise ConfigError(["loftq: no LoRA adapter sits on a bitsandbytes 4-bit layer, so there is nothing to "
                           "initialise (LoftQ works with the nf4 quant plugin and lora.target_modules covering "
                           "its linear layers)"])
    base_model = model.get_base_model()
    source = SafetensorsWeights(weights_path(base_model, config))
    prefix = getattr(base_model, "base_model_prefix", None)
    stats: dict[str, Any] = {"weights": str(source.path), "layers": {}}
    total_w = total_before = total_after = 0.0
    for name, lora_layer, base in layers:
        weight = base.weight
        if weight.device.type == "meta":
            raise ConfigError([f"loftq: {name} is offloaded (its weight is on the meta device); LoftQ needs every "
                               "4-bit layer in memory when the adapters are created (drop cpu offload)"])
        key = name.removeprefix("base_model.model.") + ".weight"
        w = source.get(key, prefix).to(device=weight.device, dtype=torch.float32)
        if tuple(w.shape) != (base.out_features, base.in_features):
            raise ConfigError([f"loftq: {source.path} holds {key} with shape {tuple(w.shape)}, the model's layer "
                               f"is {(base.out_features, base.in_features)}: not this model's checkpoint"])
        with torch.no_grad():
            residual = w - dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
            w_norm = float(w.norm())
            before = float(residual.norm())
            after = before
            for adapter, lora_A in lora_layer.lora_A.items():
                if getattr(lora_layer, "use_dora", {}).get(adapter, False):
                    raise ConfigError(["loftq: DoRA adapters (lora.use_dora) are not LoftQ-initialised; "
                                       "use plain LoRA with --plugin loftq"])
                A, B, after = loftq_factors(residual, lora_layer.r[adapter], lora_layer.scaling[adapter])
                lora_B = lora_layer.lora_B[adapter]
                lora_A.weight.data.copy_(A.to(lora_A.weight.dtype))
                lora_B.weight.data.copy_(B.to(lora_B.weight.dtype))
        del w, residual
        stats["layers"][key.removesuffix(".weight")] = {"error_before": before / w_norm, "error_after": after / w_norm}
        total_w += w_norm ** 2
        total_before += before ** 2
        total_after += after ** 2
    stats["error_before"] = math.sqrt(total_before / total_w)
    stats["error_after"] = math.sqrt(total_after / total_w)
    setattr(model, STATS_ATTR, stats)
    print(f"loftq: {len(layers)} adapters initialised from {source.path}: 4-bit error "
          f"{stats['error_before']:.2%} -> {stats['error_after']:.2%} of the weights' norm", file=sys.stderr)


def _stats_of(model) -> dict | None:
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        stats = getattr(candidate, STATS_ATTR, None) if candidate is not None else None
        if stats is not None:
            return stats
    return None


@hookimpl
def qlora_on_train_start(run):
    stats = _stats_of(run.model)
    if stats is None or not run.is_main_process:
        return
    target = Path(run.output_dir) / "loftq.json"
    if not target.exists():  # a resumed run keeps the figures of its start
        target.write_text(json.dumps(stats, indent=1) + "\n")
