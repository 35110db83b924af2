"""Pure-jnp oracles for the mLSTM: recurrent scan, quadratic parallel form, chunkwise kernel twins."""

from reference.chunkwise import (
    JNP_KERNELS,
    KernelSet,
    compute_chunkwise_log_gates_vecB_vecA,
    mlstm_chunkwise,
    mlstm_chunkwise__parallel_bw_dK,
    mlstm_chunkwise__parallel_bw_dQ,
    mlstm_chunkwise__parallel_bw_dV,
    mlstm_chunkwise__parallel_fw_Hintra,
    mlstm_chunkwise__recurrent_bw_dC,
    mlstm_chunkwise__recurrent_fw_C,
    mlstm_chunkwise_bw,
    mlstm_chunkwise_fw,
)
from reference.parallel import mlstm_parallel
from reference.recurrent import mlstm_recurrent
from pallas_mlstm.validation import validate_chunk_size, validate_mlstm_inputs

__all__ = [
    "JNP_KERNELS",
    "KernelSet",
    "compute_chunkwise_log_gates_vecB_vecA",
    "mlstm_chunkwise",
    "mlstm_chunkwise__parallel_bw_dK",
    "mlstm_chunkwise__parallel_bw_dQ",
    "mlstm_chunkwise__parallel_bw_dV",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "mlstm_chunkwise__recurrent_bw_dC",
    "mlstm_chunkwise__recurrent_fw_C",
    "mlstm_chunkwise_bw",
    "mlstm_chunkwise_fw",
    "mlstm_parallel",
    "mlstm_recurrent",
    "validate_chunk_size",
    "validate_mlstm_inputs",
]
