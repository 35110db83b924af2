"""The oracles agree with each other and with the chunkwise form on the XLA backend; its custom backward is exact.

Both cells: the exponential input gate (reference.mlstm_recurrent / mlstm_parallel) and mLSTMsig, the sigmoid
input gate (reference/sigmoid.py), whose two oracles are also checked against a hand computation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import rel_err
from reference.sigmoid import mlstm_sigmoid_parallel, mlstm_sigmoid_recurrent
from tests.helpers import (
    case_key,
    extreme_gates,
    input_grads,
    mlstm_inputs,
    plain_loss,
    scale_blind_loss,
    to_dtype,
)

B, NH, DHQK, DHHV = 2, 2, 16, 24  # B·NH > 1, DHQK != DHHV
# (S, chunk, with_initial): the smallest and the largest chunk of the tests here (4 chunks each), with and without
# initial states (their code path is the same at every S)
FORWARD_CASES = [(64, 16, True), (512, 128, False)]


# Every computation here is jitted: one compile per function and shape, instead of one per operation.
@functools.partial(jax.jit, static_argnames=("chunk_size", "return_last_states"))
def _xla_chunkwise(*args, chunk_size, return_last_states=False):
    """The chunkwise form on the XLA backend (the jnp twins of the kernels, same orchestration and VJP)."""
    return pallas_mlstm.mlstm_chunkwise(
        *args, backend="xla", chunk_size=chunk_size, return_last_states=return_last_states
    )


_recurrent = jax.jit(reference.mlstm_recurrent, static_argnames=("return_last_states", "kernel_gradient_semantics"))
_parallel = jax.jit(reference.mlstm_parallel, static_argnames=("return_last_states",))
_sigmoid_recurrent = jax.jit(
    mlstm_sigmoid_recurrent, static_argnames=("normalize", "return_last_states", "kernel_gradient_semantics")
)
_sigmoid_parallel = jax.jit(mlstm_sigmoid_parallel, static_argnames=("normalize", "return_last_states"))


def _run_all(inputs, chunk_size):
    kw = dict(return_last_states=True)
    return {
        "recurrent": _recurrent(*inputs, **kw),
        "parallel": _parallel(*inputs, **kw),
        "chunkwise": _xla_chunkwise(*inputs, chunk_size=chunk_size, **kw),
    }


@pytest.mark.parametrize("seq_len,chunk_size,with_initial", FORWARD_CASES)
def test_forward_agreement_in_float64_and_float32(seq_len, chunk_size, with_initial):
    """The parallel and chunkwise forms equal the recurrent oracle in float64 (1e-10); each form in float32 stays
    within 1e-5 of it."""
    with jax.enable_x64(True):
        inputs64 = mlstm_inputs(
            case_key("fw64", seq_len, with_initial), B, NH, seq_len, DHQK, DHHV, jnp.float64, with_initial=with_initial
        )
        outs = _run_all(inputs64, chunk_size)
    h_ref, last_ref = outs["recurrent"]
    for name in ("parallel", "chunkwise"):
        h, last = outs[name]
        assert h.dtype == jnp.float64
        assert rel_err(h, h_ref) <= 1e-10, name
        for part, actual, expected in zip("cnm", last, last_ref):
            assert rel_err(actual, expected) <= 1e-10, (name, part)
    for name, (h, last) in _run_all(to_dtype(inputs64, jnp.float32), chunk_size).items():
        assert h.dtype == jnp.float32
        assert rel_err(h, h_ref) <= 1e-5, name
        for part, actual, expected in zip("cnm", last, last_ref):
            assert rel_err(actual, expected) <= 1e-5, (name, part)


def test_state_passing_four_pieces_equal_one_run():
    """float64, to 1e-10, the first piece without initial states (two calls from initial states, with gradients:
    tests/test_api.py)."""
    seq_len, chunk_size = 256, 32
    with jax.enable_x64(True):
        q, k, v, i, f, c, n, m = mlstm_inputs(case_key("pieces", False), B, NH, seq_len, DHQK, DHHV, jnp.float64)
        h_full, last_full = _xla_chunkwise(q, k, v, i, f, c, n, m, chunk_size=chunk_size, return_last_states=True)
        pieces = []
        for piece in np.split(np.arange(seq_len), 4):
            sl = slice(int(piece[0]), int(piece[-1]) + 1)
            h, (c, n, m) = _xla_chunkwise(
                q[:, :, sl],
                k[:, :, sl],
                v[:, :, sl],
                i[:, :, sl],
                f[:, :, sl],
                c,
                n,
                m,
                chunk_size=chunk_size,
                return_last_states=True,
            )
            pieces.append(h)
        assert rel_err(jnp.concatenate(pieces, axis=2), h_full) <= 1e-10
        for part, actual, expected in zip("cnm", (c, n, m), last_full):
            assert rel_err(actual, expected) <= 1e-10, part


@pytest.mark.parametrize("seq_len,chunk_size,with_initial", [(64, 16, False), (256, 64, True)])
def test_custom_backward_equals_autodiff_for_scale_blind_loss(seq_len, chunk_size, with_initial):
    """Exact gradients (incl. m_initial) for losses blind to per-step rescaling of h and c_last."""
    with jax.enable_x64(True):
        key = case_key("grad-blind", seq_len, with_initial)
        inputs = mlstm_inputs(key, B, NH, seq_len, DHQK, DHHV, jnp.float64, with_initial=with_initial)
        weights_key = jax.random.fold_in(key, 7)
        recurrent = lambda *a: _recurrent(*a, return_last_states=True)
        chunkwise = lambda *a: _xla_chunkwise(*a, chunk_size=chunk_size, return_last_states=True)
        expected = input_grads(scale_blind_loss(recurrent, True), weights_key, inputs)
        actual = input_grads(scale_blind_loss(chunkwise, True), weights_key, inputs)
        for name in expected:
            if name == "n_initial":
                # n enters h only through the normaliser, which a scale-blind loss cannot see: both ~0
                assert float(jnp.max(jnp.abs(actual[name]))) <= 1e-10
                assert float(jnp.max(jnp.abs(expected[name]))) <= 1e-10
                continue
            assert rel_err(actual[name], expected[name]) <= 1e-8, name


def test_custom_backward_equals_kernel_semantics_autodiff():
    """For any loss on h, c_last and n_last: autodiff of the recurrent form with m and den held constant. From initial
    states, so that every input has a gradient (the path without them: the scale-blind test's first case)."""
    seq_len, chunk_size = 128, 32
    with jax.enable_x64(True):
        key = case_key("grad-kernel", True)
        inputs = mlstm_inputs(key, B, NH, seq_len, DHQK, DHHV, jnp.float64, with_initial=True)
        weights_key = jax.random.fold_in(key, 7)
        recurrent = lambda *a: _recurrent(*a, return_last_states=True, kernel_gradient_semantics=True)
        chunkwise = lambda *a: _xla_chunkwise(*a, chunk_size=chunk_size, return_last_states=True)
        expected = input_grads(plain_loss(recurrent, True), weights_key, inputs)
        actual = input_grads(plain_loss(chunkwise, True), weights_key, inputs)
        for name in expected:
            assert rel_err(actual[name], expected[name]) <= 1e-8, name


EXTREME_GATES = {
    "input-gate-up-to+30": dict(igate_shift=15.0, fgate_shift=3.0, gate_scale=5.0),
    "forget-gate-down-to-30": dict(igate_shift=0.0, fgate_shift=-15.0, gate_scale=5.0),
    "both": dict(igate_shift=15.0, fgate_shift=-15.0, gate_scale=5.0),
}


@pytest.mark.parametrize("gates", EXTREME_GATES, ids=list(EXTREME_GATES))
def test_extreme_gates_finite_and_in_agreement(gates):
    """float64: as tight as the normal regime. float32: finite, and within 5e-2.

    This regime is ill-conditioned: rounding the inputs to float32 alone moves h by up to ~1e-3 (float64
    arithmetic). The chunkwise form adds the absolute rounding of the in-chunk log-decay cumsum, whose
    magnitude reaches L·|log σ(f̃)| ≈ 3800 here (measured 1.8e-2 for "both" at chunk 128, 5e-6 and 1.3e-3
    for the other two); docs/numerics.md documents it.
    """
    seq_len, chunk_size = 2048, 128
    with jax.enable_x64(True):
        key = case_key("extreme", gates)
        q, k, v, i, f, _, _, _ = mlstm_inputs(key, 1, 2, seq_len, DHQK, DHHV, jnp.float64, **EXTREME_GATES[gates])
        i, f = jnp.clip(i, -30.0, 30.0), jnp.clip(f, -30.0, 30.0)
        assert float(i.max()) >= 25.0 or float(f.min()) <= -25.0
        inputs = (q, k, v, i, f)
        h_ref = _recurrent(*inputs)
        h64 = _xla_chunkwise(*inputs, chunk_size=chunk_size)
        assert rel_err(h64, h_ref) <= 1e-10
        h32 = _xla_chunkwise(*to_dtype(inputs, jnp.float32), chunk_size=chunk_size)
        assert bool(jnp.all(jnp.isfinite(h32)))
        assert rel_err(h32, h_ref) <= 5e-2
        weights_key = jax.random.fold_in(key, 7)
        expected = input_grads(scale_blind_loss(_recurrent, False), weights_key, inputs)
        chunkwise = lambda *a: _xla_chunkwise(*a, chunk_size=chunk_size)
        actual = input_grads(scale_blind_loss(chunkwise, False), weights_key, inputs)
        for name in expected:
            assert bool(jnp.all(jnp.isfinite(actual[name]))), name
            assert rel_err(actual[name], expected[name]) <= 1e-8, name


# --- mLSTMsig (input_gate="sigmoid") --------------------------------------------------------------------------

# (normalize, with_initial, gates, S): "resets" (S = 24): resets, one of them first, and tokens that write nothing;
# "extreme" (S = 70): tests.helpers.extreme_gates, the inputs of tests/test_api.py's sigmoid cells
# (normalize, with_initial, gates, S): every pair of values of the three options in four cases (hard resets
# include normal gates between them)
SIGMOID_CASES = {
    "normalize-initial-resets": (True, True, "resets", 24),
    "resets": (False, False, "resets", 24),
    "normalize-extreme": (True, False, "extreme", 70),
    "initial-extreme": (False, True, "extreme", 70),
}
SIG_B, SIG_NH, SIG_DHQK, SIG_DHHV = 2, 2, 8, 12


def _sigmoid_inputs(name, with_initial, gates=None, seq_len=24):
    q, k, v, i, f, c0, n0, _ = mlstm_inputs(
        case_key("sigmoid", name, with_initial),
        SIG_B,
        SIG_NH,
        seq_len,
        SIG_DHQK,
        SIG_DHHV,
        jnp.float64,
        with_initial=with_initial,
    )
    if gates == "resets":
        f = f.at[..., jnp.array([0, 9, 15])].set(-jnp.inf)
        i = i.at[..., jnp.array([5, 9, 23])].set(-jnp.inf)
    elif gates == "extreme":
        i, f = extreme_gates(i, f)
    return q, k, v, i, f, c0, n0


@pytest.mark.parametrize("case", SIGMOID_CASES)
def test_sigmoid_recurrent_and_parallel_agree(case):
    """h, the last states and (without normalization, exact for any loss) every gradient, in float64."""
    normalize, with_initial, gates, seq_len = SIGMOID_CASES[case]
    with jax.enable_x64(True):
        inputs = _sigmoid_inputs("agree" if gates != "extreme" else case, with_initial, gates, seq_len)
        kwargs = dict(normalize=normalize, return_last_states=True)
        h, (c, n) = _sigmoid_recurrent(*inputs, **kwargs)
        h_ref, (c_ref, n_ref) = _sigmoid_parallel(*inputs, **kwargs)
        for got, expected in ((h, h_ref), (c, c_ref), (n, n_ref)):
            assert np.all(np.isfinite(got)) and rel_err(got, expected) <= 1e-12, rel_err(got, expected)
        weights = jax.random.normal(case_key("sigmoid-weights"), h.shape, jnp.float64)
        argnums = tuple(range(7 if with_initial else 5))
        grads = [
            jax.jit(jax.grad(lambda *a: jnp.sum(weights * cell(*a, normalize=normalize)), argnums=argnums))(*inputs)
            for cell in (mlstm_sigmoid_recurrent, mlstm_sigmoid_parallel)
        ]
        for got, expected in zip(*grads):
            assert np.all(np.isfinite(got)) and rel_err(got, expected) <= 1e-11, rel_err(got, expected)


def test_sigmoid_two_steps_by_hand():
    """S = 2, one head of width 1: the states and outputs written out."""
    q, k, v = jnp.array([2.0, -1.0]), jnp.array([0.5, 3.0]), jnp.array([1.5, -2.0])
    i, f = jnp.array([0.3, -1.2]), jnp.array([1.0, 0.4])
    sig = jax.nn.sigmoid
    c1 = sig(i[0]) * k[0] * v[0]
    n1 = sig(i[0]) * k[0]
    c2 = sig(f[1]) * c1 + sig(i[1]) * k[1] * v[1]
    n2 = sig(f[1]) * n1 + sig(i[1]) * k[1]
    expected = jnp.array([q[0] * c1 / (max(abs(q[0] * n1), 1.0) + 1e-6), q[1] * c2 / (max(abs(q[1] * n2), 1.0) + 1e-6)])
    shaped = lambda x, d=None: x.reshape(1, 1, 2) if d is None else x.reshape(1, 1, 2, 1)
    args = (shaped(q, 1), shaped(k, 1), shaped(v, 1), shaped(i), shaped(f))
    for cell in (mlstm_sigmoid_recurrent, mlstm_sigmoid_parallel):
        h, (c, n) = cell(*args, return_last_states=True)
        np.testing.assert_allclose(h.reshape(2), expected, rtol=1e-6)
        np.testing.assert_allclose((c.reshape(()), n.reshape(())), (c2, n2), rtol=1e-6)
        np.testing.assert_allclose(
            cell(*args, normalize=False).reshape(2), jnp.array([q[0] * c1, q[1] * c2]), rtol=1e-6
        )


def test_sigmoid_held_denominator_matches_autodiff_for_a_scale_blind_loss():
    """With normalize, holding the denominator constant (the kernels' gradient) is exact for a loss blind to
    per-step rescaling of h."""
    with jax.enable_x64(True):
        inputs = _sigmoid_inputs("held", True)
        weights = jax.random.normal(case_key("sigmoid-held"), (SIG_B, SIG_NH, 24, SIG_DHHV), jnp.float64)

        def loss(held):
            def value(*a):
                h = mlstm_sigmoid_recurrent(*a, kernel_gradient_semantics=held)
                return jnp.sum(weights * h / jnp.linalg.norm(h, axis=-1, keepdims=True))

            return jax.jit(jax.grad(value, argnums=tuple(range(7))))(*inputs)

        held, exact = loss(True), loss(False)
        for got, expected in zip(held[:6], exact[:6]):
            assert rel_err(got, expected) <= 1e-10, rel_err(got, expected)
        # n enters h only through the denominator: its gradient is 0, held or not (autodiff leaves rounding)
        assert np.all(held[6] == 0) and np.max(np.abs(exact[6])) <= 1e-12
