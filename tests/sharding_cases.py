"""Sharded-vs-unsharded cases of `mlstm_chunkwise`, run in a process of its own with 4 CPU devices.

tests/test_sharding.py runs `python -m tests.sharding_cases BACKEND SEED CASE...` with
XLA_FLAGS=--xla_force_host_platform_device_count=4 and reads one JSON line per case from stdout:
relative errors of every output and gradient against one device and (unless the case has a plain
tolerance) against float64 (of the sharded and of the one-device result), the output shardings, and the
collectives of the compiled program (or the error a case expects).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_mlstm
from pallas_mlstm.accuracy import SHARDED_TOLERANCE, mlstm_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import case_key

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

B, NH, DHQK, DHHV, CHUNK = 4, 4, 16, 32, 16


@dataclasses.dataclass(frozen=True)
class Case:
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    lead_spec: tuple  # the spec of dims (B, NH, S)
    seq_len: int = 128
    explicit: bool = False  # Explicit mesh axes (sharding in the types) instead of Auto
    checkpoint: bool = False
    initial_states: bool = True
    user_shard_map: bool = False  # the user's own jax.shard_map around the call
    vmap: bool = False  # jax.vmap over a leading axis of 2
    kwargs: tuple = ()  # extra mlstm_chunkwise arguments
    infinite_gates: bool = False  # hard resets (f̃ = −∞) and silent tokens (ĩ = −∞), some at shard boundaries
    expect_error: str | None = None  # a phrase of the error the case must raise
    # a plain bound on every relative error vs one device, in place of SHARDED_TOLERANCE and its float64 fallback
    # (segments cut inside a shard differ from the one device's: the bound of segments vs one pass)
    tolerance: float | None = None

    @property
    def sigmoid(self) -> bool:  # mLSTMsig: no m_initial, last states (c, n)
        return dict(self.kwargs).get("input_gate") == "sigmoid"


# Batch and heads are sharded together (one code path: neither axis is cut inside a program); the sequence alone,
# over two axes and beside the batch (Explicit axes; on Auto axes the sequence alone and over two axes). A case may
# combine features that have separate code paths (vmap and sharding, remat and two axes): each is then caught
# there, at one compile instead of two.
CASES = {
    # Auto axes; under vmap the batch and heads are those of each mapped element (the plain call: one lead axis less)
    "batch_heads_vmap": Case((2, 2), ("b", "h"), ("b", "h", None), vmap=True),
    "batch_user_shard_map": Case((4,), ("b",), ("b", None, None), user_shard_map=True),
    "seq": Case((4,), ("s",), (None, None, "s"), seq_len=512, infinite_gates=True),
    "seq_two_axes_checkpoint": Case((2, 2), ("s", "t"), (None, None, ("s", "t")), seq_len=256, checkpoint=True),
    "batch_seq_explicit": Case((2, 2), ("b", "s"), ("b", None, "s"), explicit=True),
    "seq_chunk_too_large": Case(
        (4,),
        ("s",),
        (None, None, "s"),
        seq_len=64,
        kwargs=(("chunk_size", 32),),
        expect_error="chunk_size=32 does not divide",
    ),
    "seq_saved_states": Case(
        (4,),
        ("s",),
        (None, None, "s"),
        kwargs=(("recompute_states_in_bw", False),),
        expect_error="recompute_states_in_bw=False cannot be combined",
    ),
    # Explicit axes: each shard keeps its own chunk states for the backward (recompute_states_in_bw None)
    "seq_explicit": Case((4,), ("s",), (None, None, "s"), seq_len=512, explicit=True, infinite_gates=True),
    # mLSTMsig: context parallelism brings each shard's start state to its true scale (the kernels track no m)
    "seq_sigmoid": Case(
        (4,), ("s",), (None, None, "s"), seq_len=512, infinite_gates=True, kwargs=(("input_gate", "sigmoid"),)
    ),
    "batch_seq_sigmoid_unnormalized_explicit": Case(
        (2, 2), ("b", "s"), ("b", None, "s"), explicit=True, kwargs=(("input_gate", "sigmoid"), ("normalize", False))
    ),
    # segment_len inside shards, within tests/test_segments.py's bound of segments vs one pass. Sequence shards of
    # 96 steps, which segment_len=64 does not divide: each runs segments of 48 (with hard resets and silent
    # tokens, some on shard and segment edges)
    "seq_segments_cut": Case(
        (4,), ("s",), (None, None, "s"), seq_len=384, infinite_gates=True, kwargs=(("segment_len", 64),), tolerance=1e-5
    ),
    # segments longer than a shard: one pass per shard
    "seq_segments_longer": Case(
        (4,), ("s",), (None, None, "s"), seq_len=512, kwargs=(("segment_len", 256),), tolerance=1e-5
    ),
    # Explicit axes: each shard keeps its own segment starts where it cuts segments of segment_len, else recomputes
    "seq_segments_explicit": Case(
        (4,), ("s",), (None, None, "s"), seq_len=512, explicit=True, kwargs=(("segment_len", 64),), tolerance=1e-5
    ),
    "seq_segments_cut_explicit": Case(
        (4,), ("s",), (None, None, "s"), seq_len=384, explicit=True, kwargs=(("segment_len", 64),), tolerance=1e-5
    ),
    # segments inside batch / head shards over Explicit axes: the segments' initial states pass from forward to
    # backward
    "batch_heads_segments_explicit": Case(
        (2, 2),
        ("b", "h"),
        ("b", "h", None),
        explicit=True,
        kwargs=(("segment_len", 32), ("recompute_states_in_bw", False)),
        tolerance=1e-5,
    ),
}

_NAMES = ("h", "c_last", "n_last", "m_last", "dq", "dk", "dv", "di", "df", "dc_initial", "dn_initial", "dm_initial")


def _inputs(name: str, case: Case):
    """q, k, v, i, f (and the initial states), with an extra leading axis of 2 for `case.vmap`; loss weights."""
    draw = lambda key: mlstm_inputs(key, B, NH, case.seq_len, DHQK, DHHV, with_initial=case.initial_states)
    key = case_key("sharding", name)
    if case.vmap:
        arrays = jax.tree.map(lambda *x: jnp.stack(x), draw(key), draw(jax.random.fold_in(key, 1)))
    else:
        arrays = draw(key)
    arrays = [x for x in arrays if x is not None][: 7 if case.sigmoid else None]
    if case.infinite_gates:  # shards of 128 steps: resets at a shard's last and next shard's first step, too
        arrays[4] = arrays[4].at[..., jnp.array([0, 127, 128, 300, 301])].set(-jnp.inf)
        arrays[3] = arrays[3].at[..., jnp.array([5, 129, 400])].set(-jnp.inf)
    keys = jax.random.split(jax.random.fold_in(key, 2))
    lead = arrays[0].shape[:-4]
    weights = (
        jax.random.normal(keys[0], (*lead, B, NH, case.seq_len, DHHV)),
        jax.random.normal(keys[1], (*lead, B, NH, DHQK, DHHV)),
    )
    return arrays, weights


def _loss_and_grads(case: Case, backend: str, weights, mesh=None):
    """(h, last states) and the gradients of a loss blind to per-step rescaling of h (docs/math.md §4.1).

    With `mesh` and `case.user_shard_map`, the cell runs inside the user's own `jax.shard_map`.
    """
    kwargs = {"chunk_size": CHUNK, **dict(case.kwargs)}

    def cell(*arrays):
        return pallas_mlstm.mlstm_chunkwise(*arrays, backend=backend, return_last_states=True, **kwargs)

    if case.vmap:
        cell = jax.vmap(cell)
    if case.user_shard_map and mesh is not None:
        seq_spec, state_spec = P(*case.lead_spec), P(*case.lead_spec[:2])
        in_specs = (seq_spec,) * 5 + (state_spec,) * (3 if case.initial_states else 0)
        cell = jax.shard_map(
            cell, mesh=mesh, in_specs=in_specs, out_specs=(seq_spec, (state_spec,) * 3), check_vma=False
        )

    def loss(*arrays):
        h, (c, n, *m) = cell(*arrays)  # m: none with the sigmoid gate
        w_h, w_c = weights
        value = jnp.sum(w_h * h / jnp.linalg.norm(h, axis=-1, keepdims=True)) + 0.1 * jnp.sum(w_c * c) + jnp.sum(n)
        return value, (h, c, n, *m)

    if case.checkpoint:
        loss = jax.checkpoint(loss)
    num_inputs = (7 if case.sigmoid else 8) if case.initial_states else 5
    return jax.value_and_grad(loss, argnums=tuple(range(num_inputs)), has_aux=True)


def _shard(case: Case, arrays, mesh):
    lead = (None,) if case.vmap else ()

    def put(x):
        rank = x.ndim - len(lead)
        spec = case.lead_spec if rank >= 3 and x.shape[len(lead) + 2] == case.seq_len else case.lead_spec[:2]
        return jax.device_put(x, NamedSharding(mesh, P(*lead, *spec)))

    return [put(x) for x in arrays]


_COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def _collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """(op, result shape) of every collective in a compiled HLO module (each operand of a tuple-shaped one)."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= (\(?[^=]*?\)?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(", line)
        if match:
            for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
                found.append((match.group(2), [int(d) for d in dims.split(",") if d]))
    return found


