"""Preparing the inputs of a call: packed documents become hard resets, S is padded to whole chunks; and the one
test of whether an array is split over Explicit mesh axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes one PartitionSpec entry names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """x's sharding where its type is split over Explicit mesh axes (known when tracing), else None."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    if not any(set(spec_axes(entry)) & explicit for entry in sharding.spec):
        return None
    return sharding


def sequence_shards(x: jax.Array) -> int:
    """How many pieces x's sequence axis (dim 2) is split into over Explicit mesh axes: 1 where it is whole, or where
    its split is not known when tracing (Auto axes)."""
    sharding = explicit_sharding(x)
    if sharding is None or len(sharding.spec) < 3:
        return 1
    sizes = dict(sharding.mesh.shape)
    count = 1
    for axis in spec_axes(sharding.spec[2]):
        count *= sizes[axis]
    return count


def reset_at_document_starts(vecF: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """vecF (B, NH, S) with f̃ = −∞ (a hard reset before the token) wherever segment_ids (B, S) changes.

    Comparing neighbours needs the whole sequence axis: with Explicit mesh axes the ids (B·S integers) are
    gathered along S first, and the mask is laid out as vecF before it is applied."""
    ids_sharding, f_sharding = explicit_sharding(segment_ids), explicit_sharding(vecF)
    if ids_sharding is not None:
        batch_axes = ids_sharding.spec[0] if len(ids_sharding.spec) else None
        whole_sequence = NamedSharding(ids_sharding.mesh, PartitionSpec(batch_axes, None))
        segment_ids = jax.sharding.reshard(segment_ids, whole_sequence)
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jnp.broadcast_to(starts[:, None, :], vecF.shape)  # (B, NH, S)
    if f_sharding is not None:
        starts = jax.sharding.reshard(starts, f_sharding)
    return jnp.where(starts, -jnp.inf, vecF)


def pad_steps(matQ, matK, matV, vecI, vecF, padded_len: int):
    """The inputs padded along S to padded_len with steps that neither write (ĩ = −∞, zero q, k, v) nor decay
    (f̃ = +∞, log σ = 0) the state: the last states and every real step's output are unchanged."""
    extra = padded_len - matQ.shape[2]
    pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3), constant_values=value)
    return pad(matQ, 0), pad(matK, 0), pad(matV, 0), pad(vecI, -jnp.inf), pad(vecF, jnp.inf)
