"""mLSTMsig: `mlstm_chunkwise(..., input_gate="sigmoid", normalize=...)` against the float64 sigmoid oracles
(reference/sigmoid.py), for every --backend: forward, last states (C, n) and the gradients of every input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import ORACLE_TOLERANCE, kernel_and_oracle_inputs, mlstm_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import case_key

NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial")
# (B, NH, S, DHQK, DHHV, chunk): S = 70 is padded to 80, DHQK = 24 to 32 in the Pallas kernels
SHAPE = (2, 1, 70, 24, 32, 16)
# float64 through the xla backend: the chunkwise form is the cell, to rounding
FLOAT64_TOLERANCE = 1e-12


def _skip_without_gpu(backend):
    if backend == "triton" and jax.default_backend() != "gpu":
        pytest.skip("the triton backend needs a GPU; run with --backend=triton on the GPU machine")


def _tolerance(backend, dtype):
    if jnp.dtype(dtype) == jnp.float64:
        return FLOAT64_TOLERANCE, FLOAT64_TOLERANCE
    return ORACLE_TOLERANCE[backend, jnp.dtype(dtype).name]


def _params():
    """(backend, dtype, with_initial): float64 on xla with and without initial states (the math, to rounding),
    the production dtypes of each backend with them (the interpreter is slow: one case per normalize)."""
    params = []
    for backend in test_flags.BACKEND.value:
        # xla in float64 only: the interpreter runs the same kernels' float32 path
        dtypes = {"triton": [jnp.float32, jnp.bfloat16], "xla": [jnp.float64]}.get(backend, [jnp.float32])
        for dtype in dtypes:
            for with_initial in ((False, True) if jnp.dtype(dtype) == jnp.float64 else (True,)):
                params.append(pytest.param(backend, dtype, with_initial,
                                           id=f"{backend}-{jnp.dtype(dtype).name}-initial{with_initial}"))
    return params


def _extreme_gates(i, f):
    """Gates a user may pass: hard resets (f̃ = −∞, one at the first step, one on a chunk boundary), a silent token
    (ĩ = −∞), saturated gates (±30, ±1e4) and a near-reset (f̃ = −30)."""
    f = f.at[..., jnp.array([0, 16, 41])].set(-jnp.inf).at[..., 9].set(-30.0).at[..., 50].set(1e4)
    i = i.at[..., 7].set(-jnp.inf).at[..., 12].set(30.0).at[..., 33].set(-30.0).at[..., 60].set(1e4)
    return i, f


def _inputs(key, dtype, with_initial: bool):
    """(kernel inputs, float64 oracle inputs): q, k, v, i, f[, c_initial, n_initial]."""
    batch, heads, seq_len, dhqk, dhhv, _ = SHAPE
    inputs64 = mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.float64, with_initial=with_initial)[:7]
    i, f = _extreme_gates(*inputs64[3:5])
    inputs64 = (*inputs64[:3], i, f, *inputs64[5:])
    if jnp.dtype(dtype) == jnp.float64:
        return inputs64, inputs64
    inputs, inputs64 = kernel_and_oracle_inputs((*inputs64, None), dtype)
    return inputs[:7], inputs64[:7]


def _loss(fn, weights_key):
    """Σ w·h + Σ w_c·c_last + Σ w_n·n_last: not scale-blind, so normalize=True is checked against the oracle
    that holds the denominator constant."""

    def loss(*args):
        h, (c_last, n_last) = fn(*args)
        weights = [jax.random.normal(jax.random.fold_in(weights_key, index), x.shape, jnp.float32).astype(
            jnp.promote_types(x.dtype, jnp.float32)) for index, x in enumerate((h, c_last, n_last))]
        wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return sum(jnp.sum(w * wide(x)) for w, x in zip(weights, (h, c_last, n_last)))

    return loss


def _grads(loss, inputs):
    argnums = tuple(index for index, x in enumerate(inputs) if x is not None)
    return dict(zip([NAMES[index] for index in argnums], jax.grad(loss, argnums=argnums)(*inputs)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend,dtype,with_initial", _params())
def test_sigmoid_gate_matches_oracle(backend, dtype, normalize, with_initial):
    """h, (c_last, n_last) and every gradient. normalize=True: the denominator held constant, as for the
    exponential gate; normalize=False: exact, plain autodiff of the recurrent cell."""
    _skip_without_gpu(backend)
    chunk = SHAPE[5]
    fw_tol, grad_tol = _tolerance(backend, dtype)
    key = case_key("sigmoid", backend, normalize, with_initial)
    with jax.enable_x64(True):
        inputs, inputs64 = _inputs(key, dtype, with_initial)
        oracle = lambda *a: reference.mlstm_sigmoid_recurrent(
            *a, normalize=normalize, return_last_states=True, kernel_gradient_semantics=True)
        h_ref, last_ref = oracle(*inputs64)
        grads_ref = _grads(_loss(oracle, key), inputs64)
        # the quadratic form agrees: the oracle itself is not the thing under test here
        assert rel_err(reference.mlstm_sigmoid_parallel(*inputs64, normalize=normalize), h_ref) <= 1e-12
        fn = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(
            *a, chunk_size=chunk, backend=backend, return_last_states=True, input_gate="sigmoid",
            normalize=normalize))
        h, last = fn(*inputs)
        assert h.dtype == inputs[0].dtype and h.shape == h_ref.shape
        assert len(last) == 2, "the sigmoid gate's states are (c, n)"
        assert rel_err(h, h_ref) <= fw_tol
        for part, actual, expected in zip("cn", last, last_ref):
            assert rel_err(actual, expected) <= fw_tol, part
        grads = _grads(_loss(fn, key), inputs)
    for name, expected in grads_ref.items():
        assert jnp.all(jnp.isfinite(grads[name])), name
        assert rel_err(grads[name], expected) <= grad_tol, name


# the chaining is the orchestration's, whatever the kernels: the interpreter adds time, not coverage
@pytest.mark.parametrize("backend", [b for b in test_flags.BACKEND.value if b != "interpret"])
def test_sigmoid_state_passing(backend):
    """Two calls chained through return_last_states (c, n) equal one call over both halves: h, states, gradients."""
    _skip_without_gpu(backend)
    inputs = mlstm_inputs(case_key("sigmoid-passing", backend), 1, 2, 64, 16, 32, with_initial=True)[:7]
    run = lambda *a, **kw: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend=backend, return_last_states=True,
                                                        input_gate="sigmoid", **kw)

    def chained(q, k, v, i, f, c0, n0):
        half = lambda x: (x[:, :, :32], x[:, :, 32:])
        (q1, q2), (k1, k2), (v1, v2), (i1, i2), (f1, f2) = map(half, (q, k, v, i, f))
        h1, (c1, n1) = run(q1, k1, v1, i1, f1, c0, n0)
        h2, last = run(q2, k2, v2, i2, f2, c1, n1)
        return jnp.concatenate([h1, h2], axis=2), last

    key = case_key("sigmoid-passing-weights")
    h_one, last_one = run(*inputs)
    h_two, last_two = chained(*inputs)
    assert rel_err(h_two, h_one) <= 1e-5
    for part, a, e in zip("cn", last_two, last_one):
        assert rel_err(a, e) <= 1e-5, part
    grads_one = _grads(_loss(run, key), inputs)
    grads_two = _grads(_loss(chained, key), inputs)
    for name, expected in grads_one.items():
        assert rel_err(grads_two[name], expected) <= 1e-5, name


def test_sigmoid_segments_equal_one_pass():
    """segment_len (the long-sequence path) runs the sigmoid cell too: same h, states and gradients."""
    inputs = mlstm_inputs(case_key("sigmoid-segments"), 1, 2, 128, 16, 32, with_initial=True)[:7]
    run = lambda *a, **kw: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend="xla", return_last_states=True,
                                                        input_gate="sigmoid", normalize=False, **kw)
    segmented = lambda *a: run(*a, segment_len=32)
    key = case_key("sigmoid-segments-weights")
    for a, e in zip(jax.tree.leaves(segmented(*inputs)), jax.tree.leaves(run(*inputs))):
        assert rel_err(a, e) <= 1e-5
    grads, expected = _grads(_loss(segmented, key), inputs), _grads(_loss(run, key), inputs)
    for name in expected:
        assert rel_err(grads[name], expected[name]) <= 1e-5, name


def test_sigmoid_gate_tracks_no_max_state():
    """Every m the kernels keep stays 0 with the sigmoid gate (not with the exponential one). The jnp twins here;
    tests/test_kernels.py holds the Pallas kernels' m to theirs."""
    q, k, v, i, f = mlstm_inputs(case_key("sigmoid-m"), 1, 1, 32, 16, 16)[:5]
    for input_gate, stays_zero in (("sigmoid", True), ("exponential", False)):
        *_, scaM_all = pallas_mlstm.xla_kernels.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16,
                                                                                input_gate=input_gate)
        _, _, vecM_out = pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, chunk_size_intra=16, backend="xla",
                                                         input_gate=input_gate)[:3]
        assert bool(jnp.all(scaM_all == 0) & jnp.all(vecM_out == 0)) == stays_zero, input_gate


