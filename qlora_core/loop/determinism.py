"""``train.deterministic``: runs that repeat bit for bit on the same machine and versions.

On a GPU neither the guide's recipe nor qlora's repeats a run exactly by default: some kernels' backward
passes (cuDNN's attention among the likely ones) add partial results in whatever order the GPU finishes them,
so two runs' second losses already differ in the fourth decimal, and at high learning rates the difference
grows (docs/performance.md). With the option on, torch uses its deterministic algorithms (flash attention's
deterministic backward instead of cuDNN's, for one) and a fixed cuBLAS workspace. An operation that has no
deterministic implementation stops the run with a one-line error naming it, instead of running
non-reproducibly. The kernels outside torch (bitsandbytes', liger-kernel's, qlora's Triton NF4 kernel) needed
no switch: with the option, two runs on an H200 gave bit-identical losses over 50 steps, dense and packed, for
about 5% of the speed (docs/performance.md).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from qlora_core.framework.errors import UsageError

#: cuBLAS's reproducible workspace setting (CUDA's documentation: ``:4096:8`` or ``:16:8``).
CUBLAS_WORKSPACE = ":4096:8"
_MISSING = "does not have a deterministic implementation"


def prepare_environment() -> None:
    """Set what must be set before CUDA's libraries start: cuBLAS reads its workspace setting once, when the
    process first uses it. A value the user exported is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Torch's deterministic algorithms for the body (nothing when not ``enabled``); the previous settings
    afterwards. A missing deterministic implementation becomes a :class:`UsageError` naming the operation."""
    if not enabled:
        yield
        return
    import torch

    prepare_environment()
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    # Deterministic mode also fills every new uninitialized tensor, in case something reads it before writing.
    # Nothing in the training path does: on the H200 the losses were bit-identical with and without the fill,
    # and the fill cost about 10% of the speed (docs/performance.md).
    det.fill_uninitialized_memory = False
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if _MISSING not in text:
            raise
        op = text.split(_MISSING)[0].strip() or "an operation"
        raise UsageError(f"train.deterministic: {op} has no deterministic implementation on this device; set "
                         f"train.deterministic: false to run without bit-for-bit repeatability") from None
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        det.fill_uninitialized_memory = before[4]
