"""`pallas_mlstm.mlstm_chunkwise` end to end against the recurrent oracles of both cells, for every --backend."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import ORACLE_TOLERANCE, kernel_and_oracle_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import (
    INPUT_NAMES,
    case_key,
    extreme_gates,
    grid,
    mlstm_inputs,
    outputs_and_grads,
    plain_loss,
    scale_blind_loss,
    skip_unless_available,
    to_dtype,
)

# The cell: mLSTMexp (exponential input gate, states (c, n, m)) or mLSTMsig (sigmoid input gate, states (c, n);
# with normalize=False h is the plain C readout)
CELLS = {
    "exponential": {},
    "sigmoid": dict(input_gate="sigmoid"),
    "sigmoid-unnormalized": dict(input_gate="sigmoid", normalize=False),
}
# (B, NH, S, DHQK, DHHV, chunk)
SHAPES = {
    "S64-L16": (1, 2, 64, 16, 32, 16),
    "S128-L32-padded": (2, 1, 128, 24, 48, 32),
    # any S: padded inside mlstm_chunkwise to a multiple of the chunk (None: the default chunk)
    "S1": (1, 2, 1, 16, 32, 16),
    "S17-chunk+1": (1, 2, 17, 16, 32, 16),
    "S37-prime": (2, 1, 37, 24, 16, None),
    # S = 70 padded to 80, DHQK = 24 to 32, with tests.helpers.extreme_gates: resets at the first step and on
    # a chunk edge, a silent token, gates of ±30 and 1e4 (the sigmoid cells' case)
    "S70-L16-padded-extreme-gates": (2, 1, 70, 24, 32, 16),
}
# float64 through the xla backend: the chunkwise form is the cell, to rounding
FLOAT64_TOLERANCE = 1e-12


def _backend_dtype_params():
    params = []
    for backend in test_flags.BACKEND.value:
        for dtype in [jnp.float32, jnp.bfloat16, jnp.float16] if grid(backend) == "triton" else [jnp.float32]:
            params.append(pytest.param(backend, dtype, id=f"{backend}-{jnp.dtype(dtype).name}"))
    return params


def _tolerance(backend, dtype):
    """(forward, gradient) bounds against the float64 oracle (pallas_mlstm.accuracy.ORACLE_TOLERANCE)."""
    if jnp.dtype(dtype) == jnp.float64:
        return FLOAT64_TOLERANCE, FLOAT64_TOLERANCE
    return ORACLE_TOLERANCE[backend, jnp.dtype(dtype).name]


# The exponential cell's rows per backend, (shape, with_initial). triton: both with and without initial states where
# the chunks are whole (S64) and where head dims and S are padded (S128); the odd lengths only with initial states
# (the states' code path is the same at every S). xla, on the CPU: whole chunks without initial states, padding with
# them, and the odd lengths. S is padded before any backend runs, and the interpreter runs the same launchers as
# triton (tests/test_kernels.py tests each kernel against its twin), so it takes one padded shape with states and
# one odd length with the default chunk, without.
_ALL_EXPONENTIAL_ROWS = [
    ("S64-L16", False),
    ("S64-L16", True),
    ("S128-L32-padded", False),
    ("S128-L32-padded", True),
    ("S1", True),
    ("S17-chunk+1", True),
    ("S37-prime", True),
]
_EXPONENTIAL_ROWS = {
    "interpret": [("S128-L32-padded", True), ("S37-prime", False)],
    "xla": [row for row in _ALL_EXPONENTIAL_ROWS if row not in (("S64-L16", True), ("S128-L32-padded", False))],
    "triton": _ALL_EXPONENTIAL_ROWS,
}


def _oracle_params():
    """(backend, dtype, shape, cell, with_initial). The exponential cell: the rows of _EXPONENTIAL_ROWS in each
    backend's production dtypes. The sigmoid cells: the extreme-gates case with initial states (their absence is
    the exponential rows' and tests/test_decoding.py's prompts'); xla in float64 (the math, to rounding; the
    interpreter runs the same kernels' float32 path), the interpreter and triton in their production dtypes. The
    interpreter leaves out sigmoid-unnormalized: the cell differs from sigmoid's only in parallel_fw_Hintra, whose
    interpreted kernel tests/test_kernels.py checks in that cell, and in values, which xla's float64 row follows
    through the same orchestration."""
    params = []
    for backend in test_flags.BACKEND.value:
        for cell in CELLS:
            if cell == "exponential":
                dtypes = [jnp.float32, jnp.bfloat16, jnp.float16] if grid(backend) == "triton" else [jnp.float32]
                rows = _EXPONENTIAL_ROWS[grid(backend)]
            elif cell == "sigmoid-unnormalized" and grid(backend) == "interpret":
                continue
            else:
                dtypes = {"triton": [jnp.float32, jnp.bfloat16], "xla": [jnp.float64]}.get(grid(backend), [jnp.float32])
                rows = [("S70-L16-padded-extreme-gates", True)]
            for dtype in dtypes:
                for shape, with_initial in rows:
                    initial = "initial" if with_initial else "no-initial"
                    case_id = f"{backend}-{jnp.dtype(dtype).name}-{shape}-{cell}-{initial}"
                    params.append(pytest.param(backend, dtype, shape, cell, with_initial, id=case_id))
    return params


def _oracle(cell):
    """The float64 recurrent oracle of `cell` with the kernels' gradient (the normaliser and m held constant;
    for the sigmoid cell with normalize=False that is plain autodiff of the cell)."""
    if cell == "exponential":
        return lambda *a: reference.mlstm_recurrent(*a, return_last_states=True, kernel_gradient_semantics=True)
    normalize = CELLS[cell].get("normalize", True)
    return lambda *a: reference.mlstm_sigmoid_recurrent(
        *a, normalize=normalize, return_last_states=True, kernel_gradient_semantics=True
    )


@pytest.mark.parametrize("backend,dtype,shape,cell,with_initial", _oracle_params())
def test_forward_last_states_and_gradients_match_oracle(backend, dtype, shape, cell, with_initial):
    """h, the last states (c, n, m; (c, n) for the sigmoid gate) and the gradients of a loss on h, c_last and
    n_last, against the float64 recurrent oracle of the cell on the same input values."""
    skip_unless_available(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES[shape]
    fw_tol, grad_tol = _tolerance(backend, dtype)
    num_inputs = 8 if cell == "exponential" else 7  # the sigmoid gate has no m_initial
    key = case_key("api", backend, with_initial, shape, *(() if cell == "exponential" else (cell,)))
    float64 = jnp.dtype(dtype) == jnp.float64
    with jax.enable_x64(True):
        inputs64 = mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=with_initial)
        if shape.endswith("extreme-gates"):
            inputs64 = (*inputs64[:3], *extreme_gates(*inputs64[3:5]), *inputs64[5:])
        inputs, inputs64 = (inputs64, inputs64) if float64 else kernel_and_oracle_inputs(inputs64, dtype)
        inputs, inputs64 = inputs[:num_inputs], inputs64[:num_inputs]
        weights_key = jax.random.fold_in(key, 7)
        oracle = _oracle(cell)
        (h_ref, last_ref), grads_ref = outputs_and_grads(plain_loss, oracle, weights_key, inputs64)
    with jax.enable_x64(float64):
        fn = lambda *a: pallas_mlstm.mlstm_chunkwise(
            *a, chunk_size=chunk, backend=backend, return_last_states=True, **CELLS[cell]
        )
        (h, last), grads = outputs_and_grads(plain_loss, fn, weights_key, inputs)
    assert h.dtype == dtype and h.shape == (batch, heads, seq_len, dhhv)
    assert rel_err(h, h_ref) <= fw_tol
    assert len(last) == (3 if cell == "exponential" else 2), "the sigmoid gate's states are (c, n)"
    for part, actual, expected in zip("cnm", last, last_ref):
        assert actual.dtype == jnp.promote_types(dtype, jnp.float32), part
        assert rel_err(actual, expected) <= fw_tol, part
    for name, expected in grads_ref.items():
        assert grads[name].dtype == inputs[INPUT_NAMES.index(name)].dtype, name
        assert jnp.all(jnp.isfinite(grads[name])), name
        if name == "f" and not jnp.any(expected):
            # S = 1 from a zero state: df̃ is exactly 0, a cancellation of Σ q·dq − k·dk that leaves float32
            # rounding; bound it by the scale of dĩ, which sums the same products
            assert jnp.max(jnp.abs(grads[name])) <= grad_tol * jnp.max(jnp.abs(grads["i"])), name
            continue
        assert rel_err(grads[name], expected) <= grad_tol, name


# the chaining is the orchestration's, whatever the kernels: the interpreter adds time, not coverage
@pytest.mark.parametrize("cell", ["exponential", "sigmoid"])
@pytest.mark.parametrize("backend", [b for b in test_flags.BACKEND.value if grid(b) != "interpret"])
def test_state_passing_two_calls_equal_one(backend, cell):
    """Two calls chained through return_last_states ((c, n, m); (c, n) with the sigmoid gate) equal one call
    over both halves: h, last states and the gradients of every input."""
    skip_unless_available(backend)
    num_inputs = 8 if cell == "exponential" else 7
    inputs = mlstm_inputs(case_key(f"{cell}-passing", backend), 1, 2, 64, 16, 32, with_initial=True)[:num_inputs]
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(
        *a, chunk_size=16, backend=backend, return_last_states=True, **CELLS[cell]
    )

    def chained(q, k, v, i, f, *initial):
        half = lambda x: (x[:, :, :32], x[:, :, 32:])
        (q1, q2), (k1, k2), (v1, v2), (i1, i2), (f1, f2) = map(half, (q, k, v, i, f))
        h1, states = run(q1, k1, v1, i1, f1, *initial)
        h2, last = run(q2, k2, v2, i2, f2, *states)
        return jnp.concatenate([h1, h2], axis=2), last

    key = case_key(f"{cell}-passing-weights")
    (h_one, last_one), grads_one = outputs_and_grads(plain_loss, run, key, inputs)
    (h_two, last_two), grads_two = outputs_and_grads(plain_loss, chained, key, inputs)
    assert rel_err(h_two, h_one) <= 1e-5
    assert len(last_two) == len(last_one) == num_inputs - 5
    for part, a, e in zip("cnm", last_two, last_one):
        assert rel_err(a, e) <= 1e-5, part
    for name, expected in grads_one.items():
        assert rel_err(grads_two[name], expected) <= 1e-5, name


# the interpreter's kernels at chunk 1024 are tests/test_kernels.py's L1024 case; xla checks the orchestration
@pytest.mark.parametrize("backend,dtype", [p for p in _backend_dtype_params() if grid(p.values[0]) != "interpret"])
def test_chunk_1024_with_initial_states(backend, dtype):
    """Chunks far above 128 (upstream's backward is wrong there for S >= 2 chunks): forward and gradients."""
    skip_unless_available(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = 1, 2, 2048, 16, 32, 1024
    fw_tol, grad_tol = _tolerance(backend, dtype)
    key = case_key("chunk1024", backend)
    with jax.enable_x64(True):
        # forget gates ~ +6: a memory of ~400 steps, so that the initial state still matters at the end
        inputs, inputs64 = kernel_and_oracle_inputs(
            mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=True, fgate_shift=6.0), dtype
        )
        weights_key = jax.random.fold_in(key, 7)
        oracle = lambda *a: reference.mlstm_recurrent(*a, return_last_states=True, kernel_gradient_semantics=True)
        (h_ref, _), grads_ref = outputs_and_grads(plain_loss, oracle, weights_key, inputs64)
    config = pallas_mlstm.ChunkwiseConfig(chunk_size=chunk, siz_b_L_parallel=128, siz_b_L_loop=128)
    fn = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, backend=backend, config=config, return_last_states=True)
    (h, _), grads = outputs_and_grads(plain_loss, fn, weights_key, inputs)
    assert rel_err(h, h_ref) <= fw_tol
    for name, expected in grads_ref.items():
        assert rel_err(grads[name], expected) <= grad_tol, name


