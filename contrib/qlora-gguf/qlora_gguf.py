"""Exporter ``gguf-export`` (not a default) and the command ``qlora gguf``: the trained model as GGUF files for
llama.cpp and the tools built on it (ollama, LM Studio, llama-cpp-python).

At the end of a run the adapter is merged into the dequantized base (the merge ``qlora merge`` does, through
:func:`qlora_core.merge_adapter`), and the merged model is written once per type of ``gguf.types`` under
``RUN_DIR/gguf/`` (``model-f16.gguf``, ``model-q8_0.gguf``, ...) with the ``gguf`` package's ``GGUFWriter``.
The file follows llama.cpp's ``convert_hf_to_gguf.py`` for the llama architecture: its hyperparameter keys
(``llama.context_length``, ``llama.attention.head_count_kv``, ...), its tensor names (``token_embd``,
``blk.N.attn_q``, ..., ``output_norm``, ``output``; mapped by ``gguf.TensorNameMap``), the query and key
projections permuted to llama.cpp's rotary layout, norms and biases kept in float32, and the byte-level BPE
tokenizer (``tokenizer.ggml.model = gpt2``: tokens, token types, merges, special token ids, chat template).

``qlora gguf SOURCE --output DIR`` does the same from a finished run folder (merged first), a plain Hugging Face
model folder, or a model name a plugin resolves (``embedded:smollm2-135m-instruct``).

Only the llama family (``model_type: llama``: Llama 2/3 with byte-level BPE tokenizers, SmolLM, SmolLM2) is
supported; any other model is refused with one line.

Config: ``gguf.types`` (``[f16, q8_0]``), ``gguf.merge_dtype`` (``float32``: the merged weights the files are
converted from).
"""

from __future__ import annotations

import json
import os
import shutil
from hashlib import sha256
from pathlib import Path
from typing import Any, Iterable

from qlora_core import UsageError, hookimpl

PLUGIN = "gguf-export"
FOLDER = "gguf"
REPORT = "gguf-export.json"

# GGUF tensor types offered, by their option name; the 2-D weights get this type, norms and biases float32.
TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPES = ["f16", "q8_0"]

# llama.cpp's pre-tokenizer names for the byte-level BPE tokenizers of the llama family, keyed by the sha256 of
# the token ids of CHECK_TEXT, as convert_hf_to_gguf.py's get_vocab_base_pre identifies them.
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",      # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",      # Smaug Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",         # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",          # GPT-2's own
}
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
    '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)


# --------------------------------------------------------------------------- options and checks


def _check_types(value: list[str]) -> str | None:
    if not value:
        return f"must name at least one GGUF type ({', '.join(TYPES)})"
    bad = [v for v in value if v not in TYPES]
    if bad:
        return f"unknown GGUF type {bad[0]!r}: use any of {', '.join(TYPES)}, e.g. [f16, q8_0]"
    if len(set(value)) != len(value):
        return "names a GGUF type twice"
    return None


def parse_types(value: str | Iterable[str]) -> list[str]:
    """``"f16,q8_0"`` or ``["f16", "q8_0"]`` as a checked list of GGUF types (lower case)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    types = [str(v).strip().lower() for v in items if str(v).strip()]
    problem = _check_types(types)
    if problem:
        raise UsageError(f"GGUF types {problem}")
    return types


@hookimpl
def qlora_config_options():
    from qlora_core import MERGE_DTYPES, Option

    return [
        Option("gguf.types", "str_list", list(DEFAULT_TYPES),
               f"GGUF files written by gguf-export, one per type: {', '.join(TYPES)}", check=_check_types),
        Option("gguf.merge_dtype", "str", "float32",
               "dtype of the merged model the GGUF files are converted from (gguf-export); auto = the run's "
               "compute dtype", choices=MERGE_DTYPES),
    ]


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why a model's ``config.json`` is not one this exporter writes, or ``None``."""
    model_type = config.get("model_type")
    if model_type != "llama":
        return (f"gguf-export writes the llama architecture only (model_type llama: Llama, SmolLM2); this model "
                f"is {model_type!r}")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear"):
        return (f"gguf-export writes llama models without RoPE scaling or with linear scaling; this one has "
                f"{rope_type!r}")
    return None


@hookimpl
def qlora_on_train_start(run):
    # Refused before training rather than after it.
    model = run.model
    if run.accelerator is not None:
        model = run.accelerator.unwrap_model(model)
    config = getattr(model, "config", None)
    if config is not None:
        reason = unsupported_reason(config.to_dict())
        if reason:
            raise UsageError(reason)


# --------------------------------------------------------------------------- the exporter