def run_case(name: str, backend: str) -> dict:
    """Runs one case; returns what the test checks."""
    case = CASES[name]
    arrays, weights = _inputs(name, case)
    axis_type = AxisType.Explicit if case.explicit else AxisType.Auto
    mesh = jax.make_mesh(case.mesh_shape, case.axis_names, axis_types=(axis_type,) * len(case.axis_names))
    sharded = _shard(case, arrays, mesh)
    fn = _loss_and_grads(case, backend, weights, mesh)
    result = {"case": name, "backend": backend}
    try:
        compiled = jax.jit(fn).lower(*sharded).compile()
        (_, outputs), grads = compiled(*sharded)
    except Exception as error:  # reported to the test, which checks it is the expected one
        if case.expect_error is None:
            raise
        result["error"] = f"{type(error).__name__}: {error}"
        return result
    (_, ref_outputs), ref_grads = jax.jit(_loss_and_grads(case, backend, weights))(*arrays)
    sharded_results, one_device = (*outputs, *grads), (*ref_outputs, *ref_grads)
    names = [n for n in _NAMES if not (case.sigmoid and n in ("m_last", "dm_initial"))]
    result["errors"] = {n: rel_err(a, b) for n, a, b in zip(names, sharded_results, one_device)}
    # the float64 truth (xla backend, one device), for the fallback of the bound where float32 is noisier than it
    if case.tolerance is None and max(result["errors"].values()) > SHARDED_TOLERANCE:
        with jax.enable_x64(True):
            wide = lambda xs: [jnp.asarray(np.asarray(x, np.float64)) for x in xs]
            (_, exact_outputs), exact_grads = jax.jit(_loss_and_grads(case, "xla", wide(weights)))(*wide(arrays))
            exact = [np.asarray(x) for x in (*exact_outputs, *exact_grads)]
        result["errors_f64"] = {n: rel_err(a, b) for n, a, b in zip(names, sharded_results, exact)}
        result["one_device_errors_f64"] = {n: rel_err(a, b) for n, a, b in zip(names, one_device, exact)}
    spec = lambda x, dims: str(tuple(x.sharding.spec)[:dims] + (None,) * (dims - len(x.sharding.spec)))
    lead = 1 if case.vmap else 0
    pairs = [
        ("h", outputs[0], sharded[0], 3),
        ("c_last", outputs[1], sharded[0], 2),
        *((f"d{n}", g, x, x.ndim - lead) for n, g, x in zip("qkvif", grads, sharded)),
    ]
    result["shardings"] = {n: [spec(y, lead + dims), spec(x, lead + dims)] for n, y, x, dims in pairs}
    result["collectives"] = _collectives(compiled.as_text())
    return result


def main(argv: list[str]) -> None:
    if jax.device_count() != 4:
        raise SystemExit(
            f"needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4); got {jax.device_count()}"
        )
    backend, seed, names = argv[0], argv[1], argv[2:]
    test_flags.FLAGS([sys.argv[0], f"--seed={seed}"])
    for name in names:
        print(json.dumps(run_case(name, backend)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
