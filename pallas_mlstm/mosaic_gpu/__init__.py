"""The chunkwise mLSTM kernels in Pallas Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`), for Hopper GPUs (sm_90a).

The second GPU backend, next to pallas_mlstm.pallas_triton (Pallas lowered to Triton, which JAX 0.11 deprecates).
Kernels move over one at a time: `KERNELS` runs `parallel_fw_Hintra` (the forward's largest kernel,
pallas_mlstm/mosaic_gpu/parallel_fw.py) in Mosaic GPU, and every kernel not yet written in Mosaic GPU stays the
Triton backend's, with the same launchers and launch config (`TritonLaunch`, which the Mosaic GPU kernel ignores).

Status: in development and not registered as a backend yet. The kernel matches its jnp twin in Mosaic GPU's CPU
interpreter and lowers for a Hopper GPU without one (tests/test_mosaic.py, with --backend=mosaic); it has not yet
been compiled or timed on a GPU (`python -m pallas_mlstm.mosaic_gpu.gpu_check` does both). Registering it is one
`Backend(...)` entry in pallas_mlstm/registry.py once it has.
"""

from pallas_mlstm import pallas_triton
from pallas_mlstm.device import device_properties
from pallas_mlstm.kernel_call import KernelSet
from pallas_mlstm.mosaic_gpu.parallel_fw import parallel_fw_Hintra
from pallas_mlstm.pallas_triton.common import gpu_available

HOPPER = (9, 0)

KERNELS = KernelSet(
    recurrent_fw_C=pallas_triton.KERNELS.recurrent_fw_C,
    parallel_fw_Hintra=parallel_fw_Hintra,
    recurrent_bw_dC=pallas_triton.KERNELS.recurrent_bw_dC,
    parallel_bw_dQ=pallas_triton.KERNELS.parallel_bw_dQ,
    parallel_bw_dK=pallas_triton.KERNELS.parallel_bw_dK,
    parallel_bw_dV=pallas_triton.KERNELS.parallel_bw_dV,
    recurrent_step=pallas_triton.KERNELS.recurrent_step,
)


def available() -> bool:
    """True on a CUDA GPU of compute capability 9.0 (Hopper: H100, H200), the one the wgmma / TMA kernels target."""
    return gpu_available() and device_properties().compute_capability == HOPPER


__all__ = ["HOPPER", "KERNELS", "available", "parallel_fw_Hintra"]
