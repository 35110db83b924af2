"""Backend names and the kernel set each one runs."""

from __future__ import annotations

import functools

import jax

from pallas_mlstm import pallas_triton
from reference.chunkwise import JNP_KERNELS, KernelSet

BACKENDS = ("triton", "interpret", "xla")


def resolve_backend(backend: str | None) -> str:
    """`backend`, or the default: "triton" when JAX's default device is a GPU, "xla" otherwise."""
    if backend is None:
        return "triton" if jax.default_backend() == "gpu" else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic); got {backend!r}.")
    return backend


@functools.lru_cache(maxsize=None)
def kernel_set(backend: str, allow_tf32: bool = False) -> KernelSet:
    """The six kernels of `backend` ("triton", "interpret" or "xla"); cached, so jit sees one object."""
    backend = resolve_backend(backend)
    if backend == "xla":
        return JNP_KERNELS
    return pallas_triton.pallas_kernel_set(interpret=backend == "interpret", allow_tf32=allow_tf32)