# The GPU kernels (the xla backend: tests/test_reference.py checks the same in float64, to 1e-8; the interpreter's
# kernels equal their xla twins, tests/test_kernels.py)
@pytest.mark.parametrize(
    "backend,dtype", [p for p in _backend_dtype_params() if grid(p.values[0]) not in ("xla", "interpret")]
)
def test_gradients_exact_for_scale_blind_loss(backend, dtype):
    """Against plain autodiff of the recurrent cell (no gradient stopped), incl. m_initial and c_last."""
    skip_unless_available(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES["S64-L16"]
    key = case_key("api-blind", backend)
    with jax.enable_x64(True):
        inputs, inputs64 = kernel_and_oracle_inputs(
            mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=True), dtype
        )
        weights_key = jax.random.fold_in(key, 7)
        oracle = lambda *a: reference.mlstm_recurrent(*a, return_last_states=True)
        _, grads_ref = outputs_and_grads(scale_blind_loss, oracle, weights_key, inputs64)
    fn = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=chunk, backend=backend, return_last_states=True)
    _, grads = outputs_and_grads(scale_blind_loss, fn, weights_key, inputs)
    for name, expected in grads_ref.items():
        if name != "n_initial":  # ~0 in both: n reaches h only through the normaliser
            assert rel_err(grads[name], expected) <= _tolerance(backend, dtype)[1], name


