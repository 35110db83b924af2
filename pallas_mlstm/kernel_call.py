"""What every backend's kernels take besides arrays (`KernelCall`), and the set of kernels a backend runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

# The chunkwise kernels, in the order one forward + backward runs them.
CHUNKWISE_KERNELS = (
    "recurrent_fw_C",
    "parallel_fw_Hintra",
    "recurrent_bw_dC",
    "parallel_bw_dQ",
    "parallel_bw_dK",
    "parallel_bw_dV",
)


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """The validated non-array arguments of one kernel launch, built from a plan (pallas_mlstm.plan) or by an
    upstream-signature kernel function from its own arguments. Launchers trust it: they check nothing.

    `qk_scale` None: DHQK^-1/2. `launch`: the backend's launch config for this kernel (Triton: a
    `TritonLaunch`; None or None fields: the kernel's measured defaults); the XLA backend ignores it, and
    `allow_tf32` / `interpret` too. `states_dtype` (a dtype name or None: float32) stores the C / dC state
    buffers narrower. `save_states_every_nth_chunk` thins the states the recurrent kernels store."""

    chunk_size: int
    qk_scale: float | None = None
    eps: float = 0.0
    input_gate: str = "exponential"
    normalize: bool = True
    output_dtype: Any = jnp.float32
    states_dtype: Any = None
    save_states_every_nth_chunk: int = 1
    launch: Any = None
    allow_tf32: bool = False
    interpret: bool = False

    def scale_for(self, dhqk: int) -> float:
        """The qk scale s for heads of width dhqk."""
        return dhqk**-0.5 if self.qk_scale is None else self.qk_scale


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """A backend's launchers: each takes (KernelCall, *arrays) in its upstream kernel's array order (the
    parallel backward kernels group (vecA, vecB, vecR) and (matC_all, vecN_all, scaM_all)); see
    pallas_mlstm.pallas_triton and pallas_mlstm.xla_kernels."""

    recurrent_fw_C: Callable[..., Any]
    parallel_fw_Hintra: Callable[..., Any]
    recurrent_bw_dC: Callable[..., Any]
    parallel_bw_dQ: Callable[..., Any]
    parallel_bw_dK: Callable[..., Any]
    parallel_bw_dV: Callable[..., Any]
    recurrent_step: Callable[..., Any]
    # dK and dQ in one launch, (dK's call, dQ's call, *arrays) -> ((dK, Σ k·dK), (dQ, Σ q·dQ)), for this set's own
    # parallel_bw_dK and parallel_bw_dQ; None: two launches
    parallel_bw_dK_dQ: Callable[..., Any] | None = None

    def dK_and_dQ(self, dk_call: KernelCall, dq_call: KernelCall, *arrays):
        """((dK, Σ k·dK), (dQ, Σ q·dQ)) from the parallel backward's arrays: one launch where the set has one, else
        parallel_bw_dK's and parallel_bw_dQ's."""
        if self.parallel_bw_dK_dQ is not None:
            return self.parallel_bw_dK_dQ(dk_call, dq_call, *arrays)
        return self.parallel_bw_dK(dk_call, *arrays), self.parallel_bw_dQ(dq_call, *arrays)
