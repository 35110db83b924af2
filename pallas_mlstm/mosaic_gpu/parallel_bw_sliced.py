"""The backward's dK and dQ kernels in Pallas Mosaic GPU (Hopper): one pipeline, its score contraction over DHHV
streamed in slices.

Same arrays, outputs and math as pallas_mlstm.pallas_triton.parallel_bw_dK / _dQ (jnp twins:
xla_kernels.parallel_bw_dK / _dQ), each with the row dots Σ_d x·dX of its unrounded gradient:

    dK = (V dC_kᵀ) ⊙ e^{a − m_k} + Σ_{query tiles from the diagonal on} (V dHᵀ ⊙ e^{D̃ − m}ᵀ · s/(den + eps)) Q
    dQ = (dH C_{k-1}ᵀ) ⊙ e^{b + m_{k-1} − m} · s/(den + eps)
         + Σ_{key tiles up to the diagonal} (dH Vᵀ ⊙ e^{D̃ − m} · s/(den + eps)) K

The scores contract over DHHV (512 at the 7B widths), too wide for the H and dV kernels' pipeline of whole 64-row tiles.
One program per (batch·head, chunk, 64·W owned rows): W compute warpgroups (two where the chunk has at least 128 rows
and two buffers fit, else one), each owning 64 rows of V (dK: keys) or of dH (dQ: queries), loaded once slice by slice
(each slice awaited just before its first product), and a memory warpgroup that streams with TMA into one ring the (64,
bS) slices of first the state (dC_k for dK, C_{k-1} for dQ; 64 DHQK rows at a time, so that each 64-row block gives one
64-column block of the gradient with no transpose), then of each other tile's dH (dK) or V (dQ); into the other ring the
other tiles' Q (dK) or K (dQ) in column blocks of bT = 128 (64 where 128 does not divide DHQK). Both warpgroups take
every streamed buffer, so the state and the other tiles are read once for 128 owned rows; a warpgroup passes (awaits and
frees) the other tile on the other's diagonal that it has no part of. Each takes the inter-chunk term block by block,
scales its rows by the inter-chunk decay (times s/(den + eps) for dQ), then for each other tile sums the scores over the
slices, gates them and adds (gated scores) @ the tile's blocks. Per program, in shared memory:

    owned    (W, S, P, 64, bS)         the owned rows, S = DHHV / bS slices, loaded once
    slices   (stages, P, 64, bS)       a 64-row slice of the state, or an other tile's slice
    tiles    (stages, P, 64, bT)       a column block of an other tile's Q or K
    gates    (5, L) f32, (L,) int16    the chunk's gate rows (parallel_bw.GATE_ROWS) and last resets, loaded once
    out      (W, 64, E), (W, 64) f32   the staging of the gradient (E = 128 bytes of output dtype) and of the row dots

`parallel_bw_dK_dQ` runs both kernels in one launch, each dK program beside the dQ program of the same rows
(`_variants_kernel`), so that the second of the two finds the chunk's Q, K, V and dH in L2 rather than reading them
from DRAM again; the backward takes it where the backend runs both gradients and no head dim is padded
(`KernelSet.dK_and_dQ`, `supports_one_launch`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.mosaic_gpu import common, parallel_bw
from pallas_mlstm.mosaic_gpu.common import ROWS
from pallas_mlstm.mosaic_gpu.parallel_bw import A_ROW, B_ROW, DEN_ROW, GATE_ROWS, I_ROW, M_ROW, dh_scale, key_decay


@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes the two kernels: the owned rows are keys (dK: own V, stream dH and Q, the state dC_k)
    or queries (dQ: own dH, stream V and K, the state C_{k-1})."""

    name: str
    owns_keys: bool


DK = Variant("mlstm_chunkwise__parallel_bw_dK", owns_keys=True)
DQ = Variant("mlstm_chunkwise__parallel_bw_dQ", owns_keys=False)


def _slice_width(dhhv: int) -> int:
    """The DHHV slice of the score contraction: 128 where it divides DHHV, else 64."""
    return 128 if dhhv % 128 == 0 else ROWS