@pytest.mark.parametrize("backend", test_flags.BACKEND.value)
def test_jit_checkpoint_and_vmap(backend):
    skip_unless_available(backend)
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES["S64-L16"]
    inputs = mlstm_inputs(case_key("transforms", backend), batch, heads, seq_len, dhqk, dhhv)[:5]
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=chunk, backend=backend)
    loss = lambda *a: jnp.sum(run(*a) ** 2)
    if grid(backend) != "interpret":  # remat wraps the custom VJP alike whatever its kernels: xla checks it on CPU
        expected = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)
        checkpointed = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3, 4)))(*inputs)
        for name, a, e in zip(INPUT_NAMES, checkpointed, expected):
            assert rel_err(a, e) <= 1e-6, name
    # vmap over an extra leading axis == the op on each element (jitted: one compile each, not one per operation)
    stacked = [jnp.stack([x, x[::-1] * 0.5 + 0.1]) for x in inputs]
    batched, batched_grads = jax.jit(lambda *a: (jax.vmap(run)(*a), jax.vmap(jax.grad(loss, argnums=(0, 4)))(*a)))(
        *stacked
    )
    one = jax.jit(lambda *x: (run(*x), jax.grad(loss, argnums=(0, 4))(*x)))  # one program for both elements
    looped = [one(*x) for x in zip(*stacked)]
    for index in range(2):
        assert rel_err(batched[index], looped[index][0]) <= 1e-6
        for a, e in zip(batched_grads, looped[index][1]):
            assert rel_err(a[index], e) <= 1e-6


