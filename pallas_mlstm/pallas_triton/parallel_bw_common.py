"""Input layout and BlockSpecs shared by the three parallel backward kernels (grid (head-dim tile, L tile, NC·B·NH))."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_mlstm import launch_defaults
from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import log_input_gate
from pallas_mlstm.pallas_triton import common
from pallas_mlstm.validation import validate_chunk_size


@dataclasses.dataclass(frozen=True)
class BwLayout:
    """Static sizes of one parallel backward launch."""

    batch: int
    heads: int
    seq_len: int
    dhqk: int
    dhhv: int
    chunk_size: int

    @property
    def bnh(self) -> int:
        return self.batch * self.heads

    @property
    def num_chunks(self) -> int:
        return self.seq_len // self.chunk_size

    @property
    def dhqk_p(self) -> int:
        return common.padded_dim(self.dhqk)

    @property
    def dhhv_p(self) -> int:
        return common.padded_dim(self.dhhv)

    def tiles(self, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, defaults: launch_defaults.ParallelTiles):
        """The (bLQ, bLKV, bDHQK, bDHHV) tile sizes: requests (None: the kernel's `defaults`, adapted to the
        card's shared memory) clamped to the dims."""
        defaults = launch_defaults.parallel_tiles(defaults, device_properties().shared_memory_kib)
        return (common.tile_size(siz_b_LQ, self.chunk_size, defaults.siz_b_LQ, "siz_b_LQ"),
                common.tile_size(siz_b_LKV, self.chunk_size, defaults.siz_b_LKV, "siz_b_LKV"),
                common.tile_size(siz_b_DHQK, self.dhqk_p, defaults.siz_b_DHQK, "siz_b_DHQK"),
                common.tile_size(siz_b_DHHV, self.dhhv_p, defaults.siz_b_DHHV, "siz_b_DHHV"))

    # BlockSpecs; index maps take the grid indices (head-dim tile d, L tile l, chunk-major program cb).
    def _chunk(self, cb):
        return cb // self.num_chunks, cb % self.num_chunks

    def chunk_rows(self, width: int, tiled_cols: bool) -> pl.BlockSpec:
        """The whole chunk of a (B·NH, S, D) array; columns: the d-th tile of `width`, or all."""
        return pl.BlockSpec((None, self.chunk_size, width),
                            lambda d, l, cb: (*self._chunk(cb), d if tiled_cols else 0))

    def tile_rows(self, rows: int, width: int, tiled_cols: bool) -> pl.BlockSpec:
        """The l-th tile of `rows` positions of the chunk in a (B·NH, S, D) array."""
        tiles = self.chunk_size // rows
        return pl.BlockSpec((None, rows, width), lambda d, l, cb: (
            cb // self.num_chunks, (cb % self.num_chunks) * tiles + l, d if tiled_cols else 0))

    def chunk_vec(self) -> pl.BlockSpec:
        """The whole chunk of a (B·NH, S) gate."""
        return pl.BlockSpec((None, self.chunk_size), lambda d, l, cb: self._chunk(cb))

    def tile_vec(self, rows: int) -> pl.BlockSpec:
        """The l-th tile of `rows` positions of a (B·NH, S) gate."""
        tiles = self.chunk_size // rows
        return pl.BlockSpec((None, rows), lambda d, l, cb: (cb // self.num_chunks, (cb % self.num_chunks) * tiles + l))

    def state(self, offset: int, rows: int, cols: int, tiled_rows: bool) -> pl.BlockSpec:
        """State c + offset of a (B·NH, NC+1, DHQK_p, DHHV_p) buffer; rows (DHQK) or columns (DHHV) tiled by d."""
        def index(d, l, cb):
            b, c = self._chunk(cb)
            return (b, c + offset, d, 0) if tiled_rows else (b, c + offset, 0, d)
        return pl.BlockSpec((None, None, rows, cols), index)

    def state_m(self, offset: int) -> pl.BlockSpec:
        """m of state c + offset from (B·NH, NC+1, 1)."""
        return pl.BlockSpec((None, None, 1), lambda d, l, cb: (cb // self.num_chunks, cb % self.num_chunks + offset, 0))


def prepare(matQ, matK, matV, vecI, vecB, vecA, vecR, matC_all, scaM_all, vecN_out, vecM_out, matDeltaH,
            matDeltaC_states, chunk_size: int, input_gate: str):
    """Validates and converts the upstream-layout arguments to the kernels' (B·NH, …) padded layout.

    vecR (B, NH, NC, L) int32 marks hard resets (compute_chunkwise_reset_gates); None: there are none. The
    kernels read the log input gate (`log_input_gate` of vecI for `input_gate`).
    """
    batch, heads, seq_len, dhqk = matQ.shape
    dhhv = matV.shape[-1]
    validate_chunk_size(chunk_size, seq_len, minimum=common.MIN_TILE)
    layout = BwLayout(batch, heads, seq_len, dhqk, dhhv, chunk_size)
    bnh, dhqk_p, dhhv_p = layout.bnh, layout.dhqk_p, layout.dhhv_p
    flat = lambda x, size: common.pad_axis(x.reshape(bnh, seq_len, x.shape[-1]), 2, size)
    gate = lambda x: x.reshape(bnh, seq_len)
    arrays = dict(
        q=flat(matQ, dhqk_p), k=flat(matK, dhqk_p), v=flat(matV, dhhv_p), dh=flat(matDeltaH.astype(matQ.dtype), dhhv_p),
        vec_b=gate(vecB), vec_a=gate(vecA), vec_i=gate(log_input_gate(vecI, input_gate)),
        vec_r=jnp.full((bnh, seq_len), -1, jnp.int32) if vecR is None else gate(vecR), vec_m=gate(vecM_out), den=gate(vecN_out),
        c_all=common.states_to_kernel_layout(matC_all, dhqk, (dhqk_p, dhhv_p)),
        dc_all=common.states_to_kernel_layout(matDeltaC_states, dhqk, (dhqk_p, dhhv_p)),
        m_all=scaM_all.reshape(bnh, layout.num_chunks + 1, 1),
    )
    return layout, arrays


def launch(kernel, layout: BwLayout, grid_head_tiles: int, grid_l_tiles: int, in_specs, inputs, out_spec,
           out_width: int, output_dtype, num_warps, num_stages, interpret: bool, name: str, out_dim: int,
           row_dot_rows: int | None = None):
    """Runs one parallel backward kernel; returns its (B, NH, S, out_dim) output, padding removed.

    With `row_dot_rows`, the kernel has a second output: per head-dim tile, the float32 row sums
    Σ_d x·dx of its tile (x = q for dQ, k for dK), summed here over the tiles to (B, NH, S).
    """
    grid = (grid_head_tiles, grid_l_tiles, layout.num_chunks * layout.bnh)
    out_specs = [out_spec]
    out_shape = [jax.ShapeDtypeStruct((layout.bnh, layout.seq_len, out_width), output_dtype)]
    if row_dot_rows is not None:
        tiles = layout.chunk_size // row_dot_rows
        out_specs.append(pl.BlockSpec((None, None, row_dot_rows), lambda d, l, cb: (
            d, cb // layout.num_chunks, (cb % layout.num_chunks) * tiles + l)))
        out_shape.append(jax.ShapeDtypeStruct((grid_head_tiles, layout.bnh, layout.seq_len), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.compiler_params(  # out_spec's block (None, rows, cols) is one program's output tile
            num_warps, num_stages, default_warps=launch_defaults.parallel_num_warps(*out_spec.block_shape[-2:]),
            default_stages=launch_defaults.parallel_num_stages(device_properties().shared_memory_kib)),
        interpret=common.checked_interpret(interpret, name),
        name=name,
    )(*inputs)
    grad = outs[0][:, :, :out_dim].reshape(layout.batch, layout.heads, layout.seq_len, out_dim)
    if row_dot_rows is None:
        return grad
    return grad, jnp.sum(outs[1], axis=0).reshape(layout.batch, layout.heads, layout.seq_len)