BAD_GATE_CALLS = {
    "m_initial with sigmoid": (dict(input_gate="sigmoid", with_m=True), "m_initial is not a state of the sigmoid"),
    "normalize with exponential": (dict(normalize=False), "normalize=False needs input_gate='sigmoid'"),
    "unknown gate": (dict(input_gate="sigmod"), "input_gate must be one of"),
    "normalize not bool": (dict(input_gate="sigmoid", normalize="no"), "normalize must be a bool"),
}


@pytest.mark.parametrize("case", BAD_GATE_CALLS)
def test_bad_gate_options_raise_value_error(case):
    kwargs, message = BAD_GATE_CALLS[case]
    kwargs = dict(kwargs)
    q, k, v, i, f, c, n, m = mlstm_inputs(case_key("sigmoid-bad"), 1, 2, 32, 16, 16, with_initial=True)
    states = (c, n, m) if kwargs.pop("with_m", False) else (c, n)
    with pytest.raises(ValueError, match=message):
        pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, *states, backend="xla", **kwargs)
    kernel_kwargs = {key: value for key, value in kwargs.items() if key in ("input_gate", "normalize")}
    if "m_initial" not in message:  # the orchestration and the kernels check the same options
        with pytest.raises(ValueError, match=message):
            pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, chunk_size_intra=16, backend="xla", **kernel_kwargs)
