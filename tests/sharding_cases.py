"""Sharded-vs-unsharded cases of `mlstm_chunkwise`, run in a process of its own with 4 CPU devices.

tests/test_sharding.py runs `python -m tests.sharding_cases SEED RUN...` once per session, with
XLA_FLAGS=--xla_force_host_platform_device_count=4; a RUN is BACKEND/CASE, or "documents_and_steps". It reads one
JSON line per run from stdout: for a case, relative errors of every output and gradient against one device and
(unless the case has a plain tolerance) against float64 (of the sharded and of the one-device result), the output
shardings, and the collectives of the compiled program (or the error a case expects); for documents_and_steps,
that it passed. A run that raises reports its traceback ("crash") and the next runs go on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import traceback
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


def documents_and_steps() -> dict:
    """Packed documents (`segment_ids`) under batch x sequence sharding, with documents that straddle the shard edge
    and one that starts on it; decoding steps with B and NH sharded; unsplit inputs inside jax.set_mesh (Explicit and
    Auto axes); the default chunk under Explicit sequence sharding: each equal to one device (AssertionError if
    not), on the xla backend."""
    batch, heads, seq_len, dk, dv = 2, 2, 128, 16, 16
    mesh = jax.make_mesh((2, 2), ("data", "seq"))
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(3), batch, heads, seq_len, dk, dv, jnp.float32)
    ids = np.zeros((batch, seq_len), np.int32)
    ids[0, 20:] += 1  # documents 20-49 and 50-69 straddle the shard edge at 64
    ids[0, 50:] += 1
    ids[0, 70:] += 1
    ids[1, 64:] += 1  # a document starting exactly at the shard edge
    ids = jnp.asarray(ids)
    w = jax.random.normal(jax.random.PRNGKey(4), (batch, heads, seq_len, dv), jnp.float32)

    def loss(q, k, v, i, f, ids):
        h = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="xla", segment_ids=ids)
        return jnp.sum(w * h)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    one_value, one_grads = jax.jit(grad)(q, k, v, i, f, ids)
    seq = NamedSharding(mesh, P("data", None, "seq"))
    put = lambda x: jax.device_put(x, seq if x.ndim >= 3 else NamedSharding(mesh, P("data", "seq")))
    value, grads = jax.jit(grad)(*map(put, (q, k, v, i, f, ids)))
    assert abs(float(value) - float(one_value)) <= 1e-5 * abs(float(one_value)), (value, one_value)
    for g, e in zip(grads, one_grads):
        assert rel_err(g, e) <= 1e-5, rel_err(g, e)

    # decoding steps with B and NH sharded
    mesh2 = jax.make_mesh((2, 2), ("data", "heads"))
    q1, k1, v1 = (x[:, :, 0] for x in (q, k, v))
    c = jax.random.normal(jax.random.PRNGKey(5), (batch, heads, dk, dv), jnp.float32)
    n = jax.random.normal(jax.random.PRNGKey(6), (batch, heads, dk), jnp.float32)
    m = jnp.zeros((batch, heads), jnp.float32)
    args = (q1, k1, v1, i[:, :, 0], f[:, :, 0], c, n, m)
    step = jax.jit(lambda *a: pallas_mlstm.mlstm_recurrent_step(*a, backend="xla"))
    expected = step(*args)
    actual = step(*(jax.device_put(x, NamedSharding(mesh2, P("data", "heads"))) for x in args))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert rel_err(a, e) <= 1e-6, rel_err(a, e)

    # unsplit inputs inside jax.set_mesh, on Explicit and on Auto axes: placed whole on the mesh, and uncommitted
    def plain(q, k, v, i, f):
        return jnp.sum(w * pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="xla"))

    plain_grad = jax.value_and_grad(plain, argnums=(0, 1, 2, 3, 4))
    one_value, one_grads = jax.jit(plain_grad)(q, k, v, i, f)
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh3 = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(kind, kind))
        for inputs in ((q, k, v, i, f), jax.device_put((q, k, v, i, f), NamedSharding(mesh3, P()))):
            with jax.set_mesh(mesh3):
                value, grads = jax.jit(plain_grad)(*inputs)
            assert abs(float(value) - float(one_value)) <= 1e-6 * abs(float(one_value)), (kind, value, one_value)
            for g, e in zip(grads, one_grads):
                assert rel_err(g, e) <= 1e-6, (kind, rel_err(g, e))

    # no chunk_size with S split over Explicit axes: the default (128 for S = 128) halved to divide a shard of 64
    mesh4 = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
    split = lambda x: jax.device_put(x, NamedSharding(mesh4, P("data", None, "seq")))
    default = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, backend="xla"))(*map(split, (q, k, v, i, f)))
    expected = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=64, backend="xla")
    assert rel_err(default, expected) <= 1e-6, rel_err(default, expected)
    return {"passed": True}


def main(argv: list[str]) -> None:
    if jax.device_count() != 4:
        raise SystemExit(
            f"needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4); got {jax.device_count()}"
        )
    seed, runs = argv[0], argv[1:]
    test_flags.FLAGS([sys.argv[0], f"--seed={seed}"])
    for run in runs:
        try:
            if run == "documents_and_steps":
                result = documents_and_steps()
            else:
                backend, name = run.split("/")
                result = run_case(name, backend)
        except Exception:
            result = {"crash": traceback.format_exc()[-6000:]}
        print(json.dumps({**result, "run": run}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
