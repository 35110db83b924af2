"""What the Mosaic GPU kernels share: the tile geometry (64-row wgmma tiles, shared-memory budget, warpgroups and
buffers), float32 inputs as bf16 operand parts, the wgmma products (a `jnp.dot` each when interpreted), and the
helpers for the wgmma register layout.

Each kernel has one program per (batch·head, chunk, row tile x column tile), FlashAttention-3 style: `warpgroups`
compute warpgroups of 64 rows each (the rows they own, loaded once) and one memory warpgroup that streams the
other operand's 64-row tiles into two rings of `stages` buffers with TMA. The first ring holds the tiles whose
scores the rows take, the second first the 64-row slices of a state, then the tiles the scores multiply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.pallas_triton.common import pad_axis, states_to_kernel_layout

ROWS = 64  # rows of a compute warpgroup (wgmma's M), rows of a ring step, head-dim granule
CHUNK_SIZES = (64, 128, 256)
MAX_HEAD_DIM = 256  # a TMA box side, and the accumulator's registers (64 x 256 float32 per warpgroup)
SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper
# The last resets travel as int16 (a step index in the chunk or −1: chunks of at most 256 steps). H's launcher makes
# them so; XLA computes them with the other gate arrays, before the states kernel, so they are live at the forward's
# peak of memory, where int16 takes half of int32's bytes. The backward's launchers convert the int32 ones.
RESETS_DTYPE = jnp.int16
RESERVED_BYTES = 4096  # barriers, cross-warp reduction scratch, alignment
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40  # per thread, as FlashAttention-3 splits them
# bf16 parts of float32 operands, the first that fits: 3 carry float32's 24 bits; 2 (16 bits, about 1e-5 relative
# per product) where 3 do not fit in shared memory (DHQK 256).
FLOAT32_PARTS = (3, 2)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A launch: compute warpgroups (64 rows each), output columns per program, buffers in flight per ring."""

    warpgroups: int
    block_v: int
    stages: int


def swizzled(dtype) -> tuple:
    """Tiling and 128-byte swizzle of a shared-memory tile whose rows are multiples of 128 bytes."""
    columns = 128 // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, columns)), plgpu.SwizzleTransform(128)


def shared_bytes(tiles: Tiles, chunk: int, dhqk: int, parts: int, gate_rows: int) -> int:
    """Shared memory of one program, 16-bit operands: the owned rows (warpgroups, P, 64, DHQK), the two rings
    (stages, P, 64, DHQK) and (stages, P, 64, block_v), `gate_rows` float32 rows of the chunk, its last resets
    (`resets_shared_bytes`), a (DHQK,) float32 vector and the output staging (warpgroups, 64, 128 bytes + a float32)."""
    w, bv = tiles.warpgroups, tiles.block_v
    owned = w * parts * ROWS * dhqk * 2
    rings = tiles.stages * parts * ROWS * (dhqk + bv) * 2
    small = gate_rows * chunk * 4 + resets_shared_bytes(chunk) + dhqk * 4 + w * ROWS * (128 + 4)
    return owned + rings + small + RESERVED_BYTES


def kernel_tiles(name: str, chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...], gate_rows: int):
    """(operand parts, Tiles) for padded head dims: the first of `parts` that fits, two warpgroups, the widest
    column tile (at most 256) and the most buffers (up to 4) that fit in shared memory, preferring at least two
    buffers (`gate_rows`: the kernel's float32 gate rows, beside its last resets); ValueError naming kernel `name`
    if nothing fits."""
    widths = [bv for bv in range(min(dhhv, MAX_HEAD_DIM), 0, -ROWS) if dhhv % bv == 0]
    for count in parts:
        for min_stages in (2, 1):
            for warpgroups in (2, 1):
                if warpgroups * ROWS > chunk:
                    continue
                for block_v in widths:
                    for stages in range(4, min_stages - 1, -1):
                        tiles = Tiles(warpgroups, block_v, stages)
                        if shared_bytes(tiles, chunk, dhqk, count, gate_rows) <= SHARED_MEMORY_BYTES:
                            return count, tiles
    raise ValueError(f"no Mosaic GPU tiling of {name} fits in shared memory for DHQK={dhqk}, DHHV={dhhv}.")