def test_vmap_folds_into_batch():
    """jax.vmap of the op (and its gradient) on one device equals the op per mapped element."""
    keys = jax.random.split(jax.random.key(test_flags.SEED.value), 5)
    shape = (2, 3, 2, 64)
    q, k = jax.random.normal(keys[0], (*shape, 16)), jax.random.normal(keys[1], (*shape, 16))
    v, i, f = (
        jax.random.normal(keys[2], (*shape, 32)),
        jax.random.normal(keys[3], shape),
        3 + jax.random.normal(keys[4], shape),
    )
    cell = lambda q, k, v, i, f: pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend="xla", chunk_size=16)
    loss = lambda q, f: jnp.sum(jax.vmap(cell, in_axes=(0, None, 0, 0, 0))(q, k[0], v, i, f) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, f)
    per_element = jax.jit(jax.grad(lambda q, v, i, f: jnp.sum(cell(q, k[0], v, i, f) ** 2), argnums=(0, 3)))
    for index in range(shape[0]):
        one = per_element(q[index], v[index], i[index], f[index])
        for got, expected in zip(grads, one):
            np.testing.assert_allclose(got[index], expected, rtol=1e-5, atol=1e-6)


def test_autocast_keeps_output_dtype_and_accuracy():
    batch, heads, seq_len, dhqk, dhhv, chunk = SHAPES["S64-L16"]
    inputs = mlstm_inputs(case_key("autocast"), batch, heads, seq_len, dhqk, dhhv)[:5]
    h32 = pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=chunk, backend="xla")
    h16 = pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=chunk, backend="xla", autocast_kernel_dtype=jnp.bfloat16)
    assert h16.dtype == jnp.float32
    q, k, v = to_dtype(inputs[:3], jnp.bfloat16)
    pre_cast = pallas_mlstm.mlstm_chunkwise(q, k, v, *inputs[3:], chunk_size=chunk, backend="xla")
    np.testing.assert_array_equal(h16, pre_cast.astype(jnp.float32))
    assert 1e-4 < rel_err(h16, h32) <= 2e-2  # really computed from bf16 operands


