"""The six chunkwise mLSTM kernels in Pallas, lowered to Triton (or run by the Pallas interpreter)."""

from __future__ import annotations

import functools

from pallas_mlstm.pallas_triton.parallel_bw_dK import mlstm_chunkwise__parallel_bw_dK
from pallas_mlstm.pallas_triton.parallel_bw_dQ import mlstm_chunkwise__parallel_bw_dQ
from pallas_mlstm.pallas_triton.parallel_bw_dV import mlstm_chunkwise__parallel_bw_dV
from pallas_mlstm.pallas_triton.parallel_fw import mlstm_chunkwise__parallel_fw_Hintra
from pallas_mlstm.pallas_triton.recurrent_bw import mlstm_chunkwise__recurrent_bw_dC
from pallas_mlstm.pallas_triton.recurrent_fw import mlstm_chunkwise__recurrent_fw_C
from reference.chunkwise import KernelSet


def pallas_kernel_set(*, interpret: bool, allow_tf32: bool) -> KernelSet:
    """The Pallas kernels with `interpret` / `allow_tf32` bound, as one `KernelSet`."""
    bind = lambda kernel: functools.partial(kernel, interpret=interpret, allow_tf32=allow_tf32)
    return KernelSet(
        name="interpret" if interpret else "triton",
        recurrent_fw_C=bind(mlstm_chunkwise__recurrent_fw_C),
        parallel_fw_Hintra=bind(mlstm_chunkwise__parallel_fw_Hintra),
        recurrent_bw_dC=bind(mlstm_chunkwise__recurrent_bw_dC),
        parallel_bw_dQ=bind(mlstm_chunkwise__parallel_bw_dQ),
        parallel_bw_dK=bind(mlstm_chunkwise__parallel_bw_dK),
        parallel_bw_dV=bind(mlstm_chunkwise__parallel_bw_dV),
    )


__all__ = [
    "mlstm_chunkwise__parallel_bw_dK",
    "mlstm_chunkwise__parallel_bw_dQ",
    "mlstm_chunkwise__parallel_bw_dV",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "mlstm_chunkwise__recurrent_bw_dC",
    "mlstm_chunkwise__recurrent_fw_C",
    "pallas_kernel_set",
]
