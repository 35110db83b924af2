"""The one launch of the three parallel backward kernels (grid (head-dim tile, L tile, NC·B·NH)), driven by each
kernel's `BwKernel` spec: its body, its default tiles, which inputs it reads in which BlockSpec role, and the
grid's axes (its output tile)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_mlstm import plan  # plan.validate_*, looked up at call time: plan may import this package
from pallas_mlstm.device import device_properties
from pallas_mlstm.gates import log_input_gate
from pallas_mlstm.kernel_call import KernelCall
from pallas_mlstm.pallas_triton import common, launch_defaults
from pallas_mlstm.pallas_triton.launch import TritonLaunch
from pallas_mlstm.validation import kernel_seq_len, validate_kernel_arrays

# The four tiles of a parallel kernel (launch_defaults.ParallelTiles' siz_b_<tile>): query rows, key rows, and the
# two head dims. A kernel's grid tiles one L and one head dim (its output tile); its body walks the other two.
TILES = ("LQ", "LKV", "DHQK", "DHHV")
# The head dim of each (B·NH, S, D) input.
HEAD_DIM_OF = {"q": "DHQK", "k": "DHQK", "v": "DHHV", "dh": "DHHV"}


@dataclasses.dataclass(frozen=True)
class BwKernel:
    """What the generic `launch` needs to know of one parallel backward kernel.

    `body` takes one ref per entry of `reads`, then its output ref(s), and the keywords qk_scale, eps, precision
    and block_<walked tile> for each tile its grid does not cover (e.g. block_lkv, block_dhhv for dQ).
    `grid` = (head dim, L tile) of the grid's first two axes: the output tile is (L tile rows, head-dim tile
    columns). `reads`: (input, role) pairs, inputs named as `prepare` names them, roles as `BwLayout.in_spec`
    reads them. `row_dots`: the body writes a second output, the float32 Σ_d x·dx of its tile's rows (x = q for
    dQ, k for dK).
    """

    name: str  # the pallas_call's name, as upstream's kernel function
    body: Callable[..., Any]
    defaults: launch_defaults.ParallelTiles
    grid: tuple[str, str]
    reads: tuple[tuple[str, str], ...]
    row_dots: bool = False

    @property
    def walked(self) -> tuple[str, ...]:
        """The tiles the body loops over (those the grid does not cover)."""
        return tuple(tile for tile in TILES if tile not in self.grid)


class BwArrays(NamedTuple):
    """A parallel backward kernel's arrays, in upstream's layout and order: chunk_gates = (vecA, vecB, vecR)
    (vecR (B, NH, NC, L) int32 marks hard resets, `compute_chunkwise_reset_gates`; None: there are none) and
    chunk_states = (matC_all, vecN_all, scaM_all) (vecN_all unused)."""

    matQ: jax.Array  # (B, NH, S, DHQK)
    matK: jax.Array  # (B, NH, S, DHQK)
    matV: jax.Array  # (B, NH, S, DHHV)
    vecI: jax.Array  # (B, NH, S)
    chunk_gates: tuple  # (B, NH, NC, L) each
    chunk_states: tuple  # (B, NH, (NC+1)*DHQK, DHHV), (B, NH, (NC+1)*DHQK), (B, NH, NC+1)
    vecN_out: jax.Array  # (B, NH, S)
    vecM_out: jax.Array  # (B, NH, S)
    matDeltaH: jax.Array  # (B, NH, S, DHHV)
    matDeltaC_states: jax.Array  # (B, NH, (NC+1)*DHQK, DHHV)


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
        """B·NH: batch times heads."""
        return self.batch * self.heads

    @property
    def num_chunks(self) -> int:
        """Chunks per sequence."""
        return self.seq_len // self.chunk_size

    @property
    def dhqk_p(self) -> int:
        """DHQK as the kernels run it (`common.padded_dim`)."""
        return common.padded_dim(self.dhqk)

    @property
    def dhhv_p(self) -> int:
        """DHHV as the kernels run it (`common.padded_dim`)."""
        return common.padded_dim(self.dhhv)

    def dim(self, tile: str) -> int:
        """The (padded) extent a tile divides: the chunk for LQ / LKV, the padded head dim for DHQK / DHHV."""
        return {"LQ": self.chunk_size, "LKV": self.chunk_size, "DHQK": self.dhqk_p, "DHHV": self.dhhv_p}[tile]

    def tiles(self, launch: TritonLaunch, defaults: launch_defaults.ParallelTiles) -> dict[str, int]:
        """The tile sizes by name (TILES): launch's requests (None: the kernel's `defaults`, adapted to the
        card's shared memory) clamped to their dims."""
        defaults = launch_defaults.parallel_tiles(defaults, device_properties().shared_memory_kib)
        return {
            tile: common.tile_size(
                getattr(launch, f"siz_b_{tile}"), self.dim(tile), getattr(defaults, f"siz_b_{tile}"), f"siz_b_{tile}"
            )
            for tile in TILES
        }

    # BlockSpecs; index maps take the grid indices (head-dim tile d, L tile l, chunk-major program cb).
    def _chunk(self, cb):
        return cb // self.num_chunks, cb % self.num_chunks

    def chunk_rows(self, width: int, tiled_cols: bool) -> pl.BlockSpec:
        """The whole chunk of a (B·NH, S, D) array; columns: the d-th tile of `width`, or all."""
        return pl.BlockSpec((None, self.chunk_size, width), lambda d, l, cb: (*self._chunk(cb), d if tiled_cols else 0))

    def tile_rows(self, rows: int, width: int, tiled_cols: bool) -> pl.BlockSpec:
        """The l-th tile of `rows` positions of the chunk in a (B·NH, S, D) array."""
        tiles = self.chunk_size // rows
        return pl.BlockSpec(
            (None, rows, width),
            lambda d, l, cb: (cb // self.num_chunks, (cb % self.num_chunks) * tiles + l, d if tiled_cols else 0),
        )

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

    def in_spec(self, name: str, role: str, grid: tuple[str, str], tiles: dict[str, int]) -> pl.BlockSpec:
        """The BlockSpec of input `name` (as `prepare` names it) read in `role` by a kernel of grid (head, L). Roles:
        "tile", the program's L tile of the chunk; "chunk", the whole chunk; "start" / "end", the state at the
        chunk's start (C_{k-1}, m_{k-1}) / end (dC_k, m_k). A (B·NH, S, D) input's columns are the grid's head-dim
        tile where D is the grid's head dim, else all of D."""
        head, rows = grid
        if role in ("start", "end"):
            offset = 0 if role == "start" else 1
            if name == "m_all":
                return self.state_m(offset)
            tiled_rows = head == "DHQK"
            return self.state(
                offset,
                tiles["DHQK"] if tiled_rows else self.dhqk_p,
                self.dhhv_p if tiled_rows else tiles["DHHV"],
                tiled_rows=tiled_rows,
            )
        if name in HEAD_DIM_OF:
            tiled_cols = HEAD_DIM_OF[name] == head
            width = tiles[head] if tiled_cols else self.dim(HEAD_DIM_OF[name])
            if role == "tile":
                return self.tile_rows(tiles[rows], width, tiled_cols=tiled_cols)
            return self.chunk_rows(width, tiled_cols=tiled_cols)
        return self.tile_vec(tiles[rows]) if role == "tile" else self.chunk_vec()


def prepare(call: KernelCall, arrays: BwArrays) -> tuple[BwLayout, dict[str, jax.Array]]:
    """The layout of a launch, and its arrays converted from upstream's layout to the kernels' (B·NH, …) padded one:
    q, k, v, dh, the gates vec_a, vec_b, vec_i (the log input gate, `log_input_gate` for call.input_gate), vec_r
    (−1: no reset), vec_m, den (vecN_out), and the states c_all, dc_all, m_all. No checks."""
    (
        matQ,
        matK,
        matV,
        vecI,
        (vecA, vecB, vecR),
        (matC_all, _, scaM_all),
        vecN_out,
        vecM_out,
        matDeltaH,
        matDeltaC_states,
    ) = arrays
    batch, heads, seq_len, dhqk = matQ.shape
    layout = BwLayout(batch, heads, seq_len, dhqk, matV.shape[-1], call.chunk_size)
    bnh, dhqk_p, dhhv_p = layout.bnh, layout.dhqk_p, layout.dhhv_p
    flat = lambda x, size: common.pad_axis(x.reshape(bnh, seq_len, x.shape[-1]), 2, size)
    gate = lambda x: x.reshape(bnh, seq_len)
    converted = dict(
        q=flat(matQ, dhqk_p),
        k=flat(matK, dhqk_p),
        v=flat(matV, dhhv_p),
        dh=flat(matDeltaH.astype(matQ.dtype), dhhv_p),
        vec_b=gate(vecB),
        vec_a=gate(vecA),
        vec_i=gate(log_input_gate(vecI, call.input_gate)),
        vec_r=jnp.full((bnh, seq_len), -1, jnp.int32) if vecR is None else gate(vecR),
        vec_m=gate(vecM_out),
        den=gate(vecN_out),
        c_all=common.states_to_kernel_layout(matC_all, dhqk, (dhqk_p, dhhv_p)),
        dc_all=common.states_to_kernel_layout(matDeltaC_states, dhqk, (dhqk_p, dhhv_p)),
        m_all=scaM_all.reshape(bnh, layout.num_chunks + 1, 1),
    )
    return layout, converted


def launch(spec: BwKernel, call: KernelCall, arrays: BwArrays):
    """Runs the parallel backward kernel `spec` on upstream-layout `arrays`; trusts `call` (chunk_size, qk_scale,
    eps, output_dtype, input_gate, launch, allow_tf32, interpret). Returns its (B, NH, S, D) output, padding
    removed (D: the grid's head dim), and with `spec.row_dots` the row dots (B, NH, S) float32, summed here over
    the head-dim tiles."""
    layout, converted = prepare(call, arrays)
    triton_launch = common.triton_launch(call)
    tiles = layout.tiles(triton_launch, spec.defaults)
    head, rows = spec.grid
    kernel = functools.partial(
        spec.body,
        qk_scale=call.scale_for(layout.dhqk),
        eps=call.eps,
        precision=common.matmul_precision(arrays.matQ.dtype, call.allow_tf32),
        **{f"block_{tile.lower()}": tiles[tile] for tile in spec.walked},
    )
    grid = (layout.dim(head) // tiles[head], layout.chunk_size // tiles[rows], layout.num_chunks * layout.bnh)
    out_specs = [layout.tile_rows(tiles[rows], tiles[head], tiled_cols=True)]  # one program's output tile
    out_shape = [jax.ShapeDtypeStruct((layout.bnh, layout.seq_len, layout.dim(head)), call.output_dtype)]
    if spec.row_dots:  # one partial row dot per head-dim tile, summed below
        l_tiles = layout.chunk_size // tiles[rows]
        out_specs.append(
            pl.BlockSpec(
                (None, None, tiles[rows]),
                lambda d, l, cb: (d, cb // layout.num_chunks, (cb % layout.num_chunks) * l_tiles + l),
            )
        )
        out_shape.append(jax.ShapeDtypeStruct((grid[0], layout.bnh, layout.seq_len), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[layout.in_spec(name, role, spec.grid, tiles) for name, role in spec.reads],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.compiler_params(
            triton_launch.num_warps,
            triton_launch.num_stages,
            default_warps=launch_defaults.parallel_num_warps(tiles[rows], tiles[head]),
            default_stages=launch_defaults.parallel_num_stages(device_properties().shared_memory_kib),
        ),
        interpret=call.interpret,
        name=spec.name,
    )(*(converted[name] for name, _ in spec.reads))
    out_dim = layout.dhqk if head == "DHQK" else layout.dhhv
    grad = outs[0][:, :, :out_dim].reshape(layout.batch, layout.heads, layout.seq_len, out_dim)
    if not spec.row_dots:
        return grad
    return grad, jnp.sum(outs[1], axis=0).reshape(layout.batch, layout.heads, layout.seq_len)


# The arrays of the three upstream-signature parallel backward functions, in their order (vecR, last, apart).
BW_ARRAY_NAMES = (
    "matQ",
    "matK",
    "matV",
    "vecI",
    "vecA",
    "vecB",
    "matC_all",
    "vecN_all",
    "scaM_all",
    "vecN_out",
    "vecM_out",
    "matDeltaH",
    "matDeltaC_states",
    "vecR",
)


def checked_call(
    spec: BwKernel,
    arrays: tuple,
    launch_fields: dict,
    *,
    chunk_size,
    qk_scale,
    eps,
    output_dtype,
    input_gate: str,
    allow_tf32: bool,
    interpret: bool,
) -> KernelCall:
    """The `KernelCall` of an upstream-signature parallel backward function, after checking (in this order) its
    `arrays` (BW_ARRAY_NAMES), its chunk size (a power of 2 >= 16 dividing S), its input gate, its launch
    (`TritonLaunch(**launch_fields)`) and that a compiled launch has a GPU."""
    named = dict(zip(BW_ARRAY_NAMES, arrays))
    validate_kernel_arrays(named, plan.validate_chunk_size(chunk_size, kernel_seq_len(named), minimum=common.MIN_TILE))
    plan.validate_gate_options(input_gate)
    return KernelCall(
        chunk_size=chunk_size,
        input_gate=input_gate,
        launch=TritonLaunch(**launch_fields),
        **plan.checked_kernel_options(qk_scale=qk_scale, eps=eps, output_dtype=output_dtype, allow_tf32=allow_tf32),
        interpret=common.checked_interpret(interpret, spec.name),
    )