def test_default_backend_and_chunk_size():
    inputs = mlstm_inputs(case_key("defaults"), 1, 2, 96, 16, 16)[:5]
    expected_backend = "triton" if jax.default_backend() == "gpu" else "xla"
    assert pallas_mlstm.resolve_backend(None) == expected_backend
    h = pallas_mlstm.mlstm_chunkwise(*inputs)  # S=96: default chunk 128, S padded to 128
    np.testing.assert_allclose(
        h, pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=32, backend="xla"), rtol=2e-5, atol=2e-5
    )


def test_states_kept_for_the_backward_by_default_on_one_device():
    """recompute_states_in_bw=None (the default) keeps the chunk states on one device: the backward runs the
    recurrent forward kernel no second time, as with False; True runs it again (counted in the interpreter's
    program, whose kernels are named). Gradients agree (on xla: the orchestration is the same for every backend)."""
    if jax.device_count() != 1:
        pytest.skip("the default keeps states where the sequence axis is known to be whole: one device here")
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(7), 1, 2, 64, 16, 16, jnp.float32)
    grads, launches = {}, {}
    for recompute in (None, False, True):
        grad = lambda backend, recompute=recompute: jax.grad(
            lambda *x: jnp.sum(
                pallas_mlstm.mlstm_chunkwise(*x, backend=backend, chunk_size=16, recompute_states_in_bw=recompute) ** 2
            ),
            argnums=(0, 1, 2, 3, 4),
        )
        launches[recompute] = str(jax.make_jaxpr(grad("interpret"))(q, k, v, i, f)).count(
            "mlstm_chunkwise__recurrent_fw_C"
        )
        grads[recompute] = jax.jit(grad("xla"))(q, k, v, i, f)
    assert launches[None] == launches[False] > 0 and launches[True] == 2 * launches[False]
    for recompute in (None, True):
        for a, b in zip(grads[recompute], grads[False]):
            assert rel_err(a, b) <= 1e-6


_SECOND_CALL_COMPILES = """
import jax, jax.numpy as jnp, pallas_mlstm
from pallas_mlstm.accuracy import mlstm_inputs
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None
)
q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(0), 1, 2, 32, 16, 16)
for backend in ("interpret", "xla"):
    jax.block_until_ready(pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend=backend))
before = len(compiles)
for backend in ("interpret", "xla"):
    jax.block_until_ready(pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend=backend))
print(len(compiles) - before)
"""


def test_a_repeated_call_outside_jit_compiles_nothing():
    """In a fresh process (the first Pallas interpreter lowering of a process is what once invalidated every earlier
    compilation), calling the op again outside jit, on the interpreter and on xla, compiles nothing."""
    # without the tests' compilation cache (tests/conftest.py), where a second compilation would be a cache hit
    env = {name: value for name, value in os.environ.items() if name != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", _SECOND_CALL_COMPILES], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "0", done.stdout
