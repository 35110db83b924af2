"""Per-case keys, casts and losses shared by the tests (inputs, rel_err and bounds: pallas_mlstm.accuracy)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding, use_abstract_mesh
from jax.sharding import PartitionSpec as P

import pallas_mlstm
from pallas_mlstm import accuracy
from pallas_mlstm.kernel_call import CHUNKWISE_KERNELS
from pallas_mlstm.registry import registered
from tests import flags as test_flags

# A backend built from another's kernels runs that one's test grid (cases, dtypes): mosaic (Mosaic GPU and Triton
# kernels, on a Hopper GPU) triton's, mosaic_interpret (the same, interpreted on the CPU) the interpreter's.
_GRID = {"mosaic": "triton", "mosaic_interpret": "interpret"}


def grid(backend: str) -> str:
    """The backend whose test grid `backend` runs."""
    return _GRID.get(backend, backend)


def skip_unless_available(backend: str) -> None:
    """Skips the test where `backend` cannot run (triton needs a GPU, mosaic a Hopper one), saying why."""
    if not registered(backend).available():
        pytest.skip(f"backend {backend} cannot run here; run with --backend={backend} on the GPU machine")


def case_key(*parts) -> jax.Array:
    """A PRNG key from --seed and a description of the test case (fresh inputs per case)."""
    return jax.random.PRNGKey(test_flags.SEED.value * 1_000_003 + zlib.crc32(repr(parts).encode()))


def to_dtype(arrays, dtype):
    """Casts every non-None array to dtype."""
    return tuple(None if x is None else x.astype(dtype) for x in arrays)


def _weights(key, like):
    """Fixed random loss weights shaped like `like`, the same values whatever its dtype."""
    return jax.random.normal(key, like.shape, jnp.float32).astype(like.dtype)


# The losses take the key of their weights as the first argument, traced: a key closed over would be a constant of
# the compiled program, so that two tests with equal programs but their own weights would each compile it.


def scale_blind_loss(fn, with_last_state_loss: bool):
    """loss(weights_key, *args): Σ w·h/‖h‖ per step (+ Σ w_c·c_last/‖c_last‖), blind to positive per-step
    rescaling of h and c_last."""

    def loss(weights_key, *args):
        out = fn(*args)
        h, last = out if with_last_state_loss else (out, None)
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        w = _weights(weights_key, h)
        total = jnp.sum(w * h / jnp.linalg.norm(h, axis=-1, keepdims=True))
        if last is not None:
            c_last = last[0]
            wc = _weights(jax.random.fold_in(weights_key, 1), c_last)
            total += jnp.sum(wc * c_last / jnp.linalg.norm(c_last, axis=(-2, -1), keepdims=True))
        return total

    return loss


def plain_loss(fn, with_last_states: bool):
    """loss(weights_key, *args): Σ w·h (+ Σ w_c·c_last + Σ w_n·n_last), not scale-blind, for the kernel-semantics
    oracle. The last states are (c, n, m) or, with the sigmoid input gate, (c, n)."""

    def loss(weights_key, *args):
        out = fn(*args)
        h, last = out if with_last_states else (out, None)
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        total = jnp.sum(_weights(weights_key, h) * h)
        if last is not None:
            c_last, n_last = last[:2]
            total += jnp.sum(_weights(jax.random.fold_in(weights_key, 1), c_last) * c_last)
            total += jnp.sum(_weights(jax.random.fold_in(weights_key, 2), n_last) * n_last)
        return total

    return loss


def extreme_gates(i, f):
    """Gates a user may pass, for S >= 61 and chunks of 16: hard resets (f̃ = −∞ at the first step, on the chunk
    edge 16 and at 41), a silent token (ĩ = −∞), saturated gates (±30, 1e4) and a near-reset (f̃ = −30)."""
    f = f.at[..., jnp.array([0, 16, 41])].set(-jnp.inf).at[..., 9].set(-30.0).at[..., 50].set(1e4)
    i = i.at[..., 7].set(-jnp.inf).at[..., 12].set(30.0).at[..., 33].set(-30.0).at[..., 60].set(1e4)
    return i, f


def mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, dtype=jnp.float32, **kwargs):
    """pallas_mlstm.accuracy.mlstm_inputs as one compiled program per shape (one compile instead of one per array)."""
    return _mlstm_inputs_jit(key, batch, heads, seq_len, dhqk, dhhv, dtype, **kwargs)


_mlstm_inputs_jit = jax.jit(
    accuracy.mlstm_inputs,
    static_argnums=(1, 2, 3, 4, 5, 6),
    static_argnames=("with_initial",),  # the gate shifts traced: one program per shape, whatever the gates
)

# The names of mlstm_chunkwise's array arguments, in order
INPUT_NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")


def input_grads(loss, weights_key, inputs, has_aux=False):
    """{name: gradient of loss(weights_key, *inputs) by that input} for every non-None input (and the aux output
    with `has_aux`), from one compiled program."""
    present = [idx for idx, x in enumerate(inputs) if x is not None]
    argnums = tuple(1 + idx for idx in present)  # after the weights key
    result = jax.jit(jax.grad(loss, argnums=argnums, has_aux=has_aux))(weights_key, *inputs)
    grads, aux = result if has_aux else (result, None)
    named = dict(zip([INPUT_NAMES[idx] for idx in present], grads))
    return (named, aux) if has_aux else named


def outputs_and_grads(make_loss, fn, weights_key, inputs):
    """(fn(*inputs), {name: gradient of make_loss(fn, True) by that input}) for every non-None input, from one
    compiled program (a separate forward would compile the forward a second time)."""

    def loss_and_outputs(key, *args):
        outputs = []
        recorded = lambda *a: outputs.append(fn(*a)) or outputs[-1]
        return make_loss(recorded, True)(key, *args), outputs[0]

    grads, outputs = input_grads(loss_and_outputs, weights_key, inputs, has_aux=True)
    return outputs, grads


# The kernels the mosaic backend runs in Mosaic GPU where they take the call: every chunkwise one (the decoding step
# is Triton's)
MOSAIC_KERNELS = list(CHUNKWISE_KERNELS)
# Those of them lower_for_cuda's program holds: its grids are too small for the states kernels, which run in Mosaic
# GPU only where their grid has a program for every SM (mosaic_gpu.recurrent_fw.takes_and_fills_the_card)
MOSAIC_KERNELS_LOWERED = ["parallel_fw_Hintra", "parallel_bw_dQ", "parallel_bw_dK", "parallel_bw_dV"]
# their Mosaic GPU launches: dK and dQ run in one (mosaic_gpu.parallel_bw_sliced.parallel_bw_dK_dQ)
MOSAIC_LAUNCHES_LOWERED = len(MOSAIC_KERNELS_LOWERED) - 1
CUDA_DEVICE = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")


def lower_for_cuda(mesh: AbstractMesh, lead_spec: tuple, backend: str | None = "triton", chunk_size: int = 64) -> str:
    """StableHLO of forward + backward of `backend` on bf16 inputs sharded over `mesh` of CUDA_DEVICE (an H100 as
    JAX describes one without it: no GPU needed), at `chunk_size`."""
    batch, heads, seq_len = 4, 2, 512
    shapes = (
        (batch, heads, seq_len, 64),
        (batch, heads, seq_len, 64),
        (batch, heads, seq_len, 128),
        (batch, heads, seq_len),
        (batch, heads, seq_len),
    )
    args = [
        jax.ShapeDtypeStruct(
            s, jnp.bfloat16 if len(s) == 4 else jnp.float32, sharding=NamedSharding(mesh, P(*lead_spec))
        )
        for s in shapes
    ]

    def fwbw(*arrays):
        loss = lambda *a: jnp.sum(
            pallas_mlstm.mlstm_chunkwise(*a, backend=backend, chunk_size=chunk_size).astype(jnp.float32)
        )
        return jax.grad(loss, argnums=tuple(range(5)))(*arrays)

    with use_abstract_mesh(mesh):
        return jax.jit(fwbw).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
