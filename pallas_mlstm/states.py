"""Layout of the chunk-boundary state buffers that the kernels pass to each other."""

from __future__ import annotations

import jax


def split_states(mat_all: jax.Array, dhqk: int) -> jax.Array:
    """(B, NH, (NC+1)*DHQK[, DHHV]) -> (B, NH, NC+1, DHQK[, DHHV])."""
    return mat_all.reshape(*mat_all.shape[:2], mat_all.shape[2] // dhqk, dhqk, *mat_all.shape[3:])


def join_states(mat_states: jax.Array) -> jax.Array:
    """(B, NH, NC+1, DHQK[, DHHV]) -> (B, NH, (NC+1)*DHQK[, DHHV])."""
    return mat_states.reshape(*mat_states.shape[:2], -1, *mat_states.shape[4:])
