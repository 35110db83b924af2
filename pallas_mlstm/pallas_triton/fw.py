"""`mlstm_chunkwise_fw`: the recurrent and parallel forward kernels chained, on a chosen backend."""

from __future__ import annotations

import functools

from pallas_mlstm.backend import kernel_set
from reference import chunkwise


@functools.wraps(chunkwise.mlstm_chunkwise_fw, assigned=("__module__", "__name__", "__qualname__"))
def mlstm_chunkwise_fw(*args, backend: str | None = None, allow_tf32: bool = False, **kwargs):
    """Chunkwise forward: (matH_out, vecN_out, vecM_out, last_states | None, all_states | None).

    Arguments as upstream's `mlstm_chunkwise_fw` (see `reference.chunkwise.mlstm_chunkwise_fw`), plus
    `backend` ("triton", "interpret", "xla" or None for automatic) and `allow_tf32`.
    """
    return chunkwise.mlstm_chunkwise_fw(*args, kernels=kernel_set(backend, allow_tf32), **kwargs)
