"""pallas_mlstm: the chunkwise (TFLA) mLSTM kernels in Pallas, lowered to Triton, for JAX."""

from pallas_mlstm.api import mlstm_chunkwise
from pallas_mlstm.config import ChunkwiseConfig
from pallas_mlstm.decoding import mlstm_recurrent_step
from pallas_mlstm.gates import compute_chunkwise_reset_gates
from pallas_mlstm.pallas_triton import (
    mlstm_chunkwise__parallel_bw_dK,
    mlstm_chunkwise__parallel_bw_dQ,
    mlstm_chunkwise__parallel_bw_dV,
    mlstm_chunkwise__parallel_fw_Hintra,
    mlstm_chunkwise__recurrent_bw_dC,
    mlstm_chunkwise__recurrent_fw_C,
)
from pallas_mlstm.pallas_triton.launch import TritonLaunch
from pallas_mlstm.registry import BACKENDS, get_backend, resolve_backend
from pallas_mlstm.upstream import (
    compute_chunkwise_log_gates_vecB_vecA,
    mlstm_chunkwise_bw,
    mlstm_chunkwise_fw,
    mlstm_chunkwise_max_triton,
    mlstm_recurrent_step__triton_fw,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ChunkwiseConfig",
    "TritonLaunch",
    "compute_chunkwise_log_gates_vecB_vecA",
    "compute_chunkwise_reset_gates",
    "get_backend",
    "mlstm_chunkwise",
    "mlstm_chunkwise__parallel_bw_dK",
    "mlstm_chunkwise__parallel_bw_dQ",
    "mlstm_chunkwise__parallel_bw_dV",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "mlstm_chunkwise__recurrent_bw_dC",
    "mlstm_chunkwise__recurrent_fw_C",
    "mlstm_chunkwise_bw",
    "mlstm_chunkwise_fw",
    "mlstm_chunkwise_max_triton",
    "mlstm_recurrent_step",
    "mlstm_recurrent_step__triton_fw",
    "resolve_backend",
]
