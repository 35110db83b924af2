"""The recurrent forward kernel in Pallas Mosaic GPU (Hopper): the C and n states at every chunk boundary.

Same arrays, outputs and math as pallas_mlstm.pallas_triton.recurrent_fw (its jnp twin: xla_kernels.recurrent_fw_C):

    C_k = d_k C_{k-1} + (K_k ⊙ e^{a − m_k})ᵀ V_k,   n_k = d_k n_{k-1} + Σ_j K_kj e^{a_j − m_k}
    d_k = e^{g_k + m_{k-1} − m_k}

m_k, one number per chunk, and the two gate factors are computed by XLA before the launch (m by an associative scan,
`gates.chunk_max_states`: a scan over the chunks, one XLA step each, took 23-38% of the launcher's time on an
H100, results/h100-ab-states-launcher.json); the kernel carries C and n in registers from chunk to chunk. One
program per (batch·head, DHQK tile x DHHV tile):
compute warpgroups of 64 DHQK rows each (`kernel_tiles` picks how many), and a memory warpgroup that streams the
sequence with TMA, T time steps per ring slot (`kernel_tiles`: 128 where the chunk holds two such, else 64): each
warpgroup's 64 columns of K, the DHHV tile of V and the steps' weights, `stages` slots ahead of the compute. At a
chunk's first step C and n are scaled by d_k (a scalar read from global memory). Per step a compute warpgroup
scales its K slice's rows by e^{a − m_k} in shared memory (64 steps at a time) (rounded to the operand dtype, as the
Triton kernel rounds them before its dot), adds them to n's (64, 64) tile (n is its column sums, taken at a
chunk's end), then takes C += (K ⊙ w)ᵀ V with wgmma (K's slice read transposed). At a
chunk's last step it stores C_k in the states dtype and n_k with TMA. n's column sums reduce across the warps of a
warpgroup through the one scratch buffer Mosaic GPU gives a program, so two compute warpgroups take turns there (the
`turn` barriers): reducing at once, they raced on an H100 (a wrong n, which the interpreter, having no such buffer,
cannot show). Per program, in shared memory:

    K      (stages, warpgroups, P, T, 64)   each warpgroup's 64 columns of T time steps
    V      (stages, P, T, bDHHV)            the same time steps' DHHV tile
    gates  (stages, T) float32              e^{a − m_k} of the steps (the chunk's decay d_k: a scalar read from global
                                            memory at its first step)
    out    (warpgroups, buffers, 64, E)     staging of C_k (E = 128 bytes of the states dtype): bDHHV/E buffers, one a
                                            TMA copy, where they fit beside the ring (a chunk's copies never wait for
                                            one another), else 1; and (warpgroups, 64) of n_k

Float32 inputs run as bf16 operand parts (`common.split_operand`), as in the parallel kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import chunk_max_states, chunkwise_log_gates, tracks_max_state
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common
from pallas_mlstm.mosaic_gpu.common import ROWS
from pallas_mlstm.pallas_triton.launch_defaults import DEFAULT_CORE_COUNT
from pallas_mlstm.states import acc_dtype, join_states

NAME = "mlstm_chunkwise__recurrent_fw_C"
_BLOCK_V = (128, 64)  # DHHV tiles, widest first: C (64 x 128) float32 is 64 registers a thread
# Time steps per ring buffer, most first: each buffer is one wgmma over its steps and one wait for it, so fewer,
# longer steps wait less often. 128 only where a states chunk (chunk_size x save_states_every_nth_chunk) holds two
# or more of them, and never at the cost of a narrower DHHV tile: on an H100, 128 against 64 took 0.95x (forward)
# and 0.97x (backward) of the time at 7b (chunk 256), 0.96-1.01x at chunk 128 (1.01x at tfla-paper), where one
# buffer is the whole chunk (results/h100-ab-states-variants.json)
_STEP_ROWS = (128, ROWS)
# Registers per thread of the compute and memory warpgroups: 128 x (216 + 40) leaves room for a second program of
# one compute warpgroup on an SM (65,536 registers)
_COMPUTE_REGISTERS, _MEMORY_REGISTERS = 216, 40
# Two compute warpgroups (128 DHQK rows per program, each V or dH tile read half as often) where DHQK_p is a
# multiple of 128: on an H200 the forward ran the 7b shape in 0.92x of Triton's time and the backward in 0.75x, where
# one warpgroup ran them in 1.01x and 1.15x (results/h200-mosaic-check-states.json, results/h200-mosaic-check.json).
_TWO_WARPGROUPS_ROWS = 2 * ROWS


@dataclasses.dataclass(frozen=True)
class RecurrentTiles:
    """A launch: compute warpgroups (64 DHQK rows each), the DHHV tile, buffers in flight, time steps per buffer,
    and staging buffers of a state (`common.store_staged`: one per TMA copy, or one)."""

    warpgroups: int
    block_v: int
    stages: int
    step_rows: int
    staging_buffers: int


def shared_bytes(tiles: RecurrentTiles, parts: int, c_itemsize: int) -> int:
    """Shared memory of one program: the ring (K slices, V tile, gate row per slot) and the staging of C (128
    bytes of a row per buffer) and n, and of the last C in float32 (one buffer) where the states are narrower."""
    w, t = tiles.warpgroups, tiles.step_rows
    slot = parts * t * (w * ROWS + tiles.block_v) * 2 + t * 4
    staging = w * ROWS * (tiles.staging_buffers * 128 + 4) + (w * ROWS * 128 if c_itemsize != 4 else 0)
    return tiles.stages * slot + staging + common.RESERVED_BYTES


def compute_warpgroups(dhqk: int) -> int:
    """Both states kernels' compute warpgroups for padded DHQK `dhqk`: two where it is a multiple of 128."""
    return 2 if dhqk % _TWO_WARPGROUPS_ROWS == 0 else 1


