"""Every default launch parameter of the Triton kernels and the heuristics that pick them, in one place.

Each kernel's tiles, warps and stages for launch fields left None (the chunk size's default is
pallas_mlstm.plan's). The values were measured on Hopper cards (H100, H200); the functions that take a card's
shared memory or SM count (pallas_mlstm.device) adapt them to other cards. The kernels' signatures keep
upstream's defaults (siz_b_LQ = siz_b_LKV = 32, the rest None), and a `TritonLaunch` (pallas_triton/launch.py)
leaves fields None: only None reads this module. Mechanics — clamping a tile to its dim, padding, dots — live in
pallas_triton/common.py. Pure Python (no JAX), so that configs can import it cheaply.
"""

from __future__ import annotations

import dataclasses

# --- parallel kernels (grid: head-dim tile x L tile x chunk·B·NH) ------------------------------------


@dataclasses.dataclass(frozen=True)
class ParallelTiles:
    """Default tiles of one parallel kernel, in its own argument names; each is clamped to its dim at launch."""

    siz_b_LQ: int
    siz_b_LKV: int
    siz_b_DHQK: int
    siz_b_DHHV: int


# Measured per kernel on an H200 at the 7b shape, chunk 256 (pallas_mlstm/benchmarks/README.md): 128 output
# rows per program, 64-row loop tiles, head-dim grid tiles 256 wide, the other head dim walked 64 at a time.
PARALLEL_FW_HINTRA = ParallelTiles(siz_b_LQ=128, siz_b_LKV=64, siz_b_DHQK=64, siz_b_DHHV=256)
PARALLEL_BW_DQ = ParallelTiles(siz_b_LQ=128, siz_b_LKV=64, siz_b_DHQK=256, siz_b_DHHV=64)
PARALLEL_BW_DK = ParallelTiles(siz_b_LQ=64, siz_b_LKV=128, siz_b_DHQK=256, siz_b_DHHV=64)
PARALLEL_BW_DV = ParallelTiles(siz_b_LQ=64, siz_b_LKV=128, siz_b_DHQK=64, siz_b_DHHV=256)

# Same measurement: loads pipelined 2 deep in all four parallel kernels.
PARALLEL_NUM_STAGES = 2
# Those tiles and stages need Hopper's shared memory (227 KiB per block). Cards with less (A100: 163 KiB;
# consumer cards: 99 KiB) get head-dim tiles of at most SMALL_CARD_HEAD_TILE and unpipelined loads.
PIPELINED_MIN_SHARED_MEMORY_KIB = 200
SMALL_CARD_HEAD_TILE = 128


def _hopper_class(shared_memory_kib: int | None) -> bool:
    """True for the cards the defaults were measured on (and off a GPU: None, where launches are interpreted)."""
    return shared_memory_kib is None or shared_memory_kib >= PIPELINED_MIN_SHARED_MEMORY_KIB


def parallel_tiles(defaults: ParallelTiles, shared_memory_kib: int | None) -> ParallelTiles:
    """A parallel kernel's default tiles on a card with this much shared memory per block (KiB)."""
    if _hopper_class(shared_memory_kib):
        return defaults
    return dataclasses.replace(
        defaults,
        siz_b_DHQK=min(defaults.siz_b_DHQK, SMALL_CARD_HEAD_TILE),
        siz_b_DHHV=min(defaults.siz_b_DHHV, SMALL_CARD_HEAD_TILE),
    )


def parallel_num_stages(shared_memory_kib: int | None) -> int:
    """Default pipeline depth of the parallel kernels' loads: PARALLEL_NUM_STAGES on Hopper-class cards, else 1."""
    return PARALLEL_NUM_STAGES if _hopper_class(shared_memory_kib) else 1


def parallel_num_warps(out_rows: int, out_cols: int) -> int:
    """Default warps of a parallel kernel whose program writes an (out_rows, out_cols) output tile:
    8 from 128 x 128 elements on, else 4 (same measurement)."""
    return 8 if out_rows * out_cols >= 128 * 128 else 4


# --- recurrent kernels (grid: DHQK tile x DHHV tile x B·NH, each program walking every chunk) -----------


@dataclasses.dataclass(frozen=True)
class RecurrentLaunch:
    """Default launch of one recurrent kernel; its DHHV tile comes from `recurrent_dhhv_tile`."""

    siz_b_DHQK: int
    num_warps: int
    num_stages: int


# Measured per kernel on an H200 at the 7b shape, chunk 256 (pallas_mlstm/benchmarks/README.md).
RECURRENT_FW_C = RecurrentLaunch(siz_b_DHQK=64, num_warps=4, num_stages=1)
RECURRENT_BW_DC = RecurrentLaunch(siz_b_DHQK=64, num_warps=4, num_stages=1)

# Rows of the sequence one dot of the recurrent kernels covers: larger chunks are walked in sub-tiles of this.
RECURRENT_SUB_TILE = 128
# Each program of a recurrent kernel walks all chunks of one state tile in order: its grid must fill the GPU
# with at least this many programs per SM (measured: 128 programs on an H200's 132 SMs ran 1.5x slower than
# 256; 512 and 1024 ran fastest).
RECURRENT_MIN_PROGRAMS_PER_SM = 3
# The SM count assumed off a GPU (H100 SXM and H200: 132).
DEFAULT_CORE_COUNT = 132


def recurrent_dhhv_tile(dhqk_tiles: int, dhhv_p: int, bnh: int, core_count: int | None = None) -> int:
    """Default DHHV tile of a recurrent kernel (before clamping to dhhv_p): 128 where that still gives
    RECURRENT_MIN_PROGRAMS_PER_SM programs per SM (measured faster than 64 at the 7b shape on an H200), else 64."""
    wide_programs = dhqk_tiles * max(1, dhhv_p // 128) * bnh
    sms = DEFAULT_CORE_COUNT if core_count is None else core_count
    return 128 if wide_programs >= RECURRENT_MIN_PROGRAMS_PER_SM * sms else 64


# --- recurrent step kernel (decoding; grid: B·NH x DHHV tile) ------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepLaunch:
    """Default launch of the step kernel: each program updates a (DHQK, siz_b_DHHV) tile of C in float32."""

    siz_b_DHHV: int
    num_warps: int


# Not yet measured on a GPU: 64 columns keep a 256 x 64 float32 tile at 128 registers per thread over 4 warps.
STEP_LAUNCH = StepLaunch(siz_b_DHHV=64, num_warps=4)
