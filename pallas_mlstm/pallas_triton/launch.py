"""The Triton backend's launch config: `TritonLaunch`, one per kernel, checked at construction.

A field left None takes the kernel's measured default (pallas_mlstm/pallas_triton/launch_defaults.py). Upstream's
flat launch arguments (`mlstm_chunkwise_fw` / `_bw`'s `siz_b_L_parallel`, ..., `num_stages_inter`, as
`ChunkwiseConfig` also holds them) name tiles by role; `from_upstream` maps them onto each kernel's own tiles.
"""

from __future__ import annotations

import dataclasses
import numbers

from pallas_mlstm.config import MIN_TILE, NUM_WARPS, is_power_of_2


@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    """Tiles, warps and pipeline stages of one Triton kernel launch; None: the kernel's measured default.

    siz_b_LQ / siz_b_LKV: query / key rows of a tile (parallel kernels only); siz_b_DHQK / siz_b_DHHV: head-dim
    tiles; each is clamped to its dim at launch. Checked at construction (ValueError naming the field): ints
    (NumPy integers converted), tiles powers of 2 >= 16, num_warps one of 1, 2, 4, 8, 16, 32, num_stages >= 1.
    """

    siz_b_LQ: int | None = None
    siz_b_LKV: int | None = None
    siz_b_DHQK: int | None = None
    siz_b_DHHV: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            name = f"TritonLaunch.{field.name}"
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int or None; got {value!r} ({type(value).__name__}).")
            value = int(value)
            object.__setattr__(self, field.name, value)
            if field.name.startswith("siz_b_") and not (value >= MIN_TILE and is_power_of_2(value)):
                raise ValueError(f"{name} must be a power of 2 >= {MIN_TILE} (e.g. 32, 64, 128); got {value}.")
            if field.name == "num_warps" and value not in NUM_WARPS:
                raise ValueError(f"{name} must be one of {', '.join(map(str, NUM_WARPS))}; got {value}.")
            if field.name == "num_stages" and value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value}.")

    def merged(self, override: TritonLaunch | None) -> TritonLaunch:
        """This launch with `override`'s set fields in place of its own."""
        if override is None:
            return self
        return dataclasses.replace(self, **{k: v for k, v in dataclasses.asdict(override).items() if v is not None})


def from_upstream(kernel: str, flat: dict) -> TritonLaunch:
    """`kernel`'s launch from upstream's flat launch fields (missing ones None): the recurrent kernels take the
    `*_inter` warps and stages; the parallel kernels the `*_intra` ones and the tiles, `*_parallel` being a grid
    axis of each kernel (its output rows and head-dim columns) and `*_loop` the ones it walks."""
    get = flat.get
    if kernel in ("recurrent_fw_C", "recurrent_bw_dC"):
        return TritonLaunch(num_warps=get("num_warps_inter"), num_stages=get("num_stages_inter"))
    rows, walked = get("siz_b_L_parallel"), get("siz_b_L_loop")
    out_cols, inner = get("siz_b_DH_parallel"), get("siz_b_DH_loop")
    tiles = {  # (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV): output rows and columns on the grid
        "parallel_fw_Hintra": (rows, walked, inner, out_cols),  # h: query rows x DHHV
        "parallel_bw_dQ": (rows, walked, out_cols, inner),  # dQ: query rows x DHQK
        "parallel_bw_dK": (walked, rows, out_cols, inner),  # dK: key rows x DHQK
        "parallel_bw_dV": (walked, rows, inner, out_cols),  # dV: key rows x DHHV
    }[kernel]
    return TritonLaunch(*tiles, num_warps=get("num_warps_intra"), num_stages=get("num_stages_intra"))