def tile_columns(dhqk: int) -> int:
    """The columns of one Q (dK) or K (dQ) block in the ring: 128 where they divide DHQK, else 64."""
    return 128 if dhqk % 128 == 0 else ROWS


@dataclasses.dataclass(frozen=True)
class SlicedTiles:
    """A launch: compute warpgroups (64 owned rows each), buffers per ring."""

    warpgroups: int
    stages: int


def shared_bytes(tiles: SlicedTiles, chunk: int, dhqk: int, dhhv: int, parts: int) -> int:
    """Shared memory of one program: the owned rows, the two rings, the gate rows and the staging."""
    w = tiles.warpgroups
    owned = w * parts * ROWS * dhhv * 2
    rings = tiles.stages * parts * ROWS * (_slice_width(dhhv) + tile_columns(dhqk)) * 2
    small = len(GATE_ROWS) * chunk * 4 + common.resets_shared_bytes(chunk) + w * ROWS * (128 + 4)
    return owned + rings + small + common.RESERVED_BYTES


def kernel_tiles(chunk: int, dhqk: int, dhhv: int, parts: tuple[int, ...]) -> tuple[int, SlicedTiles]:
    """(operand parts, SlicedTiles) for padded head dims: the first of `parts` (float32's precision first, as
    `common.kernel_tiles`), two warpgroups where the chunk has 128 rows or more and two buffers fit, else one, the most
    buffers (4 down to 1) that fit in shared memory; ValueError if none does."""
    for count in parts:
        for warpgroups, min_stages in ((2, 2), (1, 1)):
            if warpgroups * ROWS > chunk:
                continue
            for stages in range(4, min_stages - 1, -1):
                tiles = SlicedTiles(warpgroups, stages)
                if shared_bytes(tiles, chunk, dhqk, dhhv, count) <= common.SHARED_MEMORY_BYTES:
                    return count, tiles
    raise ValueError(f"no Mosaic GPU tiling of the dQ/dK kernels fits in shared memory for DHQK={dhqk}, DHHV={dhhv}.")


def unsupported(chunk: int, dhqk: int, dhhv: int, dtype) -> str | None:
    """What these kernels do not run (`common.unsupported`'s shapes, and shapes whose owned rows and one buffer per
    ring do not fit in shared memory, e.g. float32 inputs with DHHV above 512 at DHQK 256), or None."""
    problem = common.unsupported("parallel_bw_dQ/dK", chunk, dhqk, dtype)
    if problem is not None:
        return problem
    try:
        kernel_tiles(chunk, common.padded_dim(dhqk), common.padded_dim(dhhv), common.operand_parts(dtype))
    except ValueError as error:
        return str(error)
    return None


def supports(call: KernelCall, matQ, matK, matV, *arrays) -> bool:
    """True for the calls these kernels run (they take `parallel_bw_dK`'s arguments)."""
    return unsupported(call.chunk_size, matQ.shape[-1], matV.shape[-1], matQ.dtype) is None


def supports_one_launch(call: KernelCall, matQ, matK, matV, *arrays) -> bool:
    """True for the calls `parallel_bw_dK_dQ` takes: those of `supports` whose head dims need no zero padding. With
    padded head dims the one launch's forward + backward peak memory was 51 MB above two launches' (odd-heads, DHQK
    96 run as 128, on an H100: results/h100-ab-dk-dq-one-launch.json), and above Triton's; at the shapes without
    padding it was the same."""
    dims_unpadded = all(common.padded_dim(d) == d for d in (matQ.shape[-1], matV.shape[-1]))
    return dims_unpadded and supports(call, matQ, matK, matV)


