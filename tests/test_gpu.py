"""GPU-only checks at the benchmark shapes (benchmarks/README.md): accuracy, every output written, no races.

Skipped without a GPU. On the GPU machine: `pytest tests --backend=triton` (and `--backend=mosaic` on a Hopper GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_mlstm
from pallas_mlstm.accuracy import GPU_SHAPES_TOLERANCE, mlstm_inputs, rel_err
from pallas_mlstm.benchmarks.shapes import GPU_DEFAULT_SHAPES, SHAPES
from tests import flags as test_flags
from tests.helpers import case_key, skip_unless_available

BENCHMARK_SHAPES = {  # (B, NH, S, DHQK, DHHV) of the bench's default GPU shapes
    name: tuple(SHAPES[name].dims().values()) for name in GPU_DEFAULT_SHAPES
}
CHUNK = 128

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU-only: needs the triton or mosaic backend")


def _poison_free_device_memory(num_bytes: int) -> None:
    """Fills `num_bytes` of the allocator's free memory with NaN, so that unwritten outputs show up."""
    poison = jnp.full((num_bytes // 4,), jnp.nan, jnp.float32)
    poison.block_until_ready()
    del poison


def _fwbw(backend):
    def loss(q, k, v, i, f, w):
        h = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=CHUNK, backend=backend)
        return jnp.sum(h.astype(jnp.float32) * w)

    def fwbw(q, k, v, i, f, w):
        h = pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=CHUNK, backend=backend)
        return h, jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, i, f, w)

    return jax.jit(fwbw)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("shape", BENCHMARK_SHAPES)
def test_benchmark_shape_accurate_complete_and_deterministic(shape, backend):
    if backend not in test_flags.BACKEND.value or not test_flags.GPU_SHAPES.value:
        pytest.skip(f"run with --backend={backend} (and --gpu_shapes) to check the benchmark shapes")
    skip_unless_available(backend)
    batch, heads, seq_len, dhqk, dhhv = BENCHMARK_SHAPES[shape]
    key = case_key("gpu", shape)
    q, k, v, i, f, *_ = mlstm_inputs(key, batch, heads, seq_len, dhqk, dhhv, jnp.bfloat16)
    w = jax.random.normal(jax.random.fold_in(key, 1), v.shape, jnp.float32)
    # Reference: the xla backend (jnp twins, checked against the float64 oracles on CPU) in float32.
    h_ref, grads_ref = _fwbw("xla")(*(x.astype(jnp.float32) for x in (q, k, v)), i, f, w)
    h_ref, grads_ref = jax.device_get((h_ref, grads_ref))
    run = _fwbw(backend)
    outputs = []
    for _ in range(2):
        _poison_free_device_memory(8 << 30)
        outputs.append(jax.device_get(run(q, k, v, i, f, w)))
    (h, grads), (h_again, grads_again) = outputs
    fw_tol, grad_tol = GPU_SHAPES_TOLERANCE
    assert rel_err(h, h_ref) <= fw_tol  # rel_err is inf when any element is NaN (unwritten)
    for name, g, g_ref in zip("qkvif", grads, grads_ref):
        assert rel_err(g, g_ref) <= grad_tol, name
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_again, np.float32))
    for g, g_again in zip(grads, grads_again):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_again, np.float32))
