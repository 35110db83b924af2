"""The registered backends, by priority: `BACKENDS` lists their names, `get_backend` resolves one.

A backend is a package holding its launchers (a `KernelSet`) and, if it has any, its launch-config type;
registering it is one `Backend(...)` entry in `_REGISTERED` below (BUILD.md, "Adding a backend").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)

from pallas_mlstm import mosaic_gpu, pallas_triton, xla_kernels
from pallas_mlstm.backend import Backend
from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS, KernelSet
from pallas_mlstm.pallas_triton.common import gpu_available
from pallas_mlstm.pallas_triton.launch import MIN_TILE, TritonLaunch, from_upstream

# The Pallas interpreter imports jax.experimental.pallas.fuser on its first lowering, and that module adds a value
# to JAX's tracing context: every function jitted before (ours included) would then trace and compile once more.
# Importing it here, with the interpret backend, keeps the first call's compilations valid.


def _triton_launch(kernel: str, flat: dict, override: dict | None) -> TritonLaunch:
    """A Triton kernel's launch: upstream's flat fields, then the kernel's own entry over them."""
    if override is None:
        return from_upstream(kernel, flat)
    names = {field.name for field in dataclasses.fields(TritonLaunch)}
    unknown = sorted(set(override) - names)
    if unknown or (kernel.startswith("recurrent") and {"siz_b_LQ", "siz_b_LKV"} & set(override)):
        allowed = sorted(names - ({"siz_b_LQ", "siz_b_LKV"} if kernel.startswith("recurrent") else set()))
        raise ValueError(
            f"config.kernels[{kernel!r}] sets {sorted(set(override) - set(allowed))}, which the "
            f"triton backend's {kernel} does not take: use {', '.join(allowed)}."
        )
    return from_upstream(kernel, flat).merged(TritonLaunch(**override))


_TRITON = Backend(
    name="triton",
    kernels=pallas_triton.KERNELS,
    available=gpu_available,
    priority=0,
    min_chunk=MIN_TILE,
    launch_type=TritonLaunch,
    resolve_launch=_triton_launch,
    unavailable="backend='triton' needs an NVIDIA GPU, and JAX's default backend here is {platform!r}: use "
    "backend='xla' (plain XLA, any device) or backend='interpret' (the Pallas kernels on the CPU, slow).",
)
_MOSAIC = dataclasses.replace(
    _TRITON,
    name="mosaic",
    kernels=mosaic_gpu.KERNELS,
    available=mosaic_gpu.available,
    priority=None,
    unavailable="backend='mosaic' needs a Hopper GPU (compute capability 9.0: H100, H200): use backend='triton' on "
    "other NVIDIA GPUs, backend='xla' (any device) or backend='mosaic_interpret' (its kernels on the CPU, slow).",
)
_REGISTERED = (
    _TRITON,
    dataclasses.replace(_TRITON, name="interpret", available=lambda: True, priority=None, interpret=True),
    Backend(name="xla", kernels=xla_kernels.KERNELS, available=lambda: True, priority=1),
    _MOSAIC,
    dataclasses.replace(
        _MOSAIC,
        name="mosaic_interpret",
        available=mosaic_gpu.interpreter_available,
        interpret=True,
        partitionable=False,
        unavailable=f"backend='mosaic_interpret' needs at least {mosaic_gpu.INTERPRETER_THREADS} worker threads in "
        "JAX's CPU backend (one per core, and this machine has fewer): set the environment variable "
        f"PJRT_NPROC={mosaic_gpu.INTERPRETER_THREADS} before JAX starts, or use backend='interpret'.",
    ),
)
_BY_NAME = {backend.name: backend for backend in _REGISTERED}
BACKENDS = tuple(_BY_NAME)


def registered(name: str) -> Backend:
    """The registered backend called `name`, whether or not it can run here."""
    if name not in _BY_NAME:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic); got {name!r}.")
    return _BY_NAME[name]


def get_backend(name: str | None) -> Backend:
    """The backend called `name`, checked to run here; None: the available one of lowest priority (triton on an
    NVIDIA GPU, else xla)."""
    if name is None:
        ranked = sorted((b for b in _REGISTERED if b.priority is not None), key=lambda b: b.priority)
        return next(b for b in ranked if b.available())
    backend = registered(name)
    if not backend.available():
        raise ValueError(backend.unavailable.format(platform=jax.default_backend()))
    return backend


