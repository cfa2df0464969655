"""Exporter ``merged-export`` (not a default): at the end of a run, the adapter merged into the dequantized
base model, saved as a plain model folder under ``RUN_DIR/merged`` (with the tokenizer).

``AutoModelForCausalLM.from_pretrained("RUN_DIR/merged")`` loads it with no quantization config and no PEFT.
The merge is the one ``qlora merge`` does (:func:`qlora_core.tools.inference.merge_adapter`): the trained adapter
is written to a temporary folder, the base is loaded again in 4 bits exactly as trained, dequantized, the
adapter merged into it; the trained model handed to exporters is not touched, so exporters after this one
see it as it was. ``RUN_DIR/merged/qlora-merge.json`` records how close the merged model's logits are to
base-4bit + adapter.

Config: ``merge.dtype`` (``auto``: the run's compute dtype, float32 on a CPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_core import hookimpl
from qlora_core import save_adapter


@hookimpl
def qlora_config_options():
    from qlora_core import Option
    from qlora_core import MERGE_DTYPES

    return [Option("merge.dtype", "str", "auto",
                   "dtype of the merged model (merged-export): auto = the run's compute dtype (float32 on a CPU)",
                   choices=MERGE_DTYPES)]


@hookimpl
def qlora_export(run, model, tokenizer, output_dir: Path) -> Path:
    from qlora_core import merge_adapter, resolve_dtype
    from qlora_core import Job

    output_dir = Path(output_dir)
    target = output_dir / "merged"
    adapter_tmp = output_dir / ".merged-adapter.partial"
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    if run.accelerator is not None:
        model = run.accelerator.unwrap_model(model)
    try:
        save_adapter(model, adapter_tmp)
        # The run's job, rebuilt from the config.yaml it wrote when it started (same plugins, same base).
        job = Job.from_run(output_dir)
        job.tokenizer = tokenizer
        report = merge_adapter(job, adapter_tmp, target, resolve_dtype(run.config["merge.dtype"], job), tokenizer,
                               overwrite=True, source=str(output_dir),
                               adapter_name=str(output_dir / "adapter"))
    finally:
        shutil.rmtree(adapter_tmp, ignore_errors=True)
    run.extra["merged-export"] = report
    return target
