"""Backend names, and the six kernels each backend runs (`KernelSet`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from pallas_mlstm import pallas_triton, xla_kernels
from pallas_mlstm.pallas_triton.common import gpu_available

BACKENDS = ("triton", "interpret", "xla")
KERNEL_NAMES = ("recurrent_fw_C", "parallel_fw_Hintra", "recurrent_bw_dC", "parallel_bw_dQ", "parallel_bw_dK",
                "parallel_bw_dV")


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """The six chunkwise kernels one orchestration chains; each has its upstream signature (docs/math.md §3.3)."""

    name: str
    recurrent_fw_C: Callable[..., Any]
    parallel_fw_Hintra: Callable[..., Any]
    recurrent_bw_dC: Callable[..., Any]
    parallel_bw_dQ: Callable[..., Any]
    parallel_bw_dK: Callable[..., Any]
    parallel_bw_dV: Callable[..., Any]


def resolve_backend(backend: str | None) -> str:
    """`backend`, or the default: "triton" when JAX's default device is a GPU, "xla" otherwise."""
    if backend is None:
        return "triton" if jax.default_backend() == "gpu" else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic); got {backend!r}.")
    if backend == "triton" and not gpu_available():
        raise ValueError(
            f"backend='triton' needs an NVIDIA GPU, and JAX's default backend here is {jax.default_backend()!r}: "
            "use backend='xla' (plain XLA, any device) or backend='interpret' (the Pallas kernels on the CPU, slow)."
        )
    return backend


@functools.lru_cache(maxsize=None)
def kernel_set(backend: str | None, allow_tf32: bool = False) -> KernelSet:
    """The six kernels of `backend` ("triton", "interpret", "xla" or None); cached, so jit sees one object."""
    backend = resolve_backend(backend)
    module = xla_kernels if backend == "xla" else pallas_triton
    bind = lambda kernel: kernel  # the jnp kernels take no launch-only arguments
    if backend != "xla":
        bind = lambda kernel: functools.partial(kernel, interpret=backend == "interpret", allow_tf32=allow_tf32)
    kernels = {name: bind(getattr(module, f"mlstm_chunkwise__{name}")) for name in KERNEL_NAMES}
    return KernelSet(name=backend, **kernels)
