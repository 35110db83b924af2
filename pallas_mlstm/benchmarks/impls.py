"""The implementations the bench times, each a factory of jitted forward and forward+backward callables.

mLSTM implementations take (q, k, v, i, f): q, k, v bfloat16 (B, NH, S, DH*), gates float32 (B, NH, S); those of
the mLSTMsig cell (sigmoid input gate, normalised) take the same inputs.
The attention peer takes (q, k, v) bfloat16 (B, S, heads, 128) with heads·128 = NH·DHHV, the model width.
The forward+backward callable is jax.grad of sum(out.astype(float32) · weights) with respect to every input,
for fixed random `weights` of the output's shape, passed as its first argument.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_mlstm
from pallas_mlstm import registry

MLSTM = "mlstm"
MLSTM_SIGMOID = "mlstm_sigmoid"
ATTENTION = "attention"
ATTENTION_HEAD_DIM = 128
PEER_CHUNK_SIZE = 128  # mlstm_kernels' default, the peer's chunk size in benchmarks/README.md's results
WHEELS_HINT = "install the wheels under .whl as pallas_mlstm/benchmarks/README.md says"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One timed implementation: what it computes, and how to build its forward for a chunk size."""

    name: str
    description: str
    computes: str  # MLSTM or ATTENTION: which inputs it takes and which reference checks it
    default_chunk_size: int | None  # the chunk it runs when none is asked for (None: the library's choice)
    uses_chunk_size: bool
    required_modules: tuple[str, ...]
    needs_gpu: bool
    make_forward: Callable[[int | None], Callable]
    backend: str | None = None  # the pallas_mlstm backend it runs; None: a peer

    @property
    def min_chunk_size(self) -> int:
        """The smallest chunk size it takes: its backend's (pallas_mlstm.registry); 1 for a peer."""
        return 1 if self.backend is None else registry.registered(self.backend).min_chunk


@dataclasses.dataclass(frozen=True)
class TimedCallables:
    """The jitted callables the runner times."""

    forward: Callable  # (*inputs) -> output
    forward_backward: Callable  # (weights, *inputs) -> gradients with respect to the inputs


def pallas_mlstm_forward(backend: str, input_gate: str = "exponential") -> Callable[[int | None], Callable]:
    """The bench's pallas_mlstm forward on `backend`: a function of the chunk size (None: the card's default) that
    makes (q, k, v, i, f) -> h, bf16 kernels."""

    def make(chunk_size):
        return lambda q, k, v, i, f: pallas_mlstm.mlstm_chunkwise(
            q,
            k,
            v,
            i,
            f,
            chunk_size=chunk_size,
            backend=backend,
            autocast_kernel_dtype=jnp.bfloat16,
            input_gate=input_gate,
        )

    return make