def kernel_tiles(
    dhqk: int, dhhv: int, parts: tuple[int, ...], c_itemsize: int, warpgroups: int, chunk: int
) -> tuple[int, RecurrentTiles]:
    """(operand parts, tiles) for padded head dims, `warpgroups` compute warpgroups and chunks of `chunk` time steps:
    the widest DHHV tile of _BLOCK_V, then the most time steps per buffer (_STEP_ROWS) that split the chunk into
    two or more buffers (64 where none does), and the most buffers (up to 4, at least 2) that fit in half an SM's
    shared memory, so that two programs of one compute warpgroup share an SM; else (and for two, whose registers
    fill an SM) in all of it. Last, a staging buffer per TMA copy of a state where that fits beside those tiles,
    else one."""
    half, whole = common.SHARED_MEMORY_BYTES // 2, common.SHARED_MEMORY_BYTES
    for budget in (half, whole) if warpgroups == 1 else (whole,):
        for count in parts:
            for block_v in [bv for bv in _BLOCK_V if dhhv % bv == 0]:
                for step_rows in [t for t in _STEP_ROWS if t == ROWS or (chunk % t == 0 and chunk // t >= 2)]:
                    for stages in range(4, 1, -1):
                        for staging in (block_v * c_itemsize // 128, 1):
                            tiles = RecurrentTiles(warpgroups, block_v, stages, step_rows, staging)
                            if shared_bytes(tiles, count, c_itemsize) <= budget:
                                return count, tiles
    raise ValueError(f"no Mosaic GPU tiling of {NAME} fits in shared memory for DHQK={dhqk}, DHHV={dhhv}.")


def unsupported(chunk: int, dtype) -> str | None:
    """What this kernel does not run (a chunk, times save_states_every_nth_chunk, not a multiple of 64; float64),
    or None: any head dims (padded to multiples of 64)."""
    if chunk % ROWS:
        return f"the mosaic_gpu {NAME} takes chunk_size * save_states_every_nth_chunk in multiples of 64; got {chunk}."
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"the mosaic_gpu {NAME} takes bfloat16, float16 or float32 inputs; got {jnp.dtype(dtype)}."
    return None


def supports(call: KernelCall, matK, matV, *arrays) -> bool:
    """True for the calls this kernel runs and where it pays (it takes `recurrent_fw_C`'s arguments)."""
    return takes_and_fills_the_card(call, matK, matV.shape[-1])


def takes_and_fills_the_card(call: KernelCall, qk, dhhv: int) -> bool:
    """Both states kernels' rule, for inputs (B, NH, S, DHQK) `qk` and `dhhv`: `unsupported` names no problem and,
    compiled, the launch has a program for every SM of the card (DEFAULT_CORE_COUNT where JAX's device is not a
    GPU). Each program walks its tile of the state through every chunk in turn, so with fewer programs than SMs
    some SMs idle. On an H200 both kernels beat Triton's at 256 and 512 programs and lost at 64; at 96 the forward
    lost and the backward won (docs/performance.md): one rule for both, which gives up that one win. Interpreted
    (for tests) the kernel runs wherever it can."""
    chunk = call.chunk_size * call.save_states_every_nth_chunk
    if unsupported(chunk, qk.dtype) is not None:
        return False
    if call.interpret:
        return True
    dims = common.launch_dims(None, qk.shape, dhhv, chunk)
    *_, tiles = states_launch(call, qk.dtype, dims, compute_warpgroups(dims.dhqk_p))
    programs = math.prod(states_grid(dims, tiles))
    return programs >= (device_properties().core_count or DEFAULT_CORE_COUNT)


def _kernel(
    k_gmem,  # (P, BNH·S, DHQK_p)
    v_gmem,  # (P, BNH·S, DHHV_p)
    g_gmem,  # (BNH·steps, T) float32: per ring step e^{a − m_k} of its time steps
    decay_gmem,  # (BNH, NC) float32: d_k of each chunk
    *refs,  # c0 (BNH, DHQK_p, DHHV_p), n0 (BNH, 64, DHQK_p: n_0 in row 0) float32 where given; outputs; scratch
    tiles: RecurrentTiles,
    steps_per_chunk: int,
    num_chunks: int,
    has_initial: bool,
    writes_last: bool,
    interpret: bool,
):
    c0_gmem, n0_gmem = refs[:2] if has_initial else (None, None)
    refs = refs[2:] if has_initial else refs
    c_gmem, n_gmem = refs[:2]  # (BNH·(NC+1)·DHQK_p, DHHV_p) states dtype, (BNH·(NC+1), DHQK_p) float32
    last_gmem = refs[2] if writes_last else None  # (BNH·DHQK_p, DHHV_p) float32
    refs = refs[3:] if writes_last else refs[2:]
    w, block_v, stages, t = tiles.warpgroups, tiles.block_v, tiles.stages, tiles.step_rows
    turn_bar = refs[-1] if w > 1 else None  # with two compute warpgroups: whose turn at the reduction scratch
    refs = refs[:-1] if w > 1 else refs
    k_smem, v_smem, g_smem, c_stage, n_stage, *last_stage, k_bar, v_bar, g_bar, free_bar = refs
    parts = k_smem.shape[2]
    dhqk = n_gmem.shape[-1]
    pieces = block_v // c_stage.shape[-1]  # the TMA copies (copy groups) of a state's tile
    steps = num_chunks * steps_per_chunk
    seq_len = steps * t
    bh, iq, iv = lax.axis_index("bh"), lax.axis_index("q"), lax.axis_index("v")
    columns = pl.ds(iv * block_v, block_v)
    wg = lax.axis_index("wg")

    @pl.when(wg == w)
    def _memory():
        plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

        def load(s):  # ring step s: T time steps of K (each warpgroup's columns), of V, and their gate row
            slot = s % stages
            rows = pl.ds(bh * seq_len + s * t, t)
            plgpu.copy_gmem_to_smem(g_gmem.at[bh * steps + s], g_smem.at[slot], g_bar.at[slot])  # (T,)
            for u in range(w):
                k_cols = pl.ds((iq * w + u) * ROWS, ROWS)
                plgpu.copy_gmem_to_smem(
                    k_gmem.at[:, rows, k_cols], k_smem.at[slot, u], k_bar.at[slot * w + u]
                )  # (P, T, 64)
            plgpu.copy_gmem_to_smem(v_gmem.at[:, rows, columns], v_smem.at[slot], v_bar.at[slot])  # (P, T, bDHHV)

        common.stream_ring(load, free_bar, steps, stages)

    @pl.when(wg < w)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        dhqk_row0 = (iq * w + wg) * ROWS  # this warpgroup's first DHQK row

        def store_state(index, c, n_tile):  # state `index` (0: the initial one) of this program's tile
            state = bh * (num_chunks + 1) + index
            common.store_staged(c_gmem.at[pl.ds(state * dhqk + dhqk_row0, ROWS)], c_stage.at[wg], c, iv * block_v)

            @pl.when(iv == 0)  # every DHHV tile computes n; the first one stores it
            def _n():
                if w > 1:  # this warpgroup's turn at the reduction scratch: after the previous warpgroup's sums
                    pl.when((wg > 0) | (index > 0))(lambda: plgpu.barrier_wait(turn_bar.at[wg]))
                plgpu.wait_smem_to_gmem(pieces, wait_read_only=True)  # n_{index-1}'s copy, not C_index's, has read it
                n_stage[wg] = jnp.sum(n_tile, axis=0)  # (64,): n, the column sums
                plgpu.commit_smem()  # (a warpgroup barrier: every thread is past the reduction)
                if w > 1:
                    plgpu.barrier_arrive(turn_bar.at[(wg + 1) % w])
                plgpu.copy_smem_to_gmem(n_stage.at[wg], n_gmem.at[state, pl.ds(dhqk_row0, ROWS)])  # (64,)

        if has_initial:
            c = plgpu.load(
                c0_gmem.at[bh, pl.ds(dhqk_row0, ROWS), columns], layout=plgpu.Layout.WGMMA, optimized=False
            )  # (64, bDHHV)
            n_tile = plgpu.load(
                n0_gmem.at[bh, :, pl.ds(dhqk_row0, ROWS)], layout=plgpu.Layout.WGMMA, optimized=False
            )  # (64, 64): n_0 in row 0, zeros below
        else:
            c, n_tile = common.zeros(block_v), common.zeros(ROWS)
        store_state(0, c, n_tile)

        def step(s, carry):
            c, n_tile = carry  # n = the column sums of n_tile (64, 64)
            slot = s % stages
            k_slice = lambda p: k_smem.at[slot, wg, p]  # (T steps, 64 DHQK columns)
            decay = jnp.where(s % steps_per_chunk == 0, decay_gmem[bh, s // steps_per_chunk], 1.0)  # d_k at its start
            c, n_tile = c * decay, n_tile * decay
            plgpu.barrier_wait(g_bar.at[slot])
            plgpu.barrier_wait(k_bar.at[slot * w + wg])
            for h in range(t // ROWS):  # K ⊙ e^{a − m_k}, 64 time steps at a time
                steps_h = pl.ds(h * ROWS, ROWS)
                weights = plgpu.load(g_smem.at[slot, steps_h], layout=plgpu.Layout.WGMMA.reduce(1))  # (64,)
                k_rows = lambda p, steps_h=steps_h: k_slice(p).at[steps_h]  # (64 steps, 64 DHQK columns)
                n_tile = n_tile + common.weight_rows_in_place(k_rows, parts, weights)  # (64, 64)
            plgpu.barrier_wait(v_bar.at[slot])
            k_t = lambda p: k_slice(p).transpose((1, 0))  # (64 DHQK, T steps)
            c = common.mma(c, k_t, lambda p: v_smem.at[slot, p], parts, interpret)  # (64, T) @ (T, bDHHV)
            plgpu.barrier_arrive(free_bar.at[slot])
            last_step = s % steps_per_chunk == steps_per_chunk - 1
            pl.when(last_step)(lambda: store_state(s // steps_per_chunk + 1, c, n_tile))
            return c, n_tile

        c, _ = lax.fori_loop(0, steps, step, (c, n_tile))
        if w > 1:  # the last warpgroup's last turn, which no other waited for
            pl.when((iv == 0) & (wg == 0))(lambda: plgpu.barrier_wait(turn_bar.at[0]))
        if writes_last:  # the last state at full precision, when the states are stored narrower
            last_rows = last_gmem.at[pl.ds(bh * dhqk + dhqk_row0, ROWS)]
            common.store_staged(last_rows, last_stage[0].at[wg], c, iv * block_v)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the copies have read their staging: safe to exit


def _step_gates(call: KernelCall, vecF, vecI, scaM_initial, chunk: int, step_rows: int):
    """`ring_gates` of e^{a − m_k} and the chunks' decays d_k, and the m states (B, NH, NC+1)."""
    dtype = jnp.float32
    vecB, vecA = chunkwise_log_gates(vecI, vecF, chunk, call.input_gate)
    vecA, scaG = vecA.astype(dtype), vecB[..., -1].astype(dtype)  # (B, NH, NC, L), (B, NH, NC)
    m_initial = jnp.zeros(scaG.shape[:2], dtype) if scaM_initial is None else scaM_initial.astype(dtype)
    if tracks_max_state(call.input_gate):
        m_next = chunk_max_states(scaG, m_initial, vecA)  # (B, NH, NC)
    else:  # the sigmoid gate: m stays at its initial value
        m_next = jnp.broadcast_to(m_initial[..., None], scaG.shape)
    m_all = jnp.concatenate([m_initial[..., None], m_next], axis=-1)  # (B, NH, NC+1)
    weights = jnp.exp(vecA - m_next[..., None])  # (B, NH, NC, L)
    decay = jnp.exp(scaG + m_all[..., :-1] - m_next)  # (B, NH, NC)
    return ring_gates(weights, decay, step_rows), m_all


def scratch_types(
    tiles: RecurrentTiles, parts: int, operand_dtype, c_dtype, full_precision_copy: bool, turns: bool
) -> tuple:
    """The states kernels' shared memory and barriers (this module's docstring): per ring slot each warpgroup's
    (T, 64) slice of the first operand (K, or Q backwards), the second's (T, bDHHV) tile (V, or dH) and the gate
    rows (T = tiles.step_rows); the staging of a state (in `c_dtype`, a buffer per TMA copy, so that no copy
    waits for another), of a (64,) float32 vector per warpgroup, and, with `full_precision_copy`, of a float32
    state (one buffer: used once); with `turns` and two warpgroups, their turn barriers."""
    w, stages, t = tiles.warpgroups, tiles.stages, tiles.step_rows
    operand = lambda shape: plgpu.SMEM(shape, operand_dtype, transforms=common.swizzled(operand_dtype))

    def staging(dtype, buffers):  # (w, buffers, 64, E): E = 128 bytes of dtype
        return plgpu.SMEM((w, buffers, ROWS, 128 // dtype.itemsize), dtype, transforms=common.swizzled(dtype))

    c_dtype = jnp.dtype(c_dtype)
    return (
        operand((stages, w, parts, t, ROWS)),  # first operand's slices
        operand((stages, parts, t, tiles.block_v)),  # second operand's tiles
        plgpu.SMEM((stages, t), jnp.float32),  # gate row
        staging(c_dtype, tiles.staging_buffers),  # state staging
        plgpu.SMEM((w, ROWS), jnp.float32),  # vector staging
        *([staging(jnp.dtype(jnp.float32), 1)] if full_precision_copy else []),  # float32 state staging
        plgpu.Barrier(num_barriers=stages * w),  # slice loaded, per (slot, warpgroup)
        plgpu.Barrier(num_barriers=stages),  # tile loaded
        plgpu.Barrier(num_barriers=stages),  # gate row loaded
        plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # slot free again
        *([plgpu.Barrier(num_barriers=w)] if turns and w > 1 else []),  # a warpgroup's turn at the reduction scratch
    )


def states_launch(call: KernelCall, dtype, dims: common.LaunchDims, warpgroups: int) -> tuple:
    """What both states kernels derive from the call, the inputs' dtype and their compute `warpgroups`: (the
    states' dtype, the stored states' dtype (`call.states_dtype`, else the former), whether they are stored
    narrower (then the kernel also outputs a float32 copy of the state it ends on), the operand dtype, the operand
    parts, the tiles)."""
    state_dtype = acc_dtype(dtype)
    c_dtype = state_dtype if call.states_dtype is None else jnp.dtype(call.states_dtype)
    operand_dtype = common.operand_dtype(dtype)
    chunk = dims.seq_len // dims.num_chunks
    parts, tiles = kernel_tiles(
        dims.dhqk_p, dims.dhhv_p, common.operand_parts(dtype), c_dtype.itemsize, warpgroups, chunk
    )
    return state_dtype, c_dtype, c_dtype != state_dtype, operand_dtype, parts, tiles


def launch_states_kernel(body, name, dims, chunk, tiles, parts, scratch, out_type, call, flags):
    """A states kernel's launch (forwards or backwards in time): `body` with its tiles, steps per chunk, number of
    chunks, `call.interpret` and `flags` (dict of static flags) bound; a program per (batch·head, DHQK tile, DHHV
    tile); `scratch` its `scratch_types`."""
    kernel = functools.partial(
        body,
        tiles=tiles,
        steps_per_chunk=chunk // tiles.step_rows,
        num_chunks=dims.num_chunks,
        interpret=call.interpret,
        **flags,
    )
    return common.launch(
        kernel,
        name=name,
        compute_warpgroups=tiles.warpgroups,
        parts=parts,
        interpret=call.interpret,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=states_grid(dims, tiles),
        grid_names=("bh", "q", "v"),
    )


def states_grid(dims: common.LaunchDims, tiles: RecurrentTiles) -> tuple[int, int, int]:
    """A states kernel's programs: (batch·head, DHQK tile, DHHV tile)."""
    return dims.bnh, dims.dhqk_p // (tiles.warpgroups * ROWS), dims.dhhv_p // tiles.block_v


def ring_gates(weights, decay, step_rows: int) -> tuple[jax.Array, jax.Array]:
    """A states kernel's gate arrays, float32, the chunks in the order given: a weight per time step (B, NH, NC, L)
    as the rows of ring steps of `step_rows` time steps, (B·NH·NC·L/T, T), and each chunk's decay (B, NH, NC) as
    (B·NH, NC), which the kernel applies at each chunk's first step (one float a time step in all, as Triton's
    kernel reads)."""
    weights = weights.astype(jnp.float32)
    return weights.reshape(-1, step_rows), decay.astype(jnp.float32).reshape(-1, decay.shape[-1])


def recurrent_fw_C(call: KernelCall, matK, matV, vecF, vecI, matC_initial, vecN_initial, scaMinter_initial):
    """The launcher of `mlstm_chunkwise__recurrent_fw_C` in Mosaic GPU (same arrays and outputs as the Triton
    launcher). Trusts `call` (chunk_size, save_states_every_nth_chunk, states_dtype, input_gate, interpret);
    ValueError for what `unsupported` names."""
    chunk = call.chunk_size * call.save_states_every_nth_chunk
    dims = common.launch_dims(unsupported(chunk, matK.dtype), matK.shape, matV.shape[-1], chunk)
    batch, heads, _, dhqk, dhhv, num_chunks, bnh, dhqk_p, dhhv_p = dims
    warpgroups = compute_warpgroups(dims.dhqk_p)
    state_dtype, c_dtype, writes_last, operand_dtype, parts, tiles = states_launch(call, matK.dtype, dims, warpgroups)

    gates, m_all = _step_gates(call, vecF, vecI, scaMinter_initial, chunk, tiles.step_rows)
    operand_of = lambda x, size: common.sequence_operand(x, size, parts, operand_dtype)  # (P, BNH·S, size)
    inputs = [operand_of(matK, dhqk_p), operand_of(matV, dhhv_p), *gates]
    has_initial = matC_initial is not None
    if has_initial:
        n0 = jnp.zeros((bnh, dhqk), state_dtype) if vecN_initial is None else vecN_initial.reshape(bnh, dhqk)
        n0_rows = jnp.zeros((bnh, ROWS, dhqk_p), jnp.float32).at[:, 0, :dhqk].set(n0.astype(jnp.float32))
        inputs += [common.one_state(matC_initial, dims), n0_rows]

    out_type = [
        jax.ShapeDtypeStruct((bnh * (num_chunks + 1) * dhqk_p, dhhv_p), c_dtype),
        jax.ShapeDtypeStruct((bnh * (num_chunks + 1), dhqk_p), jnp.float32),
    ]
    if writes_last:
        out_type.append(jax.ShapeDtypeStruct((bnh * dhqk_p, dhhv_p), jnp.float32))
    flags = dict(has_initial=has_initial, writes_last=writes_last)
    scratch = scratch_types(tiles, parts, operand_dtype, c_dtype, full_precision_copy=writes_last, turns=True)
    outs = launch_states_kernel(_kernel, NAME, dims, chunk, tiles, parts, scratch, out_type, call, flags)(*inputs)
    c_all = outs[0].reshape(bnh, num_chunks + 1, dhqk_p, dhhv_p)[:, :, :dhqk, :dhhv]
    n_all = outs[1].reshape(bnh, num_chunks + 1, dhqk_p)[:, :, :dhqk]
    states = (
        join_states(c_all.reshape(batch, heads, num_chunks + 1, dhqk, dhhv)),
        join_states(n_all.reshape(batch, heads, num_chunks + 1, dhqk).astype(state_dtype)),
        m_all.astype(state_dtype),
    )
    if not writes_last:
        return states
    return (*states, outs[2].reshape(bnh, dhqk_p, dhhv_p)[:, :dhqk, :dhhv].reshape(batch, heads, dhqk, dhhv))
