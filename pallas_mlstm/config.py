"""Launch configuration: a frozen, hashable config and the heuristics that fill it in."""

from __future__ import annotations

import dataclasses

# Smallest chunk the Pallas kernels take (Triton's dot needs every side >= 16).
MIN_PALLAS_CHUNK = 16
DEFAULT_MAX_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class ChunkwiseConfig:
    """Tiles and launch parameters of one `mlstm_chunkwise` call; None means "use the heuristic".

    The names follow upstream's `mlstm_chunkwise_fw` / `mlstm_chunkwise_bw`: `*_parallel` tiles are
    grid axes, `*_loop` tiles are walked inside a kernel; `intra` is the parallel kernels, `inter` the
    recurrent ones.
    """

    chunk_size: int | None = None
    siz_b_L_parallel: int | None = None
    siz_b_L_loop: int | None = None
    siz_b_DH_parallel: int | None = None
    siz_b_DH_loop: int | None = None
    num_warps_intra: int | None = None
    num_warps_inter: int | None = None
    num_stages_intra: int | None = None
    num_stages_inter: int | None = None

    def launch_items(self) -> tuple[tuple[str, int], ...]:
        """The set launch fields as hashable (name, value) pairs for `mlstm_chunkwise_fw` / `_bw`."""
        return tuple(
            (field.name, getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name != "chunk_size" and getattr(self, field.name) is not None
        )


def default_chunk_size(seq_len: int, minimum: int = 1) -> int:
    """The largest power of 2 <= 128 that divides seq_len; ValueError if it is below `minimum`."""
    chunk = DEFAULT_MAX_CHUNK
    while chunk > 1 and seq_len % chunk:
        chunk //= 2
    if chunk < minimum:
        raise ValueError(
            f"the sequence length S={seq_len} must be a multiple of {minimum} for the Pallas backends: "
            f"pad S to {-(-seq_len // minimum) * minimum}, or use backend='xla'."
        )
    return chunk