def _version(distribution: str) -> str:
    """The installed version of `distribution`, or "unknown"."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def require_jax_triton_nvidia_backend() -> None:
    """RuntimeError naming the cause where jax-triton has no Triton NVIDIA backend to compile with. jax-triton
    catches that failure when it is imported and puts stand-ins in the backend's place, whose first use fails with
    "'_Stub' object has no attribute 'backend'", naming no cause; this repeats the imports to name it."""
    try:
        triton_lib = importlib.import_module("jax_triton.triton_lib")
    except ImportError:  # a jax-triton laid out otherwise, or none: importing the peer reports its own problem
        return
    if not isinstance(getattr(triton_lib, "cb", None), types.SimpleNamespace):  # the real backend module
        return
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
        importlib.import_module("triton.backends.nvidia.driver")
    except Exception as error:
        cause = f"{type(error).__name__}: {error}"
    else:
        versions = f"Triton {_version('triton')}, jax-triton {_version('jax-triton')}"
        cause = (
            f"it imports, but lacks what this jax-triton takes from it ({versions}; jax-triton 0.4.1 takes TMA_TF32, "
            "which Triton 3.6 lacks, and jax-triton 0.3.1 runs with Triton 3.6)"
        )
    raise RuntimeError(f"jax-triton found no usable Triton NVIDIA backend here: {cause}")


def disable_llvm_opt() -> None:
    """Sets DISABLE_LLVM_OPT=1, before the upstream Triton kernels are imported: Triton 3.6's LLVM aborts
    (SLPVectorizer assertion) on them otherwise."""
    os.environ["DISABLE_LLVM_OPT"] = "1"


def _tfla_jax_triton_forward(chunk_size):
    disable_llvm_opt()
    require_jax_triton_nvidia_backend()
    from mlstm_kernels.jax.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk

    return lambda q, k, v, i, f: mlstm_chunkwise__xl_chunk(
        q, k, v, i, f, chunk_size=chunk_size, autocast_kernel_dtype=jnp.bfloat16
    )


def _tfla_siging_jax_triton_forward(chunk_size):
    disable_llvm_opt()
    require_jax_triton_nvidia_backend()
    from mlstm_kernels.jax.chunkwise.triton_xl_chunk_siging import mlstm_siging_chunkwise__xl_chunk

    return lambda q, k, v, i, f: mlstm_siging_chunkwise__xl_chunk(
        q, k, v, i, f, chunk_size=chunk_size, normalize=True, autocast_kernel_dtype=jnp.bfloat16
    )


def _mlstm_kernels_native_forward(chunk_size):
    from mlstm_kernels.jax.chunkwise.native import mlstm_chunkwise__native_autograd

    return lambda q, k, v, i, f: mlstm_chunkwise__native_autograd(q, k, v, i, f, chunk_size=chunk_size)


def _cudnn_attention_forward(chunk_size):
    del chunk_size  # attention has no chunks
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


_MLSTM_KERNELS_MODULES = ("mlstm_kernels", "jax_triton", "triton", "einops")

IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation(
            "triton",
            "pallas_mlstm, Pallas lowered to Triton",
            MLSTM,
            None,
            True,
            (),
            True,
            pallas_mlstm_forward("triton"),
            backend="triton",
        ),
        Implementation(
            "mosaic",
            "pallas_mlstm, Pallas Mosaic GPU (Hopper) kernels where they take the shape, else Triton's",
            MLSTM,
            None,
            True,
            (),
            True,
            pallas_mlstm_forward("mosaic"),
            backend="mosaic",
        ),
        Implementation(
            "interpret",
            "pallas_mlstm, Pallas interpreter (CPU checks only)",
            MLSTM,
            None,
            True,
            (),
            False,
            pallas_mlstm_forward("interpret"),
            backend="interpret",
        ),
        Implementation(
            "xla",
            "pallas_mlstm, plain-jnp kernels through XLA",
            MLSTM,
            None,
            True,
            (),
            False,
            pallas_mlstm_forward("xla"),
            backend="xla",
        ),
        Implementation(
            "mk_triton",
            "mlstm_kernels TFLA, jax-triton (triton_xl_chunk)",
            MLSTM,
            PEER_CHUNK_SIZE,
            True,
            _MLSTM_KERNELS_MODULES,
            True,
            _tfla_jax_triton_forward,
        ),
        Implementation(
            "mk_native",
            "mlstm_kernels chunkwise, plain XLA (native_autograd)",
            MLSTM,
            PEER_CHUNK_SIZE,
            True,
            _MLSTM_KERNELS_MODULES,
            False,
            _mlstm_kernels_native_forward,
        ),
        Implementation(
            "triton_sig",
            "pallas_mlstm mLSTMsig (input_gate='sigmoid'), Pallas lowered to Triton",
            MLSTM_SIGMOID,
            None,
            True,
            (),
            True,
            pallas_mlstm_forward("triton", "sigmoid"),
            backend="triton",
        ),
        Implementation(
            "xla_sig",
            "pallas_mlstm mLSTMsig, plain-jnp kernels through XLA",
            MLSTM_SIGMOID,
            None,
            True,
            (),
            False,
            pallas_mlstm_forward("xla", "sigmoid"),
            backend="xla",
        ),
        Implementation(
            "mk_triton_sig",
            "mlstm_kernels TFLA mLSTMsig, jax-triton (triton_xl_chunk_siging)",
            MLSTM_SIGMOID,
            PEER_CHUNK_SIZE,
            True,
            _MLSTM_KERNELS_MODULES,
            True,
            _tfla_siging_jax_triton_forward,
        ),
        Implementation(
            "cudnn_attention",
            "causal attention, cuDNN, 128-dim heads at width NH*DHHV",
            ATTENTION,
            None,
            False,
            (),
            True,
            _cudnn_attention_forward,
        ),
    )
}
GPU_DEFAULT_IMPLS = ("triton", "xla", "mk_triton", "mk_native", "cudnn_attention")
CPU_DEFAULT_IMPLS = ("xla", "interpret")


def get_implementation(name: str) -> Implementation:
    """The implementation called `name`; ValueError for an unknown one."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLEMENTATIONS)}.")
    return IMPLEMENTATIONS[name]


def unavailable_reason(name: str, platform: str) -> str | None:
    """Why `name` cannot run here (a missing package, no GPU), or None when it can."""
    impl = get_implementation(name)
    missing = [module for module in impl.required_modules if importlib.util.find_spec(module) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({WHEELS_HINT})"
    if impl.needs_gpu and platform != "gpu":
        return f"needs an NVIDIA GPU, and JAX's platform here is {platform}"
    return None


def timed_callables(forward: Callable, num_inputs: int) -> TimedCallables:
    """Jitted `forward` and jax.grad of sum(forward(*inputs).astype(float32) · weights) w.r.t. all inputs."""

    def weighted_loss(weights, *inputs):
        return jnp.sum(forward(*inputs).astype(jnp.float32) * weights.astype(jnp.float32))

    gradients = jax.grad(weighted_loss, argnums=tuple(range(1, num_inputs + 1)))
    return TimedCallables(forward=jax.jit(forward), forward_backward=jax.jit(gradients))


def build(name: str, chunk_size: int | None) -> TimedCallables:
    """Jitted forward and forward+backward callables of implementation `name` at `chunk_size`."""
    impl = get_implementation(name)
    return timed_callables(impl.make_forward(chunk_size), 3 if impl.computes == ATTENTION else 5)


def attention_heads(nh: int, dhhv: int) -> int:
    """Heads of 128 dims at the mLSTM's model width NH·DHHV; ValueError when it is not a multiple of 128."""
    if (nh * dhhv) % ATTENTION_HEAD_DIM:
        raise ValueError(f"NH*DHHV = {nh * dhhv} is not a multiple of {ATTENTION_HEAD_DIM}: no attention peer.")
    return nh * dhhv // ATTENTION_HEAD_DIM
