"""The recurrent states: their dtype, the `States` pytree (C, n, m), and the layout of the chunk-boundary buffers."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def acc_dtype(dtype) -> jnp.dtype:
    """The dtype of accumulators, gates and states for operands of `dtype`: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def state_buffer_dtype(input_dtype):
    """The dtype of the C / dC state buffers passed between the kernels of one call: the inputs' dtype when it
    is 16-bit (the parallel kernels round the states to it for their matmuls anyway, so h and the gradients of
    q, k, v are unchanged, and the buffers' traffic and memory halve), else None (float32 / float64)."""
    return jnp.dtype(input_dtype).name if jnp.dtype(input_dtype).itemsize == 2 else None


class States(NamedTuple):
    """One (B, NH) grid of cell states: c (B, NH, DHQK, DHHV), n (B, NH, DHQK) and the max state m (B, NH).

    m is None where the cell has none (the sigmoid input gate) or where it was not given. A pytree, so it
    passes through jit, scans and custom VJPs as it is."""

    c: jax.Array | None
    n: jax.Array | None
    m: jax.Array | None = None

    @classmethod
    def zeros(cls, batch: int, heads: int, dhqk: int, dhhv: int, dtype, lead: tuple[int, ...] = ()) -> States:
        """Zero states (the cell's "no initial state"), with extra axes `lead` after (B, NH) (e.g. one per
        segment)."""
        shape = (batch, heads, *lead)
        return cls(jnp.zeros((*shape, dhqk, dhhv), dtype), jnp.zeros((*shape, dhqk), dtype), jnp.zeros(shape, dtype))

    def or_zeros(self, like: States) -> States:
        """These states cast to `like`'s dtypes, with `like`'s (zeros) where one is None."""
        return States(*(z if x is None else x.astype(z.dtype) for x, z in zip(self, like)))

    def as_tuple(self, tracks_max_state: bool) -> tuple:
        """The tuple users get: (c, n, m), or (c, n) for a cell without a max state."""
        return (self.c, self.n, self.m) if tracks_max_state else (self.c, self.n)


def split_states(mat_all: jax.Array, dhqk: int) -> jax.Array:
    """(B, NH, (NC+1)*DHQK[, DHHV]) -> (B, NH, NC+1, DHQK[, DHHV])."""
    return mat_all.reshape(*mat_all.shape[:2], mat_all.shape[2] // dhqk, dhqk, *mat_all.shape[3:])


def join_states(mat_states: jax.Array) -> jax.Array:
    """(B, NH, NC+1, DHQK[, DHHV]) -> (B, NH, (NC+1)*DHQK[, DHHV])."""
    return mat_states.reshape(*mat_states.shape[:2], -1, *mat_states.shape[4:])
