"""`mlstm_chunkwise(..., segment_len=...)`: forward and backward over segments of the sequence in turn, against
one pass over the whole sequence (the same op with segment_len=None), on the xla backend: segments call the same
kernels as one pass, whatever the backend (each Pallas kernel against its twin: tests/test_kernels.py; from initial
states: tests/test_api.py). Bad segment_len values: tests/test_inputs.py; segments inside shards:
tests/test_sharding.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
from pallas_mlstm.accuracy import rel_err
from pallas_mlstm.plan import SEGMENT_MAX_LEN, default_segment_len
from tests.helpers import case_key, mlstm_inputs, plain_loss

GRAD_NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")
B, NH, S, DHQK, DHHV = 2, 2, 256, 16, 32
TOLERANCE = 1e-5  # float32, segments vs one pass: the same kernels, summed in another order at segment ends


def _present(inputs):
    return tuple(x for x in inputs if x is not None)


def _outputs_and_grads(inputs, key, **kwargs):
    """((h, last states), gradients of a loss on h and the last C and n) of one jitted call."""
    names = [name for name, x in zip(GRAD_NAMES, inputs) if x is not None]
    cell = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, return_last_states=True, **kwargs)
    grad = lambda key, *a: jax.grad(plain_loss(cell, True), argnums=tuple(range(1, 1 + len(a))))(key, *a)
    out, grads = jax.jit(lambda key, *a: (cell(*a), grad(key, *a)))(key, *_present(inputs))
    return out, dict(zip(names, grads))


def _assert_segments_match_one_pass(inputs, key, segment_len, **kwargs):
    (h, last), grads = _outputs_and_grads(inputs, key, segment_len=segment_len, **kwargs)
    (h_ref, last_ref), grads_ref = _outputs_and_grads(inputs, key, segment_len=None, **kwargs)
    assert h.dtype == h_ref.dtype and rel_err(h, h_ref) <= TOLERANCE
    for part, actual, expected in zip("cnm", last, last_ref):
        assert actual.dtype == expected.dtype == jnp.float32, part
        assert rel_err(actual, expected) <= TOLERANCE, part
    assert grads.keys() == grads_ref.keys()
    for name, expected in grads_ref.items():
        assert grads[name].dtype == expected.dtype, name
        assert rel_err(grads[name], expected) <= TOLERANCE, name


# The cell: mLSTMexp, or mLSTMsig without the normaliser (its states are (c, n))
CELLS = {"exponential": {}, "sigmoid-unnormalized": dict(input_gate="sigmoid", normalize=False)}


def _segment_params():
    """(cell, chunk, segment_len, with_initial): the exponential cell with two segments without initial states and
    with four from initial states; the sigmoid cell with four segments of two chunks, from initial states."""
    params = [
        pytest.param(
            "exponential",
            chunk,
            segment_len,
            with_initial,
            id=f"exponential-{split}-{'initial' if with_initial else 'no-initial'}",
        )
        for chunk, segment_len, split, with_initial in ((16, S // 2, "L16-S/2", False), (32, S // 4, "L32-S/4", True))
    ]
    return [*params, pytest.param("sigmoid-unnormalized", 32, S // 4, True, id="sigmoid-unnormalized-L32-S/4-initial")]


@pytest.mark.parametrize("cell,chunk,segment_len,with_initial", _segment_params())
def test_segments_match_one_pass(cell, chunk, segment_len, with_initial):
    """h, last states and every gradient (the loss weights the last C and n too: last-state cotangents)."""
    key = case_key("segments", chunk, segment_len, with_initial, *(() if cell == "exponential" else (cell,)))
    inputs = mlstm_inputs(key, B, NH, S, DHQK, DHHV, with_initial=with_initial)[: 8 if cell == "exponential" else 7]
    _assert_segments_match_one_pass(
        inputs, jax.random.fold_in(key, 1), segment_len, chunk_size=chunk, backend="xla", **CELLS[cell]
    )


def test_segments_with_hard_resets():
    """f̃ = −∞ at a segment's first and last step, at a chunk start inside a segment and elsewhere; ĩ = −∞
    over a whole segment-starting chunk (an empty state at a segment start)."""
    key = case_key("segments-resets")
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(key, B, NH, S, DHQK, DHHV, with_initial=True)
    f = f.at[:, 0, jnp.array([0, 63, 64, 100, 127, 128, 200])].set(-jnp.inf)
    f = f.at[:, 1, jnp.array([64, 192])].set(-jnp.inf)
    i = i.at[:, 1, 64:80].set(-jnp.inf)
    inputs = (q, k, v, i, f, c0, n0, m0)
    _assert_segments_match_one_pass(inputs, jax.random.fold_in(key, 1), 64, chunk_size=16, backend="xla")


def test_zero_initial_states_are_no_initial_states():
    """The first segment starts from zeros (C, n) and m = 0 when no initial states are given: the same."""
    key = case_key("segments-zeros")
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(key, B, NH, S, DHQK, DHHV, with_initial=True)
    zeros = (jnp.zeros_like(c0), jnp.zeros_like(n0), jnp.zeros_like(m0))
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend="xla", return_last_states=True)
    h, last = run(q, k, v, i, f)
    h_zeros, last_zeros = run(q, k, v, i, f, *zeros)
    np.testing.assert_array_equal(h, h_zeros)
    for actual, expected in zip(last, last_zeros):
        np.testing.assert_array_equal(actual, expected)


def test_segments_under_jit_and_vmap():
    """vmap of the segmented op (and of its gradient, without last states) == the op per mapped element."""
    key = case_key("segments-vmap")
    draw = lambda key: mlstm_inputs(key, 1, 2, 128, DHQK, DHHV)[:5]
    stacked = [jnp.stack(xs) for xs in zip(draw(key), draw(jax.random.fold_in(key, 1)))]
    run = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend="xla", segment_len=32)
    loss = lambda *a: jnp.sum(jnp.sin(run(*a)))
    batched = jax.jit(jax.vmap(run))(*stacked)
    batched_grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4))))(*stacked)
    one_pass = lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend="xla")
    one_pass_grad = jax.grad(lambda *a: jnp.sum(jnp.sin(one_pass(*a))), argnums=(0, 1, 2, 3, 4))
    # per mapped element: one compiled program (op by op, each operation compiles apart), called per element
    one = jax.jit(lambda *x: (one_pass(*x), one_pass_grad(*x)))
    looped = [one(*x) for x in zip(*stacked)]
    for index, (h, expected) in enumerate(looped):
        assert rel_err(batched[index], h) <= TOLERANCE
        for name, got, want in zip(GRAD_NAMES, batched_grads, expected):
            assert rel_err(got[index], want) <= TOLERANCE, name


def test_segments_bound_memory():
    """The compiled forward + backward of the segmented op needs a fraction of the one pass's temporary memory
    (the chunk states of one segment at a time), on a shape where the chunk states dominate."""
    inputs = mlstm_inputs(case_key("segments-memory"), 1, 1, 4096, 64, 64)[:5]

    def temp_bytes(segment_len):
        loss = lambda *a: jnp.sum(
            pallas_mlstm.mlstm_chunkwise(*a, chunk_size=16, backend="xla", segment_len=segment_len)
        )
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*inputs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(512) < temp_bytes(None) / 3


def test_segment_len_of_s_is_one_pass():
    inputs = mlstm_inputs(case_key("segments-whole"), 1, 2, 64, DHQK, DHHV)[:5]
    h = pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=16, backend="xla", segment_len=np.int64(64))
    np.testing.assert_array_equal(h, pallas_mlstm.mlstm_chunkwise(*inputs, chunk_size=16, backend="xla"))


def test_default_segment_len():
    assert SEGMENT_MAX_LEN == 32768
    for seq_len in (256, 4096, 65536):
        assert default_segment_len(seq_len, 128) is None
    assert default_segment_len(262144, 128) == 32768
    assert default_segment_len(524288, 64) == 32768
    assert default_segment_len(3 * 65536, 128) == 32768
    assert default_segment_len(128 * 1025, 128) == 128 * 205  # 1025 = 5²·41: the largest divisor <= 256 is 205
    assert default_segment_len(2 * 65536, 65536) is None  # no multiple of the chunk fits in 32768
