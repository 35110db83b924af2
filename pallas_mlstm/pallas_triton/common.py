"""Helpers shared by the Pallas kernels: dots with explicit precision, tiling, padding, launch params.

Mechanics only: the default tiles, warps and stages (and the heuristics that pick them) are in
pallas_triton/launch_defaults.py, the launch config a caller passes (`TritonLaunch`) in pallas_triton/launch.py.

No kernel sees a partial tile: head dims are zero-padded to a power of 2 (at least 16) before the launch
(zeros change no product; padded output columns are sliced off), and every sequence tile size is a power
of 2 that divides the chunk, which divides S. The causal mask is the only in-tile mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_mlstm import states
from pallas_mlstm.pallas_triton.launch import MIN_TILE, TritonLaunch  # MIN_TILE: Triton's dot needs sides >= 16


def padded_dim(size: int) -> int:
    """The head dim the kernels run at: the next power of 2, at least MIN_TILE."""
    return max(MIN_TILE, 1 << (size - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `axis` of x up to `size` (no copy when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def tile_size(requested: int | None, dim: int, default: int, name: str) -> int:
    """A tile size along a (padded, power-of-2) dim: min(request, dim), else min(default, dim)."""
    size = min(default if requested is None else requested, dim)
    if size < MIN_TILE or size & (size - 1) or dim % size:
        raise ValueError(
            f"{name} must be a power of 2 between {MIN_TILE} and {dim} that divides {dim}; got {requested}."
        )
    return size


def triton_launch(call) -> TritonLaunch:
    """The `TritonLaunch` of a `KernelCall`: its `launch`, or all measured defaults where that is None."""
    return TritonLaunch() if call.launch is None else call.launch


def compiler_params(num_warps: int | None, num_stages: int | None, default_warps: int, default_stages: int):
    """Triton launch parameters (selects the Triton backend of Pallas explicitly); None takes the default."""
    return pl_triton.CompilerParams(
        num_warps=default_warps if num_warps is None else num_warps,
        num_stages=default_stages if num_stages is None else num_stages,
    )


def gpu_available() -> bool:
    """True on a GPU, and while lowering for one without it (under an abstract mesh of cuda devices)."""
    if jax.default_backend() == "gpu":
        return True
    abstract_device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(abstract_device, "platform", None) in ("cuda", "rocm")


def checked_interpret(interpret: bool, kernel_name: str) -> bool:
    """`interpret`, after checking that a compiled launch (interpret=False) has a GPU to run on."""
    if not interpret and not gpu_available():
        raise ValueError(
            f"{kernel_name} compiles for an NVIDIA GPU (interpret=False), and JAX's default backend here is "
            f"{jax.default_backend()!r}: pass interpret=True to run it in the Pallas interpreter on the CPU, or "
            "call pallas_mlstm.mlstm_chunkwise(..., backend='xla')."
        )
    return interpret


def matmul_precision(dtype, allow_tf32: bool):
    """IEEE float32 products unless TF32 is asked for; irrelevant for 16-bit operands."""
    if jnp.dtype(dtype) == jnp.float32 and not allow_tf32:
        return lax.Precision.HIGHEST
    return lax.Precision.DEFAULT


def dot(a: jax.Array, b: jax.Array, precision, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b (optionally transposed operands) accumulated in float32 (float64 for float64 operands)."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=states.acc_dtype(a.dtype)
    )


def tile_start(index, block: int):
    """index·block, marked as a multiple of block for the compiler when index is traced."""
    if isinstance(index, int):
        return index * block
    return pl.multiple_of(index * block, block)


def sum_over_tiles(num_tiles: int, tile_fn, init, *, unroll: bool = False):
    """init + Σ_t tile_fn(t) over the static tile count, for arrays or tuples of arrays.

    A loop, or straight-line code with `unroll` (and always for one tile).
    """
    add = lambda acc, t: jax.tree.map(jnp.add, acc, tile_fn(t))
    if num_tiles == 1 or unroll:
        for t in range(num_tiles):
            init = add(init, t)
        return init
    return lax.fori_loop(0, num_tiles, lambda t, acc: add(acc, t), init)


def dot_nt_tiled(a_ref, a_rows, b_ref, b_rows, depth: int, block: int, precision) -> jax.Array:
    """Σ over depth tiles of a_ref[a_rows, d] @ b_ref[b_rows, d]ᵀ (b cast to a's dtype): (len(a_rows), len(b_rows))."""

    def tile(t):
        cols = pl.ds(tile_start(t, block), block)
        a = a_ref[a_rows, cols]  # (a_rows.size, block)
        return dot(a, b_ref[b_rows, cols].astype(a.dtype), precision, trans_b=True)  # @ (b_rows.size, block)ᵀ

    init = jnp.zeros((a_rows.size, b_rows.size), states.acc_dtype(a_ref.dtype))
    return sum_over_tiles(depth // block, tile, init)


def dot_nn_tiled(a_ref, a_rows, b_ref, depth: int, block: int, precision) -> jax.Array:
    """Σ over depth tiles of a_ref[a_rows, d] @ b_ref[d, :] (b cast to a's dtype): (len(a_rows), b cols)."""

    def tile(t):
        inner = pl.ds(tile_start(t, block), block)
        a = a_ref[a_rows, inner]  # (a_rows.size, block)
        return dot(a, b_ref[inner, :].astype(a.dtype), precision)  # @ (block, b cols)

    init = jnp.zeros((a_rows.size, b_ref.shape[1]), states.acc_dtype(a_ref.dtype))
    return sum_over_tiles(depth // block, tile, init)


def row_dot_tiled(a_ref, a_rows, vec_ref, depth: int, block: int) -> jax.Array:
    """Σ over depth tiles of a_ref[a_rows, d] · vec_ref[d] (elementwise, in the accumulator dtype)."""
    dtype = states.acc_dtype(a_ref.dtype)

    def tile(t):
        inner = pl.ds(tile_start(t, block), block)
        return jnp.sum(a_ref[a_rows, inner].astype(dtype) * vec_ref[inner].astype(dtype)[None, :], axis=1)  # (rows,)

    return sum_over_tiles(depth // block, tile, jnp.zeros((a_rows.size,), dtype))


def states_to_kernel_layout(mat_all: jax.Array, dhqk: int, padded_sizes: tuple[int, ...]) -> jax.Array:
    """(B, NH, (NC+1)*DHQK[, DHHV]) -> (B*NH, NC+1, DHQK_p[, DHHV_p]), zero-padded head dims."""
    batch, heads = mat_all.shape[:2]
    x = mat_all.reshape(batch * heads, mat_all.shape[2] // dhqk, dhqk, *mat_all.shape[3:])
    for axis, size in enumerate(padded_sizes, start=2):
        x = pad_axis(x, axis, size)
    return x


def intra_chunk_decay(vec_b_q, vec_m_q, vec_r_q, q_start, vec_b_kv, vec_i_kv, kv_start, *, keys_on_rows: bool = False):
    """exp(D̃_tj − m_t) = exp(b_t − b_j + ĩ_j − m_t) for vecR_t <= key j <= query t, else 0, on one pair of tiles.

    Gates (bLQ,) / (bLKV,) of the tiles starting at in-chunk positions q_start / kv_start; vec_r_q (bLQ,)
    is the position of each query's last hard reset in the chunk (−1: none). Shape (bLQ, bLKV), or
    (bLKV, bLQ) with keys_on_rows (the transposed tiles of dK / dV).
    """
    q_axis, kv_axis = (1, 0) if keys_on_rows else (0, 1)
    q_col = lambda x: jnp.expand_dims(x, kv_axis)  # query gates along the query axis
    kv_col = lambda x: jnp.expand_dims(x, q_axis)
    log_decay = q_col(vec_b_q) - kv_col(vec_b_kv) + kv_col(vec_i_kv) - q_col(vec_m_q)
    shape = log_decay.shape
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
    valid = (kv_pos <= q_pos) & (kv_pos >= q_col(vec_r_q))
    return jnp.exp(jnp.where(valid, log_decay, -jnp.inf))


def inter_chunk_decay(vec_b_q, vec_r_q, m_prev, vec_m_q):
    """exp(b_t + m_{k-1} − m_t) for queries the chunk's start state reaches (no reset before them), else 0: (bLQ,)."""
    return jnp.where(vec_r_q < 0, jnp.exp(vec_b_q + m_prev - vec_m_q), 0.0)
