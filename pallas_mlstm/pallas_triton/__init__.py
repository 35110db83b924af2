"""The chunkwise mLSTM kernels (and the decoding step) in Pallas, lowered to Triton (or run by the Pallas interpreter).

`KERNELS`: the launchers, each (KernelCall, *arrays), trusting their call (pallas_mlstm.kernel_call); the
`mlstm_chunkwise__*` functions: upstream's signatures, each checking its arguments and calling its launcher.
"""

from pallas_mlstm.kernel_call import KernelSet
from pallas_mlstm.pallas_triton.parallel_bw_dK import mlstm_chunkwise__parallel_bw_dK, parallel_bw_dK
from pallas_mlstm.pallas_triton.parallel_bw_dQ import mlstm_chunkwise__parallel_bw_dQ, parallel_bw_dQ
from pallas_mlstm.pallas_triton.parallel_bw_dV import mlstm_chunkwise__parallel_bw_dV, parallel_bw_dV
from pallas_mlstm.pallas_triton.parallel_fw import mlstm_chunkwise__parallel_fw_Hintra, parallel_fw_Hintra
from pallas_mlstm.pallas_triton.recurrent_bw import mlstm_chunkwise__recurrent_bw_dC, recurrent_bw_dC
from pallas_mlstm.pallas_triton.recurrent_fw import mlstm_chunkwise__recurrent_fw_C, recurrent_fw_C
from pallas_mlstm.pallas_triton.recurrent_step import recurrent_step

KERNELS = KernelSet(
    recurrent_fw_C=recurrent_fw_C,
    parallel_fw_Hintra=parallel_fw_Hintra,
    recurrent_bw_dC=recurrent_bw_dC,
    parallel_bw_dQ=parallel_bw_dQ,
    parallel_bw_dK=parallel_bw_dK,
    parallel_bw_dV=parallel_bw_dV,
    recurrent_step=recurrent_step,
)

__all__ = [
    "KERNELS",
    "mlstm_chunkwise__parallel_bw_dK",
    "mlstm_chunkwise__parallel_bw_dQ",
    "mlstm_chunkwise__parallel_bw_dV",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "mlstm_chunkwise__recurrent_bw_dC",
    "mlstm_chunkwise__recurrent_fw_C",
]
