"""`mlstm_chunkwise_bw`: the recurrent and parallel backward kernels chained, on a chosen backend."""

from __future__ import annotations

import functools

from pallas_mlstm.backend import kernel_set
from reference import chunkwise


@functools.wraps(chunkwise.mlstm_chunkwise_bw, assigned=("__module__", "__name__", "__qualname__"))
def mlstm_chunkwise_bw(*args, backend: str | None = None, allow_tf32: bool = False, **kwargs):
    """Chunkwise backward: (dQ, dK, dV, dI, dF, dC_initial, dN_initial, dM_initial).

    Arguments as upstream's `mlstm_chunkwise_bw` (see `reference.chunkwise.mlstm_chunkwise_bw`, which
    also takes `vecDeltaN_last`), plus `backend` ("triton", "interpret", "xla" or None) and `allow_tf32`.
    """
    return chunkwise.mlstm_chunkwise_bw(*args, kernels=kernel_set(backend, allow_tf32), **kwargs)
