"""The two oracles of the mLSTMsig cell (sigmoid input gate) agree with each other and with a hand computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_mlstm.accuracy import mlstm_inputs, rel_err
from reference.sigmoid import mlstm_sigmoid_parallel, mlstm_sigmoid_recurrent
from tests.helpers import case_key

B, NH, S, DHQK, DHHV = 2, 2, 24, 8, 12


def _inputs(name, with_initial, infinite_gates=False):
    q, k, v, i, f, c0, n0, _ = mlstm_inputs(case_key("sigmoid", name, with_initial), B, NH, S, DHQK, DHHV,
                                            jnp.float64, with_initial=with_initial)
    if infinite_gates:  # resets, one of them first, and tokens that write nothing
        f = f.at[..., jnp.array([0, 9, 15])].set(-jnp.inf)
        i = i.at[..., jnp.array([5, 9, 23])].set(-jnp.inf)
    return q, k, v, i, f, c0, n0


@pytest.mark.parametrize("normalize,with_initial,infinite_gates", [
    (True, True, True), (True, False, False), (False, True, False), (False, False, True)],
    ids=["normalize-initial-resets", "normalize", "initial", "resets"])
def test_recurrent_and_parallel_agree(normalize, with_initial, infinite_gates):
    """h, the last states and (without normalization, exact for any loss) every gradient, in float64."""
    with jax.enable_x64(True):
        inputs = _inputs("agree", with_initial, infinite_gates)
        kwargs = dict(normalize=normalize, return_last_states=True)
        h, (c, n) = mlstm_sigmoid_recurrent(*inputs, **kwargs)
        h_ref, (c_ref, n_ref) = mlstm_sigmoid_parallel(*inputs, **kwargs)
        for got, expected in ((h, h_ref), (c, c_ref), (n, n_ref)):
            assert np.all(np.isfinite(got)) and rel_err(got, expected) <= 1e-12, rel_err(got, expected)
        weights = jax.random.normal(case_key("sigmoid-weights"), h.shape, jnp.float64)
        argnums = tuple(range(7 if with_initial else 5))
        grads = [jax.grad(lambda *a: jnp.sum(weights * cell(*a, normalize=normalize)), argnums=argnums)(*inputs)
                 for cell in (mlstm_sigmoid_recurrent, mlstm_sigmoid_parallel)]
        for got, expected in zip(*grads):
            assert np.all(np.isfinite(got)) and rel_err(got, expected) <= 1e-11, rel_err(got, expected)


def test_two_steps_by_hand():
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
        np.testing.assert_allclose(cell(*args, normalize=False).reshape(2), jnp.array([q[0] * c1, q[1] * c2]),
                                   rtol=1e-6)


def test_held_denominator_matches_autodiff_for_a_scale_blind_loss():
    """With normalize, holding the denominator constant (the kernels' gradient) is exact for a loss blind to
    per-step rescaling of h."""
    with jax.enable_x64(True):
        inputs = _inputs("held", True)
        weights = jax.random.normal(case_key("sigmoid-held"), (B, NH, S, DHHV), jnp.float64)

        def loss(held):
            def value(*a):
                h = mlstm_sigmoid_recurrent(*a, kernel_gradient_semantics=held)
                return jnp.sum(weights * h / jnp.linalg.norm(h, axis=-1, keepdims=True))
            return jax.grad(value, argnums=tuple(range(7)))(*inputs)

        held, exact = loss(True), loss(False)
        for got, expected in zip(held[:6], exact[:6]):
            assert rel_err(got, expected) <= 1e-10, rel_err(got, expected)
        # n enters h only through the denominator: its gradient is 0, held or not (autodiff leaves rounding)
        assert np.all(held[6] == 0) and np.max(np.abs(exact[6])) <= 1e-12