@hookimpl
def qlora_export(run, model, tokenizer, output_dir: Path) -> Path:
    from qlora_core import Job, merge_adapter, resolve_dtype, save_adapter

    output_dir = Path(output_dir)
    target = output_dir / FOLDER
    adapter_tmp = output_dir / ".gguf-adapter.partial"
    merged_tmp = output_dir / ".gguf-merged.partial"
    for tmp in (adapter_tmp, merged_tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    if run.accelerator is not None:
        model = run.accelerator.unwrap_model(model)
    try:
        save_adapter(model, adapter_tmp)
        # The run's job, rebuilt from the config.yaml it wrote when it started (same plugins, same base).
        job = Job.from_run(output_dir)
        job.tokenizer = tokenizer
        dtype = resolve_dtype(run.config["gguf.merge_dtype"], job)
        merge = merge_adapter(job, adapter_tmp, merged_tmp, dtype, tokenizer, overwrite=True,
                              source=str(output_dir), adapter_name=str(output_dir / "adapter"))
        report = convert(merged_tmp, target, run.config["gguf.types"], name=output_dir.name, overwrite=True,
                         source=str(output_dir))
        report["merge"] = {"dtype": merge.dtype, "max_abs_diff_vs_4bit_adapter": merge.max_abs_diff}
        (target / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        shutil.rmtree(merged_tmp, ignore_errors=True)
    run.extra[PLUGIN] = report
    return target


# --------------------------------------------------------------------------- the conversion


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{model_dir} is not a model folder (no config.json)")
    return json.loads(path.read_text())


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta", params.get("rope_theta", 10000.0)))


def _rope_scaling(config: dict[str, Any]) -> tuple[str, float] | None:
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    return ("linear", float(rope["factor"])) if kind == "linear" else None


def permute_for_rope(weights, n_head: int, n_head_kv: int | None = None):
    """Hugging Face's rotate-half layout of a query/key projection (weight or bias) turned into llama.cpp's
    interleaved pairs, as ``LlamaModel.permute`` in llama.cpp's converter does."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _state_tensors(model_dir: Path) -> Iterable[tuple[str, Any]]:
    """Every tensor of the folder's safetensors files as float32 numpy arrays, in file order."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir} holds no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def _pre_tokenizer(tokenizer) -> str:
    ids = tokenizer.encode(CHECK_TEXT)
    return PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest(), "default")


def _check_tokenizer(model_dir: Path) -> None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{model_dir} has no tokenizer.json: gguf-export needs the model's fast tokenizer")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        fallback = " with byte fallback" if model.get("byte_fallback") else ""
        raise UsageError("gguf-export writes byte-level BPE tokenizers only (Llama 3, SmolLM2); this model's "
                         f"tokenizer is {model.get('type')!r}{fallback}")


def _vocab(model_dir: Path, vocab_size: int):
    """Tokens, their llama.cpp types and the pre-tokenizer name, as llama.cpp's ``get_vocab_base``."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UsageError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size "
                         f"{vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp matches control and user-defined tokens as they are: normalize those the tokenizer
            # would normalize.
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, _pre_tokenizer(tokenizer), tokenizer


def _encode(data, kind: str):
    """``(array, raw_dtype)`` for ``GGUFWriter.add_tensor``: a 2-D weight in the file's type, anything else in
    float32; a Q8_0 weight whose rows are not whole blocks of 32 falls back to F16, as llama.cpp's converter."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or kind == "f32":
        return data.astype(np.float32), T.F32
    if kind == "f16":
        return data.astype(np.float16), T.F16
    qtype = T.BF16 if kind == "bf16" else T.Q8_0
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return data.astype(np.float16), T.F16


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


class _Source:
    """A Hugging Face llama folder read once for all the GGUF files written from it: its config, vocabulary and
    special tokens (the weights are read per file)."""

    def __init__(self, model_dir: Path):
        import gguf

        self.dir = model_dir
        self.config = config = _read_config(model_dir)
        reason = unsupported_reason(config)
        if reason:
            raise UsageError(reason)
        _check_tokenizer(model_dir)
        self.n_head = config["num_attention_heads"]
        self.n_head_kv = config.get("num_key_value_heads") or self.n_head
        self.n_layers = config["num_hidden_layers"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.n_head
        self.tokens, self.token_types, self.pre, tokenizer = _vocab(model_dir, config["vocab_size"])
        self.special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(self.tokens))
        # Whether the tokenizer adds BOS / EOS, stated in the file so that llama.cpp tokenizes prompts as
        # transformers does, also when tokenizer_config.json does not say it.
        ids = tokenizer.encode("a")
        for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
            if kind not in self.special.add_special_token and token_id is not None:
                at = 0 if kind == "bos" else -1
                self.special.add_special_token[kind] = bool(ids) and ids[at] == token_id
        tokenizer_config = model_dir / "tokenizer_config.json"
        self.add_prefix_space = (json.loads(tokenizer_config.read_text()).get("add_prefix_space")
                                 if tokenizer_config.is_file() else None)

    def add_metadata(self, writer, kind: str, name: str) -> None:
        """The keys llama.cpp's converter writes for a llama model, hyperparameters then tokenizer."""
        import gguf

        config = self.config
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(self.n_layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        if config.get("head_dim"):
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(self.head_dim)
        if (scaling := _rope_scaling(config)) is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling[1])
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.add_prefix_space is not None:
            writer.add_add_space_prefix(bool(self.add_prefix_space))
        self.special.add_to_gguf(writer, quiet=True)

    def tensors(self) -> Iterable[tuple[str, Any]]:
        """``(llama.cpp name, float32 array)`` for every weight, queries and keys permuted for llama.cpp's RoPE."""
        import gguf

        names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, self.n_layers)
        for hf_name, data in _state_tensors(self.dir):
            if hf_name.endswith(".rotary_emb.inv_freq"):
                continue  # recomputed from rope_freq_base
            new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise UsageError(f"gguf-export cannot map the tensor {hf_name!r} of {self.dir} to a llama.cpp name")
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_for_rope(data, self.n_head, self.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_for_rope(data, self.n_head, self.n_head_kv)
            yield new_name, data


def write_gguf(model_dir: str | Path | _Source, path: str | Path, kind: str, name: str | None = None) -> dict[str, Any]:
    """Write the Hugging Face llama model in ``model_dir`` (config.json, safetensors, tokenizer) as one GGUF
    file of type ``kind`` (``f32``, ``f16``, ``bf16`` or ``q8_0``) at ``path``.

    :returns: ``{"file", "type", "bytes", "tensors", "pre_tokenizer"}``.
    :raises UsageError: for a model that is not a llama, or a tokenizer that is not byte-level BPE.
    """
    import gguf

    if kind not in TYPES:
        raise UsageError(f"unknown GGUF type {kind!r}: use any of {', '.join(TYPES)}")
    source = model_dir if isinstance(model_dir, _Source) else _Source(Path(model_dir))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        source.add_metadata(writer, kind, name or source.dir.name)
        count = 0
        for new_name, data in source.tensors():
            array, raw_dtype = _encode(data, kind)
            writer.add_tensor(new_name, array, raw_dtype=raw_dtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return {"file": path.name, "type": kind, "bytes": path.stat().st_size, "tensors": count,
            "pre_tokenizer": source.pre}


def convert(model_dir: str | Path, output_dir: str | Path, types: Iterable[str] = DEFAULT_TYPES,
            name: str | None = None, overwrite: bool = False, source: str | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (a Hugging Face llama folder) as ``output_dir/model-TYPE.gguf`` for each type.

    The folder is written under a temporary name and renamed when complete.

    :param source: what to name as the source in the report (default ``model_dir``).
    :returns: the report written to ``output_dir/gguf-export.json``: ``source`` and ``files`` (each file's name,
        type, size).
    :raises UsageError: when ``output_dir`` exists and is not empty without ``overwrite``, or the model is not
        a llama.
    """
    types = parse_types(types)
    model_dir, out = Path(model_dir), Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite or choose another --output")
    model = _Source(model_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = [write_gguf(model, tmp / f"model-{kind}.gguf", kind, name=name) for kind in types]
        report = {"source": source or str(model_dir), "files": files}
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------- the command


def _add_arguments(parser) -> None:
    parser.add_argument("source", help="a finished run folder (its adapter is merged first), a Hugging Face model "
                                       "folder, or a model name such as embedded:smollm2-135m-instruct")
    parser.add_argument("--output", required=True, help="the folder to write model-TYPE.gguf files into")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES),
                        help=f"comma-separated GGUF types, of {', '.join(TYPES)} (default {','.join(DEFAULT_TYPES)})")
    parser.add_argument("--dtype", default="float32",
                        help="for a run folder: dtype of the merged model converted from (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def _resolve_model(name: str) -> Path:
    """A model name turned into a local folder by the plugins of a default run (``embedded:...``)."""
    from qlora_core import resolve

    config, plugins = resolve({"model": {"name_or_path": name}})
    path = plugins.hook.qlora_resolve_model(name_or_path=name, config=config)
    if path is None or not Path(path, "config.json").is_file():
        raise UsageError(f"{name!r} is neither a run folder nor a model folder nor a model name a plugin resolves "
                         "to a local folder")
    return Path(path)


def _main(args) -> int:
    from qlora_core import merge

    types = parse_types(args.types)
    source, out = Path(args.source), Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite or choose another --output")
    if (source / "run.json").is_file():
        merged = out.with_name(out.name + ".merged.partial")
        shutil.rmtree(merged, ignore_errors=True)
        try:
            merge(source, merged, dtype=args.dtype, overwrite=True)
            report = convert(merged, out, types, name=source.name, overwrite=args.overwrite, source=str(source))
        finally:
            shutil.rmtree(merged, ignore_errors=True)
    else:
        model_dir = source if source.is_dir() else _resolve_model(args.source)
        report = convert(model_dir, out, types, name=model_dir.name, overwrite=args.overwrite)
    for f in report["files"]:
        print(f"wrote {out / f['file']} ({f['type']}, {f['bytes'] / 2**20:.1f} MiB)")
    return 0


@hookimpl
def qlora_register_commands(register):
    # qlora gguf SOURCE --output DIR [--types f16,q8_0] [--dtype float32] [--overwrite]
    register("gguf", "write a run's merged model (or a llama model folder) as GGUF files for llama.cpp",
             _add_arguments, _main)
