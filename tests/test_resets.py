"""Infinite gates: f̃ = −∞ (hard reset) and ĩ = −∞ (a token that writes nothing) give the cell's result.

The oracle here is the mLSTM cell without any stabiliser, in float64 (C_t = σ(f̃) C + e^ĩ k vᵀ), which
handles infinite gates by plain IEEE arithmetic: a third algorithm, independent of the max state m.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import ORACLE_TOLERANCE, rel_err
from tests import flags as test_flags
from tests.helpers import case_key, input_grads, mlstm_inputs, plain_loss, skip_unless_available

# B, NH, S, DHQK, DHHV, chunk
SHAPE = (1, 2, 64, 16, 32, 16)
# per head: positions of f̃ = −∞ and of ĩ = −∞. Head 0: resets at the first token, mid-chunk, at a chunk's
# first and last token, twice in a row, one token that is both; head 1: a reset at a chunk start followed by
# a whole chunk that writes nothing (an empty state, m = −∞ in the stabilised cell), and a reset after it.
RESETS = ([0, 5, 16, 31, 40, 41, 57], [3, 32, 60])
SILENT = ([3, 17, 40, 58, 59], list(range(32, 48)) + [61])


def unstabilised_cell(q, k, v, i, f, c_initial, n_initial, m_initial):
    """h (denominator held constant, eps = 0) and the true last states (C, n), in float64."""
    scale = q.shape[-1] ** -0.5
    c0 = c_initial * jnp.exp(m_initial)[..., None, None]
    n0 = n_initial * jnp.exp(m_initial)[..., None]

    def step(carry, x):
        c, n = carry
        q_t, k_t, v_t, i_t, f_t = x
        forget, write = jax.nn.sigmoid(f_t), jnp.exp(i_t)  # 0 at −∞, with zero gradient
        c = forget[..., None, None] * c + (write[..., None] * k_t)[..., :, None] * v_t[..., None, :]
        n = forget[..., None] * n + write[..., None] * k_t
        num = jnp.einsum("bhd,bhde->bhe", scale * q_t, c, precision=lax.Precision.HIGHEST)
        den = lax.stop_gradient(jnp.maximum(jnp.abs(jnp.sum(scale * q_t * n, axis=-1)), 1.0))
        return (c, n), num / den[..., None]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f))
    (c_last, n_last), h = lax.scan(step, (c0, n0), xs)
    return jnp.moveaxis(h, 0, 2), (c_last, n_last)


def _inputs(seed_name):
    """float32 inputs with the infinite gates of RESETS / SILENT, and the same values in float64."""
    batch, heads, seq_len, dhqk, dhhv, _ = SHAPE
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key(seed_name), batch, heads, seq_len, dhqk, dhhv, with_initial=True)
    for head in range(heads):
        f = f.at[:, head, jnp.array(RESETS[head])].set(-jnp.inf)
        i = i.at[:, head, jnp.array(SILENT[head])].set(-jnp.inf)
    return (q, k, v, i, f, c0, n0, m0)


def _backends():
    return [pytest.param(b, id=b) for b in test_flags.BACKEND.value]


def test_stabilised_oracle_is_the_cell():
    inputs = _inputs("resets-oracle")
    with jax.enable_x64(True):
        inputs64 = tuple(x.astype(jnp.float64) for x in inputs)
        h_cell, (c_cell, n_cell) = jax.jit(unstabilised_cell)(*inputs64)
        h, (c, n, m) = reference.mlstm_recurrent(
            *inputs64, return_last_states=True, eps=0.0, kernel_gradient_semantics=True
        )
        assert rel_err(h, h_cell) <= 1e-12
        assert rel_err(c * jnp.exp(m)[..., None, None], c_cell) <= 1e-12
        assert rel_err(n * jnp.exp(m)[..., None], n_cell) <= 1e-12
        assert float(jnp.max(jnp.abs(h[:, 1, 32:48]))) == 0.0  # nothing written since the reset


@pytest.mark.parametrize("backend", _backends())
def test_infinite_gates_match_the_cell(backend):
    skip_unless_available(backend)
    *_, chunk = SHAPE
    inputs = _inputs("resets")
    weights_key = case_key("resets-weights")
    with jax.enable_x64(True):
        inputs64 = tuple(x.astype(jnp.float64) for x in inputs)
        h_ref, (c_ref, n_ref) = jax.jit(unstabilised_cell)(*inputs64)
        cell = lambda *a: (lambda h, last: (h, (*last, None)))(*unstabilised_cell(*a))
        grads_ref = input_grads(plain_loss(cell, True), weights_key, inputs64)

    def run(*args):
        h, (c, n, m) = pallas_mlstm.mlstm_chunkwise(
            *args, chunk_size=chunk, backend=backend, eps=0.0, return_last_states=True
        )
        return h, (c * jnp.exp(m)[..., None, None], n * jnp.exp(m)[..., None], None)  # the true states

    h, (c, n, _) = jax.jit(run)(*inputs)
    fw_tol, grad_tol = ORACLE_TOLERANCE[backend, "float32"]  # float32 inputs vs the float64 cell
    assert rel_err(h, h_ref) <= fw_tol
    assert rel_err(c, c_ref) <= fw_tol and rel_err(n, n_ref) <= fw_tol
    grads = input_grads(plain_loss(jax.jit(run), True), weights_key, inputs)
    for name, expected in grads_ref.items():
        if not np.any(expected):  # n_initial: every path from it is cut by a reset
            np.testing.assert_array_equal(grads[name], 0.0, err_msg=name)
        else:
            assert rel_err(grads[name], expected) <= grad_tol, name
    # an infinite gate has a zero gradient, exactly; so have k and v of tokens that write nothing
    for head in range(2):
        np.testing.assert_array_equal(grads["f"][:, head, jnp.array(RESETS[head])], 0.0)
        silent = jnp.array(SILENT[head])
        for name in ("i", "k", "v"):
            np.testing.assert_array_equal(grads[name][:, head, silent], 0.0, err_msg=name)