def resolve_backend(name: str | None) -> str:
    """The name of the backend `name` resolves to (see `get_backend`)."""
    return get_backend(name).name


def _cannot_stand_in(base: Backend, other: Backend) -> str | None:
    """Why `other` cannot run some of `base`'s kernels in one call, or None: it must run here and take `base`'s
    launch configs (the same launch type, both compiled or both interpreted)."""
    if not other.available():
        return f"it cannot run here ({other.unavailable.format(platform=jax.default_backend()).rstrip('.')})"
    if other.launch_type is not base.launch_type:
        return f"backend {other.name!r} takes other launch configs than backend {base.name!r}"
    if other.interpret != base.interpret:
        compiled = lambda backend: "interpreted" if backend.interpret else "compiled"
        return f"backend {other.name!r} is {compiled(other)}, backend {base.name!r} {compiled(base)}"
    return None


def runs_tuned_kernels(backend: Backend, config) -> bool:
    """True where `backend` itself runs every kernel of `config.kernel_backends` (a `ChunkwiseConfig`) with the
    backend named there: a tuned entry measured with other kernels than those of a backend the caller names is not
    that backend's config (backend="mosaic" takes an entry tuned with Mosaic GPU's H kernel, "triton" does not)."""
    return all(
        name in _BY_NAME and getattr(_BY_NAME[name].kernels, kernel) is getattr(backend.kernels, kernel)
        for kernel, name in config.kernel_backends
    )


def with_kernel_backends(base: Backend, choices: tuple[tuple[str, str], ...], *, tuned: bool = False) -> Backend:
    """`base` with the kernels `choices` names (`ChunkwiseConfig.kernel_backends`: (kernel, backend name)) taken
    from those backends; `base` itself where nothing changes. A choice that cannot apply (`_cannot_stand_in`) is a
    ValueError naming it, or, for a `tuned` config's choices, skipped."""
    kernels, taken, partitionable = {}, [], base.partitionable
    for kernel, name in choices:
        other = _BY_NAME.get(name)
        if other is None:
            problem = f"not a backend; use one of {BACKENDS}"
        else:
            problem = _cannot_stand_in(base, other) if other is not base else None
        if problem is not None and not tuned:
            raise ValueError(f"config.kernel_backends[{kernel!r}] = {name!r}: {problem.rstrip('.')}.")
        if problem is not None or other is base:
            continue
        kernels[kernel] = getattr(other.kernels, kernel)
        taken.append(f"{kernel}: {name}")
        partitionable = partitionable and other.partitionable
    if not kernels:
        return base
    mixed = dataclasses.replace(base.kernels, **kernels)
    return dataclasses.replace(
        base,
        name=f"{base.name} ({', '.join(taken)})",
        kernels=dataclasses.replace(mixed, parallel_bw_dK_dQ=_one_launch_dK_dQ(mixed)),
        priority=None,
        min_chunk=max(base.min_chunk, *(_BY_NAME[name].min_chunk for _, name in choices if name in _BY_NAME)),
        partitionable=partitionable,
    )


def _one_launch_dK_dQ(kernels: KernelSet):
    """The one-launch dK and dQ of the backend whose parallel_bw_dK and parallel_bw_dQ `kernels` holds both, or
    None (`KernelSet.parallel_bw_dK_dQ`)."""
    owners = (
        backend.kernels
        for backend in _REGISTERED
        if backend.kernels.parallel_bw_dK is kernels.parallel_bw_dK
        and backend.kernels.parallel_bw_dQ is kernels.parallel_bw_dQ
    )
    return next((owner.parallel_bw_dK_dQ for owner in owners if owner.parallel_bw_dK_dQ is not None), None)


def kernel_alternatives(base: Backend) -> list[tuple[str, str]]:
    """(kernel, backend name) for each chunkwise kernel that another backend runs here in its own way and could
    run under `base` (what `tune` times against `base`'s)."""
    return [
        (kernel, other.name)
        for other in _REGISTERED
        if other is not base and _cannot_stand_in(base, other) is None
        for kernel in CHUNKWISE_KERNELS
        if getattr(other.kernels, kernel) is not getattr(base.kernels, kernel)
    ]
