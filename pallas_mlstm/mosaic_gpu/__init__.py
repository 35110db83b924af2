"""The chunkwise mLSTM kernels in Pallas Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`), for Hopper GPUs (sm_90a).

The second GPU backend, next to pallas_mlstm.pallas_triton (Pallas lowered to Triton, which JAX 0.11 deprecates),
registered as backend="mosaic" (a Hopper GPU) and backend="mosaic_interpret" (Mosaic GPU's interpreter on the CPU,
for tests). A kernel joins KERNELS once it has passed the GPU tests, beaten the Triton kernel on a Hopper GPU
(`python -m pallas_mlstm.benchmarks.mosaic_check`) and the GPU test files have passed with it in the backend. Each
runs wherever its module `supports` the call, and the Triton kernel otherwise (`mosaic_where_supported`):

- the forward's H kernel (parallel_fw.py), the backward's dV kernel (parallel_bw.py) and its dK and dQ kernels
  (parallel_bw_sliced.py) at chunk 64, 128 or 256, DHQK up to 256, 16-bit or float32 inputs (float32 at DHQK 256 x
  DHHV 512 in two operand parts, test_mosaic's 7b-widths-f32 case). They read the gate arrays the Triton launchers
  read and compute the decays from them, as Triton's kernels do (results/h100-ab-gate-arrays.json; with the
  states kernels' gates below, peak memory of the whole op was 9 / 33 KiB above Triton's in the forward and
  below it in forward + backward at 7b / tfla-paper on an H100, results/h100-ab-states-launcher.json). On an
  H100 dK and dQ take 0.56-0.81x Triton's time (results/h100-ab-dkdq-variants.json). Where both run here and no
  head dim is padded, they run in one launch (`_dK_dQ_where_supported`): 0.96x / 0.87x the time of two at 7b /
  tfla-paper on an H100 (results/h100-ab-dk-dq-one-launch.json);
- the two states kernels, recurrent_fw.py (forwards in time) and recurrent_bw.py (backwards), only where their grid
  has a program for every SM of the card (`recurrent_fw.takes_and_fills_the_card`, their `supports`): each program
  walks its tile of the state through every chunk in turn, and with fewer programs the forward lost to Triton's on
  an H200 (results/h200-mosaic-check-states.json). A ring buffer holds 128 time steps where a states chunk holds two
  such, 64 otherwise (results/h100-ab-states-variants.json); each chunk's decay is one scalar read (not a row
  beside the weights), and the launcher finds m in log depth (results/h100-ab-states-launcher.json).

The Triton kernels run with their launchers and launch config (`TritonLaunch`, which the Mosaic GPU kernels ignore:
they pick their own tiles). common.py holds what the Mosaic GPU kernels share.
"""

import importlib
import os

import jax

from pallas_mlstm import pallas_triton
from pallas_mlstm.device import device_properties
from pallas_mlstm.kernel_call import KernelCall, KernelSet
from pallas_mlstm.pallas_triton.common import gpu_available

HOPPER = (9, 0)
# Mosaic GPU's interpreter runs each warpgroup of a program (up to 3 here) as a thread that blocks one of XLA's CPU
# worker threads while it waits on a barrier; with fewer workers than that the kernel deadlocks.
INTERPRETER_THREADS = 4


def mosaic_where_supported(module: str, kernel: str):
    """The launcher of `kernel` in this backend: the Mosaic GPU one of pallas_mlstm.mosaic_gpu.`module` where that
    module `supports` the call, else the Triton backend's (same arguments and outputs). The module is imported on
    the first call: Mosaic GPU's Pallas module takes about a third of a second to import, which `import
    pallas_mlstm` should not pay on machines that never run it."""

    def launcher(call: KernelCall, *arrays):
        mosaic = importlib.import_module(f"{__name__}.{module}")
        if mosaic.supports(call, *arrays):
            return getattr(mosaic, kernel)(call, *arrays)
        return getattr(pallas_triton.KERNELS, kernel)(call, *arrays)

    launcher.__name__ = launcher.__qualname__ = kernel
    launcher.__doc__ = f"{kernel}: Mosaic GPU ({module}.py) where it supports the call, else Triton's."
    return launcher


def _dK_dQ_where_supported(dk_call: KernelCall, dq_call: KernelCall, *arrays):
    """dK and dQ in one Mosaic GPU launch (parallel_bw_sliced.parallel_bw_dK_dQ) where it takes the call, else as
    this backend's two launchers run them. The two calls differ only in their Triton launch, which Mosaic GPU
    ignores."""
    mosaic = importlib.import_module(f"{__name__}.parallel_bw_sliced")
    if mosaic.supports_one_launch(dk_call, *arrays):
        return mosaic.parallel_bw_dK_dQ(dk_call, *arrays)
    return KERNELS.parallel_bw_dK(dk_call, *arrays), KERNELS.parallel_bw_dQ(dq_call, *arrays)


KERNELS = KernelSet(
    recurrent_fw_C=mosaic_where_supported("recurrent_fw", "recurrent_fw_C"),
    parallel_fw_Hintra=mosaic_where_supported("parallel_fw", "parallel_fw_Hintra"),
    recurrent_bw_dC=mosaic_where_supported("recurrent_bw", "recurrent_bw_dC"),
    parallel_bw_dQ=mosaic_where_supported("parallel_bw_sliced", "parallel_bw_dQ"),
    parallel_bw_dK=mosaic_where_supported("parallel_bw_sliced", "parallel_bw_dK"),
    parallel_bw_dV=mosaic_where_supported("parallel_bw", "parallel_bw_dV"),
    recurrent_step=pallas_triton.KERNELS.recurrent_step,
    parallel_bw_dK_dQ=_dK_dQ_where_supported,
)


def available() -> bool:
    """True on a CUDA GPU of compute capability 9.0 (Hopper: H100, H200), the one the wgmma / TMA kernels target,
    and while lowering for a GPU without one (an abstract mesh of cuda devices; the card compiles it later)."""
    if jax.default_backend() != "gpu":
        return gpu_available()
    return device_properties().compute_capability == HOPPER


def cpu_worker_threads() -> int:
    """The worker threads of JAX's CPU backend: PJRT_NPROC where set (read when the backend starts), else the
    cores."""
    return int(os.environ.get("PJRT_NPROC") or os.cpu_count() or 1)


def interpreter_available() -> bool:
    """True where Mosaic GPU's interpreter can run the kernels: enough CPU worker threads (INTERPRETER_THREADS)."""
    return cpu_worker_threads() >= INTERPRETER_THREADS


__all__ = [
    "HOPPER",
    "KERNELS",
    "available",
    "interpreter_available",
    "mosaic_where_supported",
]