def _kernel(
    own_gmem,  # (P, BNH·S, DHHV_p): V (dK) or dH (dQ)
    streamed_gmem,  # (P, BNH·S, DHHV_p): dH (dK) or V (dQ)
    tiles_gmem,  # (P, BNH·S, DHQK_p): Q (dK) or K (dQ)
    state_gmem,  # (P, BNH·(NC+1)·DHQK_p, DHHV_p): dC (dK) or C (dQ) of head bh, state k at rows (bh·(NC+1) + k)·DHQK_p
    gates_gmem,  # common.GateArrays: rows parallel_bw.GATE_ROWS, the last resets, the states' m
    x_gmem,  # (BNH·S, DHQK_p): K (dK) or Q (dQ) as given, for the row dots
    out_gmem,  # (BNH·S, DHQK_p) out: dK or dQ
    dots_gmem,  # (BNH, S) float32 out
    own_smem,
    sl_smem,
    t_smem,
    g_smem,
    r_smem,
    o_smem,
    dots_smem,
    own_bar,
    g_bar,
    sl_bar,
    t_bar,
    sl_free_bar,
    t_free_bar,
    *,
    variant: Variant,
    dhqk: int,
    stages: int,
    chunk: int,
    num_chunks: int,
    qk_scale: float,
    eps: float,
    interpret: bool,
    variant_count: int = 1,
):
    warpgroups, num_slices, parts, _, width = own_smem.shape
    tile_cols = t_smem.shape[-1]
    col_blocks = dhqk // tile_cols  # ring steps per other tile in the tiles ring
    state_steps = (dhqk // ROWS) * num_slices  # the state's slices: (64-row block, DHHV slice) pairs, first in the ring
    bh, c, ot = lax.axis_index("bh"), lax.axis_index("c"), lax.axis_index("ot")
    if variant_count > 1:  # `_variants_kernel`: program variant_count·ot + v runs variant v's program ot
        ot = ot // variant_count
    seq_row0 = (bh * num_chunks + c) * chunk  # row of the chunk's first step
    first_tile = ot * warpgroups  # the program's first 64-row tile in the chunk (warpgroup 0's owned rows)
    # the other tiles: queries from the first diagonal to the chunk's end (dK), keys from the chunk's start to the
    # last diagonal (dQ)
    first_other, other_steps = (
        (first_tile, chunk // ROWS - first_tile) if variant.owns_keys else (0, first_tile + warpgroups)
    )
    state_index = c + 1 if variant.owns_keys else c  # dC_k at the chunk's end, C_{k-1} at its start
    slice_steps = state_steps + other_steps * num_slices
    wg = lax.axis_index("wg")

    @pl.when(wg == warpgroups)
    def _memory():
        plgpu.set_max_registers(common.MEMORY_REGISTERS, action="decrease")

        def load_owned(u):  # slice u of every warpgroup's owned rows
            for w in range(warpgroups):
                rows, cols = pl.ds(seq_row0 + (first_tile + w) * ROWS, ROWS), pl.ds(u * width, width)
                tile = own_gmem.at[:, rows, cols]  # (P, 64, bS)
                plgpu.copy_gmem_to_smem(tile, own_smem.at[w, u], own_bar.at[w * num_slices + u])

        def load_slice(s):  # ring step s: a slice of the state, then of the other tiles
            slot = s % stages

            @pl.when(s < state_steps)
            def _state():
                block, u = s // num_slices, s % num_slices
                rows = pl.ds((bh * (num_chunks + 1) + state_index) * dhqk + block * ROWS, ROWS)
                tile = state_gmem.at[:, rows, pl.ds(u * width, width)]  # (P, 64, bS)
                plgpu.copy_gmem_to_smem(tile, sl_smem.at[slot], sl_bar.at[slot])

            @pl.when(s >= state_steps)
            def _other():
                j, u = (s - state_steps) // num_slices, (s - state_steps) % num_slices
                rows = pl.ds(seq_row0 + (first_other + j) * ROWS, ROWS)
                tile = streamed_gmem.at[:, rows, pl.ds(u * width, width)]  # (P, 64, bS)
                plgpu.copy_gmem_to_smem(tile, sl_smem.at[slot], sl_bar.at[slot])

        def load_block(t):  # tiles ring step t: column block t % col_blocks of other tile t // col_blocks
            rows = pl.ds(seq_row0 + (first_other + t // col_blocks) * ROWS, ROWS)
            tile = tiles_gmem.at[:, rows, pl.ds((t % col_blocks) * tile_cols, tile_cols)]  # (P, 64, tile_cols)
            plgpu.copy_gmem_to_smem(tile, t_smem.at[t % stages], t_bar.at[t % stages])

        def refill(load, free, s, steps):  # once step s's slot is free again, load step s + stages into it
            @pl.when(s + stages < steps)
            def _():
                plgpu.barrier_wait(free.at[s % stages])
                load(s + stages)

        # the owned slices in the order the first product takes them, each followed by the ring's slice it meets
        # there, so that its first step waits for two slices, not for every owned one (0.99x the time at 7b on an
        # H100: results/h100-ab-dkdq-load-order.json)
        block_steps = other_steps * col_blocks
        for u in range(num_slices):
            load_owned(u)
            if u < stages:
                pl.when(u < slice_steps)(functools.partial(load_slice, u))
        for s in range(num_slices, stages):
            pl.when(s < slice_steps)(functools.partial(load_slice, s))
        for s in range(stages):
            pl.when(s < block_steps)(functools.partial(load_block, s))
        common.load_gate_rows(gates_gmem, g_smem, r_smem, g_bar, bh, c)  # used after the state's products
        for s in range(state_steps):  # the compute warpgroups' order: the state, then per other tile slices, blocks
            refill(load_slice, sl_free_bar, s, slice_steps)

        @pl.loop(0, other_steps)
        def _other_tile(j):
            for u in range(num_slices):
                refill(load_slice, sl_free_bar, state_steps + j * num_slices + u, slice_steps)
            for b in range(col_blocks):
                refill(load_block, t_free_bar, j * col_blocks + b, block_steps)

        common.await_last_releases(sl_free_bar, slice_steps, stages)
        common.await_last_releases(t_free_bar, block_steps, stages)

    @pl.when(wg < warpgroups)
    def _compute():
        plgpu.set_max_registers(common.COMPUTE_REGISTERS, action="increase")
        row0 = (first_tile + wg) * ROWS  # in-chunk position of this warpgroup's owned rows
        m_state = gates_gmem.m_states[bh, state_index]  # m_k (dK) or m_{k-1} (dQ), a scalar: read first, used later
        rows = pl.ds(seq_row0 + row0, ROWS)  # this warpgroup's owned rows in the sequence
        own_slice = lambda u: lambda p: own_smem.at[wg, u, p]  # (64, bS): slice u of this warpgroup's owned rows
        slice_t = lambda slot: lambda p: sl_smem.at[slot, p].transpose((1, 0))  # (bS, 64)

        def slices_product(first_step, first=False):  # Σ_u owned[:, u] @ (ring slice first_step + u)ᵀ, (64, 64) f32
            acc = common.zeros(ROWS)
            for u in range(num_slices):
                if first:  # the program's first product: owned slice u has not been awaited yet
                    plgpu.barrier_wait(own_bar.at[wg * num_slices + u])
                slot = (first_step + u) % stages
                plgpu.barrier_wait(sl_bar.at[slot])
                acc = common.mma(acc, own_slice(u), slice_t(slot), parts, interpret)  # (64, bS) @ (bS, 64)
                plgpu.barrier_arrive(sl_free_bar.at[slot])
            return acc

        def pass_other(j):  # an other tile this warpgroup has no part of (the other's diagonal): free its buffers
            for u in range(num_slices):
                slot = (state_steps + j * num_slices + u) % stages
                plgpu.barrier_wait(sl_bar.at[slot])
                plgpu.barrier_arrive(sl_free_bar.at[slot])
            for b in range(col_blocks):
                slot = (j * col_blocks + b) % stages
                plgpu.barrier_wait(t_bar.at[slot])
                plgpu.barrier_arrive(t_free_bar.at[slot])

        # inter-chunk: owned rows @ stateᵀ, one 64-column block per 64-row block of the state, in column blocks
        blocks = [slices_product(block * num_slices, first=block == 0) for block in range(dhqk // ROWS)]
        per_block = tile_cols // ROWS

        # the gates of the 64 steps from `start`, (64,) each, along the rows or along the columns of a (64, 64) tile
        common.await_gate_rows(g_bar, len(GATE_ROWS))
        gate_row, gate_col = common.gate_readers(g_smem, r_smem)
        key_gates = lambda read, start: {"b": read(B_ROW, start), "i": read(I_ROW, start)}
        query_gates = lambda read, start: {
            "b": read(B_ROW, start),
            "m": read(M_ROW, start),
            "r": read(common.RESETS, start),  # int32: last reset in the chunk, −1 if none
            "dh_scale": dh_scale(read(DEN_ROW, start), qk_scale, eps),
        }
        own_gates = (key_gates if variant.owns_keys else query_gates)(gate_row, row0)
        other_gates_at = functools.partial(query_gates if variant.owns_keys else key_gates, gate_col)
        if variant.owns_keys:  # e^{a − m_k}
            vec_inter = key_decay(gate_row(A_ROW, row0), m_state)
        else:  # e^{b + m_{k-1} − m} · s/(den + eps)
            start_decay = common.start_state_decay(own_gates["b"], own_gates["r"], m_state, own_gates["m"])
            vec_inter = start_decay * own_gates["dh_scale"]
        inter = common.by_rows(vec_inter, (ROWS, tile_cols))
        accs = [
            (
                blocks[b * per_block]
                if per_block == 1
                else jnp.concatenate(blocks[b * per_block : (b + 1) * per_block], 1)
            )
            * inter
            for b in range(col_blocks)
        ]  # each (64, tile_cols)

        # the owned rows' gates go along the rows; the other tile's along the columns
        by_own, by_other = common.by_rows, common.by_columns

        def other_step(j, accs):
            other_start = (first_other + j) * ROWS  # in-chunk position of the other tile
            scores = slices_product(state_steps + j * num_slices)  # (owned rows, other rows)
            other_gates = other_gates_at(other_start)
            query, key = (other_gates, own_gates) if variant.owns_keys else (own_gates, other_gates)
            by_query, by_key = (by_other, by_own) if variant.owns_keys else (by_own, by_other)
            shape = scores.shape
            log_decay = (by_query(query["b"], shape) - by_key(key["b"], shape) + by_key(key["i"], shape)) - by_query(
                query["m"], shape
            )
            own_pos = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
            other_pos = other_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            q_pos, kv_pos = (other_pos, own_pos) if variant.owns_keys else (own_pos, other_pos)
            valid = (kv_pos <= q_pos) & (kv_pos >= by_query(query["r"], shape))
            decay = jnp.exp(jnp.where(valid, log_decay, -jnp.inf))
            weights = scores * by_query(query["dh_scale"], shape) * decay  # (64, 64) float32
            w_parts = common.split_parts(weights, parts, t_smem.dtype)
            accs = list(accs)
            for b in range(col_blocks):
                slot = (j * col_blocks + b) % stages
                plgpu.barrier_wait(t_bar.at[slot])
                block = lambda p, slot=slot: t_smem.at[slot, p]  # (64, tile_cols)
                accs[b] = common.mma(accs[b], w_parts.__getitem__, block, parts, interpret)  # (64, 64) @ (64, cols)
                plgpu.barrier_arrive(t_free_bar.at[slot])
            return tuple(accs)

        # this warpgroup's other tiles: dK from its own diagonal on, dQ up to it; it passes the rest in ring order
        first_own = wg if variant.owns_keys else 0
        end_own = other_steps if variant.owns_keys else other_steps - (warpgroups - 1 - wg)
        pl.loop(0, first_own)(pass_other)
        accs = lax.fori_loop(first_own, end_own, other_step, tuple(accs))
        pl.loop(end_own, other_steps)(pass_other)

        dots = jnp.zeros((ROWS,), jnp.float32)
        out_cols = o_smem.shape[-1]
        for b, acc in enumerate(accs):
            columns = pl.ds(b * tile_cols, tile_cols)
            x = plgpu.load(x_gmem.at[rows, columns], layout=plgpu.Layout.WGMMA, optimized=False)  # (64, tile_cols)
            dots = dots + jnp.sum(x.astype(jnp.float32) * acc, axis=1)  # Σ_d x·dx before dx is rounded
            for t in range(tile_cols // out_cols):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile has left o_smem
                o_smem[wg] = acc[:, t * out_cols : (t + 1) * out_cols].astype(o_smem.dtype)  # (64, E)
                plgpu.commit_smem()
                out_columns = pl.ds(b * tile_cols + t * out_cols, out_cols)
                plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[rows, out_columns])  # (64, E)
        dots_smem[wg] = dots  # (64,)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dots_smem.at[wg], dots_gmem.at[bh, pl.ds(c * chunk + row0, ROWS)])  # (64,)
        plgpu.wait_smem_to_gmem(0)


_INPUTS, _OUTPUTS = 6, 2  # a variant's gmem inputs and outputs in `_kernel`


def _variants_kernel(*refs, variants: tuple[Variant, ...], **static):
    """`_kernel` for one variant, or for dK and dQ in one launch: program (bh, c, 2·ot + v) runs variant v's program
    ot, so the two programs of the same rows run side by side and read the chunk's Q, K, V and dH from DRAM once
    between them (the second finds them in L2). refs: each variant's inputs, then each one's outputs, then the
    scratch both share (their shapes are the same)."""
    count = len(variants)
    inputs, outputs, scratch = (
        refs[: _INPUTS * count],
        refs[_INPUTS * count : (_INPUTS + _OUTPUTS) * count],
        refs[(_INPUTS + _OUTPUTS) * count :],
    )
    if count == 1:
        _kernel(*inputs, *outputs, *scratch, variant=variants[0], **static)
        return
    which = lax.axis_index("ot") % count
    for v, variant in enumerate(variants):
        own_refs = (*inputs[_INPUTS * v : _INPUTS * (v + 1)], *outputs[_OUTPUTS * v : _OUTPUTS * (v + 1)], *scratch)
        body = functools.partial(_kernel, *own_refs, variant=variant, variant_count=count, **static)
        pl.when(which == v)(body)


def _launch(
    variants: tuple[Variant, ...],
    call: KernelCall,
    matQ,
    matK,
    matV,
    vecI,
    chunk_gates,
    chunk_states,
    vecN_out,
    vecM_out,
    matDeltaH,
    matDeltaC_states,
):
    """The kernels of `variants` (one, or DK and DQ in one launch) on the launchers' arrays: per variant, (dX (B, NH,
    S, DHQK) in call.output_dtype, Σ_d x·dX (B, NH, S))."""
    chunk = call.chunk_size
    problem = unsupported(chunk, matQ.shape[-1], matV.shape[-1], matQ.dtype)
    dims = common.launch_dims(problem, matQ.shape, matV.shape[-1], chunk)
    batch, heads, seq_len, dhqk, _, num_chunks, bnh, dhqk_p, dhhv_p = dims
    operand_dtype = common.operand_dtype(matQ.dtype)
    parts, tiles = kernel_tiles(chunk, dhqk_p, dhhv_p, common.operand_parts(matQ.dtype))
    w, stages = tiles.warpgroups, tiles.stages
    width, tile_cols = _slice_width(dhhv_p), tile_columns(dhqk_p)
    out_dtype = jnp.dtype(call.output_dtype)

    gates = parallel_bw.kernel_gates(call, vecI, chunk_gates, vecN_out, vecM_out, chunk_states[2], dims)
    operand_of = lambda x, size: common.sequence_operand(x, size, parts, operand_dtype)  # (P, BNH·S, size)
    v, dh = operand_of(matV, dhhv_p), operand_of(matDeltaH.astype(matQ.dtype), dhhv_p)

    def inputs(variant):  # `_kernel`'s gmem inputs for `variant`
        state = matDeltaC_states if variant.owns_keys else chunk_states[0]
        state = common.split_operand(common.states_rows(state, dims), parts, operand_dtype)  # (P, rows, DHHV_p)
        own, streamed = (v, dh) if variant.owns_keys else (dh, v)
        other, x = (matQ, matK) if variant.owns_keys else (matK, matQ)  # the other tiles' Q or K; the row dots' x
        return own, streamed, operand_of(other, dhqk_p), state, gates, common.sequence_rows(x, dhqk_p)

    operand = lambda shape: plgpu.SMEM(shape, operand_dtype, transforms=common.swizzled(operand_dtype))
    kernel = common.chunk_kernel(
        _variants_kernel, call, dhqk, chunk, num_chunks, variants=variants, dhqk=dhqk_p, stages=stages
    )
    outputs = (
        jax.ShapeDtypeStruct((bnh * seq_len, dhqk_p), out_dtype),
        jax.ShapeDtypeStruct((bnh, seq_len), jnp.float32),
    )
    results = common.launch(
        kernel,
        name="__".join(variant.name for variant in variants),
        compute_warpgroups=w,
        parts=parts,
        interpret=call.interpret,
        out_type=outputs * len(variants),
        scratch_types=(
            operand((w, dhhv_p // width, parts, ROWS, width)),  # each warpgroup's owned rows, slice by slice
            operand((stages, parts, ROWS, width)),  # state / other tiles' slices
            operand((stages, parts, ROWS, tile_cols)),  # other tiles' Q or K, a column block at a time
            plgpu.SMEM((len(GATE_ROWS), chunk), jnp.float32),  # gate rows
            plgpu.SMEM((chunk,), common.RESETS_DTYPE),  # last resets
            plgpu.SMEM((w, ROWS, 128 // out_dtype.itemsize), out_dtype, transforms=common.swizzled(out_dtype)),  # dX
            plgpu.SMEM((w, ROWS), jnp.float32),  # row dots
            plgpu.Barrier(num_barriers=w * (dhhv_p // width)),  # owned slices loaded
            plgpu.Barrier(num_barriers=len(GATE_ROWS) + 1),  # gate rows, last resets loaded
            plgpu.Barrier(num_barriers=stages),  # slice loaded
            plgpu.Barrier(num_barriers=stages),  # tile block loaded
            plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # slice buffers free again
            plgpu.Barrier(num_arrivals=w, num_barriers=stages),  # tile block buffers free again
        ),
        grid=(bnh, num_chunks, len(variants) * (chunk // (w * ROWS))),
        grid_names=("bh", "c", "ot"),
    )(*(array for variant in variants for array in inputs(variant)))
    return tuple(
        (grad[:, :dhqk].reshape(batch, heads, seq_len, dhqk), dots.reshape(batch, heads, seq_len))
        for grad, dots in zip(results[::2], results[1::2], strict=True)
    )


def parallel_bw_dK(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dK` in Mosaic GPU (same arrays and outputs as the Triton
    launcher): (dK (B, NH, S, DHQK) in call.output_dtype, Σ_d k·dK (B, NH, S) float32 of the unrounded dK). Trusts
    `call` (chunk_size, qk_scale, eps, output_dtype, input_gate, interpret); ValueError for what `unsupported`
    names."""
    arrays = (matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states)
    return _launch((DK,), call, *arrays)[0]


def parallel_bw_dQ(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """The launcher of `mlstm_chunkwise__parallel_bw_dQ` in Mosaic GPU (same arrays and outputs as the Triton
    launcher): (dQ (B, NH, S, DHQK) in call.output_dtype, Σ_d q·dQ (B, NH, S) float32 of the unrounded dQ). Trusts
    `call` as parallel_bw_dK; reads the forward's C states (chunk_states[0]) where dK reads the dC states."""
    arrays = (matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states)
    return _launch((DQ,), call, *arrays)[0]


def parallel_bw_dK_dQ(
    call: KernelCall, matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states
):
    """dK and dQ in one launch (`_variants_kernel`): ((dK, Σ_d k·dK), (dQ, Σ_d q·dQ)) as parallel_bw_dK and
    parallel_bw_dQ return them, for one `call` (the two kernels' calls differ only in their Triton launch, which Mosaic
    GPU ignores)."""
    arrays = (matQ, matK, matV, vecI, chunk_gates, chunk_states, vecN_out, vecM_out, matDeltaH, matDeltaC_states)
    return _launch((DK, DQ), call, *arrays)
