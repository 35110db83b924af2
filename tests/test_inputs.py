"""Inputs users really pass: gates of any float dtype, empty batches, NumPy ints, a missing GPU, and the
transformations that are not supported (forward mode, second derivatives) refused with a clear error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
from pallas_mlstm.accuracy import mlstm_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import case_key

_NO_GPU = jax.default_backend() != "gpu"


def _backends():
    return [b for b in test_flags.BACKEND.value if b != "triton" or not _NO_GPU]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gate_dtype", ["float64", "bfloat16", "float16"])
def test_gates_of_any_float_dtype_are_computed_in_float32(backend, gate_dtype):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("gate-dtypes", backend), 1, 2, 64, 16, 32, with_initial=True)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend=backend, return_last_states=True)
    with jax.enable_x64(True):
        i_cast, f_cast, c_cast, n_cast, m_cast = (x.astype(gate_dtype) for x in (i, f, c0, n0, m0))
        h, (c, n, m) = jax.jit(run)(q, k, v, i_cast, f_cast, c_cast, n_cast, m_cast)
        grads = jax.grad(lambda i, f: jnp.sum(run(q, k, v, i, f)[0].astype(jnp.float32)), argnums=(0, 1))(
            i_cast, f_cast)
    # the same as float32 gates holding the same values
    expected_h, expected_last = run(q, k, v, *(x.astype(jnp.float32) for x in (i_cast, f_cast, c_cast, n_cast, m_cast)))
    assert h.dtype == jnp.bfloat16 and c.dtype == n.dtype == m.dtype == jnp.float32
    assert rel_err(h, expected_h) == 0.0
    assert all(rel_err(a, e) == 0.0 for a, e in zip((c, n, m), expected_last))
    assert grads[0].dtype == grads[1].dtype == jnp.dtype(gate_dtype)  # gradients come back in the gates' dtype
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("batch,heads", [(0, 2), (2, 0)])
def test_empty_batch_or_heads_give_empty_outputs(backend, batch, heads):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("empty"), batch, heads, 32, 16, 24, with_initial=True)
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend=backend, return_last_states=True)
    h, (c, n, m) = jax.jit(run)(q, k, v, i, f, c0, n0, m0)
    assert h.shape == (batch, heads, 32, 24) and h.dtype == q.dtype
    assert (c.shape, n.shape, m.shape) == ((batch, heads, 16, 24), (batch, heads, 16), (batch, heads))
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=tuple(range(8)))(q, k, v, i, f, c0, n0, m0)
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v, i, f, c0, n0, m0)]


def test_numpy_integer_chunk_size_is_accepted():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("np-chunk"), 1, 2, 64, 16, 16)
    expected = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="xla")
    for chunk in (np.int64(16), np.int32(16)):
        np.testing.assert_array_equal(pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, backend="xla"),
                                      expected)
    assert pallas_mlstm.ChunkwiseConfig(chunk_size=np.int64(16)).chunk_size == 16


def test_c_initial_alone_means_zero_n_and_m():
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(case_key("c-alone"), 1, 2, 64, 16, 16, with_initial=True)
    alone = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, c0, chunk_size=16, backend="xla")
    zeros = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, c0, jnp.zeros_like(n0), jnp.zeros_like(m0), chunk_size=16,
                                         backend="xla")
    np.testing.assert_array_equal(alone, zeros)


@pytest.mark.skipif(not _NO_GPU, reason="checks the error on a machine without a GPU")
def test_triton_backend_without_a_gpu_names_the_alternatives():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("no-gpu"), 1, 1, 32, 16, 16)
    with pytest.raises(ValueError, match="backend='xla'.*backend='interpret'"):
        pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, backend="triton")
    with pytest.raises(ValueError, match="backend='xla'"):
        pallas_mlstm.mlstm_chunkwise_fw(q, k, v, i, f, backend="triton")


@pytest.mark.skipif(not _NO_GPU, reason="checks the error on a machine without a GPU")
def test_kernel_compiled_without_a_gpu_says_interpret_true():
    q, k, v, i, f, *_ = mlstm_inputs(case_key("no-gpu-kernel"), 1, 1, 32, 16, 16)
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_mlstm.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16)
    states = pallas_mlstm.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16, interpret=True)
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_mlstm.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, *states, chunk_size=16)


@pytest.mark.parametrize("backend", _backends())
def test_forward_mode_and_second_derivatives_are_refused_clearly(backend):
    q, k, v, i, f, *_ = mlstm_inputs(case_key("higher-order"), 1, 1, 32, 16, 16)
    loss = lambda q: jnp.sum(pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend=backend) ** 2)
    with pytest.raises(ValueError, match="forward-mode differentiation.*not supported"):
        jax.jacfwd(loss)(q)
    with pytest.raises(ValueError, match="forward-mode differentiation.*not supported"):
        jax.jvp(loss, (q,), (q,))
    with pytest.raises(ValueError, match="second derivative.*not supported"):
        jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))(q)
    assert jax.grad(loss)(q).shape == q.shape  # first order still works
