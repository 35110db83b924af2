"""Packed documents (`segment_ids`): each document equals the same document run alone, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
import reference
from pallas_mlstm.accuracy import ORACLE_TOLERANCE, kernel_and_oracle_inputs, rel_err
from tests import flags as test_flags
from tests.helpers import case_key, grid, mlstm_inputs, outputs_and_grads, plain_loss, skip_unless_available

B, NH, S, DHQK, DHHV, CHUNK = 2, 2, 70, 16, 32, 16
# Where each row's documents start after the first: lengths 5, 30, 1, 34 (several per chunk of 16, one of a
# single token, S = 70 not a multiple of the chunk) and 16, 32, 22 (starting on chunk boundaries).
DOCUMENT_STARTS = ((5, 35, 36), (16, 48))


def _segment_ids():
    ids = np.zeros((B, S), np.int32)
    for row, starts in enumerate(DOCUMENT_STARTS):
        for start in starts:
            ids[row, start:] += 1
    return jnp.asarray(ids)


def _true_last_states(last):
    """(C·e^m, n·e^m): the last states without their stabiliser, which differs between the two runs."""
    c, n, m = last
    return c * jnp.exp(m)[..., None, None], n * jnp.exp(m)[..., None]


def _documents_alone(q, k, v, i, f, c0=None, n0=None, m0=None):
    """The float64 recurrent oracle on each document separately, the initial states reaching each row's first. The
    documents run as one batch (one scan to compile, not one per document), each padded at its end to the longest
    with steps that leave the states exactly as they are (ĩ = −1e4 writes nothing, f̃ = 1e4 forgets nothing: exp
    gives exactly 0 and 1 in float64)."""
    docs = [(row, start, end) for row, starts in enumerate(DOCUMENT_STARTS) for start, end in _pairs((0, *starts, S))]
    length = max(end - start for _, start, end in docs)

    def batched(x, fill):  # (B, NH, S, ...) -> (documents, NH, length, ...)
        pieces = [x[row, :, start:end] for row, start, end in docs]
        pad = lambda piece: jnp.full((NH, length - piece.shape[1], *piece.shape[2:]), fill, piece.dtype)
        return jnp.stack([jnp.concatenate([piece, pad(piece)], axis=1) for piece in pieces])

    def initial(x):  # the row's state for its first document, zeros for the others
        if x is None:
            return None
        return jnp.stack([x[row] if start == 0 else jnp.zeros_like(x[row]) for row, start, _ in docs])

    gates = (batched(i, -1e4), batched(f, 1e4))
    h, (c, n, m) = reference.mlstm_recurrent(
        *(batched(x, 0.0) for x in (q, k, v)),
        *gates,
        *map(initial, (c0, n0, m0)),
        return_last_states=True,
        kernel_gradient_semantics=True,
    )  # h (documents, NH, length, DHHV)
    rows = [[doc for doc, (r, _, _) in enumerate(docs) if r == row] for row in range(B)]
    h_rows = [jnp.concatenate([h[doc, :, : docs[doc][2] - docs[doc][1]] for doc in row], axis=1) for row in rows]
    last = [row[-1] for row in rows]  # each row's last document
    return jnp.stack(h_rows), _true_last_states((c[jnp.array(last)], n[jnp.array(last)], m[jnp.array(last)]))


def _pairs(bounds):
    return list(zip(bounds[:-1], bounds[1:]))


def _backends():
    return [b for b in test_flags.BACKEND.value]


def _cases():
    """With initial states (they reach the first document only); without them on triton too (a GPU run). Not on the
    interpreter: documents are hard resets in f before any kernel runs (the Pallas kernels on f̃ = −∞:
    tests/test_resets.py)."""
    return [
        pytest.param(backend, with_initial, id=f"{backend}-{'initial' if with_initial else 'no-initial'}")
        for backend in _backends()
        for with_initial in (False, True)
        if (with_initial or grid(backend) == "triton") and grid(backend) != "interpret"
    ]


@pytest.mark.parametrize("backend,with_initial", _cases())
def test_packed_documents_equal_documents_alone(backend, with_initial):
    skip_unless_available(backend)
    fw_tol, grad_tol = ORACLE_TOLERANCE[backend, "float32"]
    key = case_key("documents", backend, with_initial)
    segment_ids = _segment_ids()
    argnums = tuple(range(8 if with_initial else 5))
    with jax.enable_x64(True):
        inputs, inputs64 = kernel_and_oracle_inputs(
            mlstm_inputs(key, B, NH, S, DHQK, DHHV, jnp.float64, with_initial=with_initial), jnp.float32
        )
        # (h, last states) and the gradients of Σ w·h + Σ w_c·(C·e^m) + Σ w_n·(n·e^m), in one compiled program
        (h_ref, last_ref), grads_ref = outputs_and_grads(plain_loss, _documents_alone, key, inputs64[: len(argnums)])

    def packed(*args):
        h, last = pallas_mlstm.mlstm_chunkwise(
            *args, chunk_size=CHUNK, backend=backend, return_last_states=True, segment_ids=segment_ids
        )
        return h, _true_last_states(last)

    (h, last), grads = outputs_and_grads(plain_loss, packed, key, inputs[: len(argnums)])
    assert rel_err(h, h_ref) <= fw_tol
    for actual, expected in zip(last, last_ref):
        assert rel_err(actual, expected) <= fw_tol
    for name, expected in grads_ref.items():
        assert rel_err(grads[name], expected) <= grad_tol, name
    starts = np.asarray(segment_ids[:, 1:] != segment_ids[:, :-1])
    df = np.asarray(grads["f"])[:, :, 1:]
    assert not np.any(df[np.broadcast_to(starts[:, None], df.shape)])


def test_segment_ids_under_vmap():
    """vmap over a leading axis, segment ids mapped too: each slice as its own call."""
    q, k, v, i, f, *_ = mlstm_inputs(case_key("documents-vmap"), B, NH, S, DHQK, DHHV, jnp.float32)
    ids = jnp.stack([_segment_ids(), jnp.zeros((B, S), jnp.int32)])
    stack = lambda x: jnp.stack([x, x[::-1]])
    fn = lambda q, k, v, i, f, ids: pallas_mlstm.mlstm_chunkwise(
        q, k, v, i, f, chunk_size=CHUNK, backend="xla", segment_ids=ids
    )
    stacked = (*map(stack, (q, k, v, i, f)), ids)
    mapped = jax.jit(jax.vmap(fn))(*stacked)
    one = jax.jit(fn)  # one program, called per element
    alone = [one(*x) for x in zip(*stacked)]
    for index in range(2):
        assert rel_err(mapped[index], alone[index]) <= 1e-6