def padded_dim(size: int) -> int:
    """A head dim as the kernels run it: the next multiple of 64."""
    return -(-size // ROWS) * ROWS


def unsupported(name: str, chunk: int, dhqk: int, dtype) -> str | None:
    """What kernel `name` does not run of the shape (chunks other than 64/128/256, DHQK > 256, float64), or None."""
    if chunk not in CHUNK_SIZES:
        return f"the mosaic_gpu {name} takes chunk_size in {CHUNK_SIZES}; got {chunk}."
    if padded_dim(dhqk) > MAX_HEAD_DIM:
        return f"the mosaic_gpu {name} takes DHQK <= {MAX_HEAD_DIM}; got {dhqk}."
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"the mosaic_gpu {name} takes bfloat16, float16 or float32 inputs; got {jnp.dtype(dtype)}."
    return None


def operand_dtype(dtype):
    """The wgmma operand dtype of inputs of `dtype`: their own if 16-bit, else bf16 (in parts)."""
    return dtype if jnp.dtype(dtype).itemsize == 2 else jnp.bfloat16


def operand_parts(dtype) -> tuple[int, ...]:
    """The part counts `kernel_tiles` may choose for inputs of `dtype`."""
    return (1,) if jnp.dtype(dtype).itemsize == 2 else FLOAT32_PARTS


def split_parts(x: jax.Array, parts: int, dtype) -> list[jax.Array]:
    """x as `parts` wgmma operands of `dtype` that sum to it, inside the kernel (the gated scores): [x] for 16-bit
    inputs; for float32 inputs bf16 parts, each the rounding of what the previous ones leave (3 parts: 24 bits of
    mantissa, float32's own). Mosaic GPU keeps every rounding; the inputs are split by XLA (`split_operand`)."""
    if parts == 1:
        return [x.astype(dtype)]
    rest, split = x.astype(jnp.float32), []
    for _ in range(parts):
        split.append(rest.astype(dtype))
        rest = rest - split[-1].astype(jnp.float32)
    return split


def split_operand(x: jax.Array, parts: int, dtype) -> jax.Array:
    """An input array as the kernel's stacked operand parts, (P, ...) of `dtype`, computed by XLA before the launch.

    Each part but the last keeps the leading 16 bits of what the previous ones leave (the bf16 bits, by a mask),
    and the last is rounded: the parts sum to x exactly. A mask, not a rounding, because XLA on the GPU treats a
    float32 -> bf16 -> float32 round trip as excess precision it may drop, which leaves every later part zero
    (bf16 accuracy, seen on an H100); a masked value is exact in bf16, so the cast it gets has nothing to drop."""
    if parts == 1:
        return x.astype(dtype)[None]
    rest, split = x.astype(jnp.float32), []
    for _ in range(parts - 1):
        bits = lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        leading = lax.bitcast_convert_type(bits, jnp.float32)
        split.append(leading.astype(dtype))
        rest = rest - leading
    return jnp.stack([*split, rest.astype(dtype)])


def read_tile(x):
    """A tile's value: a ref read whole, an array as it is."""
    return x if isinstance(x, jax.Array) else x[...]


def part_products(parts: int) -> list[tuple[int, int]]:
    """The part products (i, j) that carry float32's precision: i + j < parts (one for 16-bit inputs)."""
    return [(i, j) for i in range(parts) for j in range(parts) if i + j < parts]


def mma(acc: jax.Array, a, b, parts: int, interpret: bool, while_running=None) -> jax.Array:
    """acc + A @ B accumulated in float32, A and B given by their parts (`split_parts`): Σ a(i) @ b(j) over the
    products of order i + j < parts (all of float32's 24 bits: 6 bf16 products for 3 parts; one for 16-bit inputs).

    a(i): part i of A (M, K), a ref in shared memory or a register array; b(j): part j of B (K, N), a ref in shared
    memory. On the GPU each product is a `plgpu.wgmma` into acc, awaited before returning (the refs are indexed
    inside the accumulator's scope, where static indices stay static); interpreted (wgmma has no CPU rule for
    register operands) each is a `jnp.dot`. `while_running()`, if given, runs after the products are issued and
    before they are awaited (barrier waits that overlap the tensor cores' work).
    """
    pairs = part_products(parts)
    after_issue = while_running or (lambda: None)
    if interpret:
        for i, j in pairs:
            acc = acc + jnp.dot(read_tile(a(i)), read_tile(b(j)), preferred_element_type=jnp.float32)  # (M, N)
        after_issue()
        return acc

    def issue(acc_ref):
        for i, j in pairs:
            plgpu.wgmma(acc_ref, a(i), b(j))  # (M, N) += (M, K) @ (K, N)
        after_issue()

    return pl.run_state(issue)(plgpu.ACC.init(acc))


def row_vector(x):
    """A (64,) vector along the rows of a wgmma tile, broadcast over (64, N) by the caller."""
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def zeros(columns: int) -> jax.Array:
    """A (64, columns) float32 accumulator of zeros in the wgmma layout."""
    return plgpu.layout_cast(jnp.zeros((ROWS, columns), jnp.float32), plgpu.Layout.WGMMA)


def by_rows(x: jax.Array, shape) -> jax.Array:
    """A (64,) per-row vector broadcast over the columns of `shape`."""
    return lax.broadcast_in_dim(x, shape, [0])


def by_columns(x: jax.Array, shape) -> jax.Array:
    """A (N,) per-column vector broadcast over the rows of `shape`."""
    return lax.broadcast_in_dim(x, shape, [1])


def state_products(q_cols, c_rows, steps: int, block_v: int, parts: int, interpret: bool, ready, free, stages: int):
    """Σ_e Q[:, e] @ C_{k-1}[e, :] over the `steps` 64-wide slices, (64, bDHHV) float32: slice e awaited on
    `ready` and its buffer released on `free` (slot e % stages). With two or more buffers a slice's products are
    issued before the previous slice's are awaited and released, so the tensor cores keep working while buffers
    change hands; with one buffer (float32 inputs at large DHQK) each slice is released before the next is awaited,
    as the next one loads into the same buffer. Interpreted, the products are `jnp.dot`s (`mma`) in the same order
    of barrier waits and releases."""
    pipelined = stages >= 2
    products = part_products(parts)

    def slices(multiply, wait_previous, wait_all):
        for e in range(steps):
            plgpu.barrier_wait(ready.at[e % stages])
            multiply(e)
            if not pipelined:
                wait_all()
                plgpu.barrier_arrive(free.at[e % stages])
            elif e > 0:
                wait_previous()  # the previous slice's products are done
                plgpu.barrier_arrive(free.at[(e - 1) % stages])
        if pipelined:
            wait_all()
            plgpu.barrier_arrive(free.at[(steps - 1) % stages])

    if interpret:
        acc = [zeros(block_v)]

        def multiply(e):
            acc[0] = mma(acc[0], q_cols(e), c_rows(e), parts, interpret)  # (64, 64) @ (64, bDHHV)

        slices(multiply, lambda: None, lambda: None)
        return acc[0]

    def issue(acc_ref):
        def multiply(e):
            for i, j in products:
                plgpu.wgmma(acc_ref, q_cols(e)(i), c_rows(e)(j))  # (64, 64) @ (64, bDHHV)

        slices(multiply, lambda: plgpu.wgmma_wait(len(products)), lambda: plgpu.wgmma_wait(0))

    return pl.run_state(issue)(plgpu.ACC.init(zeros(block_v)))


def stream_rings(load_scored, load_product, scored_steps, product_steps, state_steps: int, stages: int, free_bars):
    """The memory warpgroup's loop over its two rings of `stages` buffers (slot = step % stages).

    The scored ring holds `scored_steps` tiles whose scores the owned rows take; the product ring first the
    `state_steps` 64-row slices of a state, then the `scored_steps` tiles the scores multiply (product_steps in
    all). `load_scored(j)` / `load_product(t)` start step j / t's TMA copy into its slot; `free_bars` = (scored,
    product) are the barriers on which the compute warpgroups release a slot. The first `stages` steps of each ring
    load at once; then each step refills the slot its predecessor `stages` back frees. A scored slot frees as soon
    as its scores are computed, before the step's product tile, so the next scored tile loads while the product
    runs. Last, the releases no refill waited for are awaited (`await_last_releases`)."""
    scored_free, product_free = free_bars
    for j in range(stages):
        pl.when(j < scored_steps)(functools.partial(load_scored, j))
    for t in range(stages):
        pl.when(t < product_steps)(functools.partial(load_product, t))

    @pl.loop(0, product_steps - stages)
    def _refill(t):
        j = t - state_steps  # the scored step paired with product step t

        @pl.when((j >= 0) & (j + stages < scored_steps))
        def _next_scored():
            plgpu.barrier_wait(scored_free.at[j % stages])
            load_scored(j + stages)

        plgpu.barrier_wait(product_free.at[t % stages])
        load_product(t + stages)

    await_last_releases(scored_free, scored_steps, stages)
    await_last_releases(product_free, product_steps, stages)


def await_last_releases(free, steps, stages: int):
    """Awaits the releases of a ring's last `stages` steps (on `free`, slot = step % stages), which no refill
    waited for: the interpreter checks that each release is awaited."""

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _drain(s):
        plgpu.barrier_wait(free.at[s % stages])


def stream_ring(load, free, steps: int, stages: int):
    """The memory warpgroup's loop over one ring of `stages` buffers (slot = step % stages) for `steps` steps:
    `load(s)` starts step s's TMA copies; the first `stages` load at once, then each step refills the slot its
    predecessor `stages` back frees (`free`), and last the releases no refill waited for are awaited."""
    for s in range(min(stages, steps)):
        load(s)

    @pl.loop(0, steps - stages)
    def _refill(s):
        plgpu.barrier_wait(free.at[s % stages])
        load(s + stages)

    await_last_releases(free, steps, stages)


def weight_rows_in_place(slice_part, parts: int, weights: jax.Array) -> jax.Array:
    """Scales the rows of a (64, 64) operand slice in shared memory, given by its parts (`slice_part(p)`), by
    `weights` (64,): the parts summed in float32, scaled, split again into the same parts (`split_parts`), stored
    back and made visible to wgmma. Returns the scaled slice, (64, 64) float32."""
    x = functools.reduce(
        jnp.add, [plgpu.load(slice_part(p), layout=plgpu.Layout.WGMMA).astype(jnp.float32) for p in range(parts)]
    )  # (64, 64)
    x = x * by_rows(weights, x.shape)
    for p, part in enumerate(split_parts(x, parts, slice_part(0).dtype)):
        slice_part(p)[...] = part
    plgpu.commit_smem()
    return x


def store_staged(out, stage, tile: jax.Array, column0):
    """Stores `tile` (64, N) float32 into `out` (64 rows of an output, from column `column0`) in its dtype, through
    the staging buffers `stage` (buffers, 64, E), E = 128 bytes of it: piece t of the N/E through buffer t % buffers,
    one TMA copy (and copy group) each. With a buffer for every piece, no piece waits for another's copy: the only
    wait is the first, for this thread's earlier copies to have read their staging (a previous call's, long done
    when calls are a chunk apart); with fewer, a piece waits for the copy that last read its buffer."""
    buffers, columns = stage.shape[0], stage.shape[-1]
    pieces = tile.shape[1] // columns
    for first in range(0, pieces, buffers):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the earlier copies have left the staging
        for t in range(first, min(first + buffers, pieces)):
            stage[t % buffers] = tile[:, t * columns : (t + 1) * columns].astype(stage.dtype)  # (64, E)
        plgpu.commit_smem()
        for t in range(first, min(first + buffers, pieces)):  # (64, E) each, to out's columns column0 + t·E on
            plgpu.copy_smem_to_gmem(stage.at[t % buffers], out.at[:, pl.ds(column0 + t * columns, columns)])


class LaunchDims(NamedTuple):
    """A launcher's sizes: the inputs' (B, NH, S, DHQK) and DHHV, the chunks it steps by, B·NH, the padded dims."""

    batch: int
    heads: int
    seq_len: int
    dhqk: int
    dhhv: int
    num_chunks: int
    bnh: int
    dhqk_p: int
    dhhv_p: int


def launch_dims(problem: str | None, qk_shape: tuple, dhhv: int, chunk: int) -> LaunchDims:
    """The sizes of a launch on inputs of (B, NH, S, DHQK) `qk_shape` and `dhhv` at `chunk`; ValueError(problem)
    where the kernel's own check named one."""
    if problem is not None:
        raise ValueError(problem)
    batch, heads, seq_len, dhqk = qk_shape
    return LaunchDims(
        batch, heads, seq_len, dhqk, dhhv, seq_len // chunk, batch * heads, padded_dim(dhqk), padded_dim(dhhv)
    )


def sequence_rows(x: jax.Array, size: int) -> jax.Array:
    """A (B, NH, S, D) input as (B·NH·S, size) rows, D zero-padded to `size`."""
    return pad_axis(x.reshape(-1, x.shape[-1]), 1, size)


def states_rows(mat_all: jax.Array, dims: LaunchDims) -> jax.Array:
    """(B, NH, (NC+1)·DHQK, DHHV) chunk states as (B·NH·(NC+1)·DHQK_p, DHHV_p) rows, zero-padded: state k of head
    bh at rows (bh·(NC+1) + k)·DHQK_p."""
    layout = states_to_kernel_layout(mat_all, dims.dhqk, (dims.dhqk_p, dims.dhhv_p))
    return layout.reshape(-1, dims.dhhv_p)


def one_state(mat: jax.Array, dims: LaunchDims) -> jax.Array:
    """A (B, NH, DHQK, DHHV) state as (B·NH, DHQK_p, DHHV_p) float32, zero-padded."""
    x = mat.reshape(dims.bnh, dims.dhqk, dims.dhhv).astype(jnp.float32)
    return pad_axis(pad_axis(x, 1, dims.dhqk_p), 2, dims.dhhv_p)


def chunk_rows(x: jax.Array, dims: LaunchDims) -> jax.Array:
    """A per-step float gate, (B, NH, S) or (B, NH, NC, L), as the kernels' (B·NH, NC, L) float32 rows. A reshape,
    not a copy, for a float32 gate: the kernels take the float gate arrays the Triton launchers take and nothing
    made from them, so they need no more memory."""
    return x.reshape(dims.bnh, dims.num_chunks, -1).astype(jnp.float32)


RESETS = -1  # the gate index of the last-reset row in `gate_readers`


def resets_shared_bytes(chunk: int) -> int:
    """Shared memory of a chunk's last resets."""
    return chunk * jnp.dtype(RESETS_DTYPE).itemsize


def reset_rows(vecR: jax.Array, dims: LaunchDims) -> jax.Array:
    """The last resets, (B, NH, NC, L) integers (−1: none in the chunk so far), as the kernels' (B·NH, NC, L)
    RESETS_DTYPE rows."""
    return vecR.reshape(dims.bnh, dims.num_chunks, -1).astype(RESETS_DTYPE)


class GateArrays(NamedTuple):
    """A parallel kernel's gate inputs, one operand (a pytree: the kernel gets them as refs alike): float32 rows
    (B·NH, NC, L) each (`chunk_rows`), the last resets (B·NH, NC, L) (`reset_rows`), the states' m (B·NH, NC+1)
    float32."""

    rows: tuple
    resets: jax.Array
    m_states: jax.Array


def load_gate_rows(gates_gmem: GateArrays, rows_smem, resets_smem, bars, bh, c):
    """The memory warpgroup's copies of chunk c of head bh's gate rows, one TMA copy each: float32 row g into
    rows_smem[g] (barrier g), the last resets into resets_smem (the last barrier)."""
    for g, row in enumerate(gates_gmem.rows):
        plgpu.copy_gmem_to_smem(row.at[bh, c], rows_smem.at[g], bars.at[g])  # (L,)
    plgpu.copy_gmem_to_smem(gates_gmem.resets.at[bh, c], resets_smem, bars.at[len(gates_gmem.rows)])  # (L,) resets


def await_gate_rows(bars, float_rows: int):
    """A compute warpgroup's wait for the copies of `load_gate_rows` (`float_rows` float32 rows and the resets)."""
    for g in range(float_rows + 1):
        plgpu.barrier_wait(bars.at[g])


def gate_readers(rows_smem, resets_smem):
    """(along_rows, along_columns): each read(g, start) gives the 64 steps from `start` of float32 gate row g, or
    of the last resets (as int32) for g = RESETS, as a (64,) vector in the wgmma layout that broadcasts along the rows
    (`by_rows`) or the columns (`by_columns`) of a (64, 64) tile."""

    def reader(dim):
        def read(g, start):
            layout = plgpu.Layout.WGMMA.reduce(dim)
            if g == RESETS:
                return plgpu.load(resets_smem.at[pl.ds(start, ROWS)], layout=layout).astype(jnp.int32)  # (64,)
            return plgpu.load(rows_smem.at[g, pl.ds(start, ROWS)], layout=layout)  # (64,)

        return read

    return reader(1), reader(0)


def start_state_decay(vec_b, vec_r, m_prev, vec_m):
    """e^{b_t + m_{k-1} − m_t}, the chunk's start state's decay to step t, or 0 after a reset in the chunk
    (vec_r >= 0): (64,) from the steps' gate vectors and m_{k-1}, a scalar."""
    return jnp.where(vec_r < 0, jnp.exp(vec_b + m_prev - vec_m), 0.0)


def sequence_operand(x: jax.Array, size: int, parts: int, dtype) -> jax.Array:
    """A (B, NH, S, D) input as the kernels' operand parts, (P, B·NH·S, size) of `dtype` (`split_operand`)."""
    return split_operand(sequence_rows(x, size), parts, dtype)


def chunk_kernel(body, call, head_dim: int, chunk: int, num_chunks: int, /, **static):
    """A parallel kernel's body with what the three launchers bind alike (the chunk, the number of chunks, the
    call's scale of the scores for the inputs' DHQK `head_dim`, eps and `interpret`) and its own `static` keyword
    arguments."""
    qk_scale, eps, interpret = call.scale_for(head_dim), call.eps, call.interpret
    return functools.partial(
        body, chunk=chunk, num_chunks=num_chunks, qk_scale=qk_scale, eps=eps, interpret=interpret, **static
    )


def launch(body, *, name: str, compute_warpgroups: int, parts: int, interpret: bool, **kernel_args):
    """`plgpu.kernel` of a kernel body (its static keyword arguments and `interpret` bound by the caller's
    functools.partial or here) with what every kernel of this package shares: `compute_warpgroups` warpgroups and
    the memory one, named "wg"; the fast approximate exp and division for 16-bit operands only (parts == 1: float32
    inputs keep IEEE ones); Mosaic GPU's interpreter where `interpret`. `kernel_args`: out_type, scratch_types,
    grid, grid_names."""
    return plgpu.kernel(
        body,
        num_threads=compute_warpgroups + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=parts == 1),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
        **kernel_args,
    )
