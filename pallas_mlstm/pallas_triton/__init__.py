"""The six chunkwise mLSTM kernels in Pallas, lowered to Triton (or run by the Pallas interpreter)."""

from pallas_mlstm.pallas_triton.parallel_bw_dK import mlstm_chunkwise__parallel_bw_dK
from pallas_mlstm.pallas_triton.parallel_bw_dQ import mlstm_chunkwise__parallel_bw_dQ
from pallas_mlstm.pallas_triton.parallel_bw_dV import mlstm_chunkwise__parallel_bw_dV
from pallas_mlstm.pallas_triton.parallel_fw import mlstm_chunkwise__parallel_fw_Hintra
from pallas_mlstm.pallas_triton.recurrent_bw import mlstm_chunkwise__recurrent_bw_dC
from pallas_mlstm.pallas_triton.recurrent_fw import mlstm_chunkwise__recurrent_fw_C

__all__ = [
    "mlstm_chunkwise__parallel_bw_dK",
    "mlstm_chunkwise__parallel_bw_dQ",
    "mlstm_chunkwise__parallel_bw_dV",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "mlstm_chunkwise__recurrent_bw_dC",
    "mlstm_chunkwise__recurrent_fw_C",
]
