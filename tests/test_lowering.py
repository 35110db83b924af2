"""Every kernel, and the whole forward + backward, lowers to Triton for the `cuda` platform on a CPU machine.

PTX compilation itself only happens on a GPU; this catches unsupported ops and non-power-of-2 shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import pallas_mlstm
from tests.helpers import case_key, mlstm_inputs

KERNEL_NAMES = (
    "mlstm_chunkwise__recurrent_fw_C",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "mlstm_chunkwise__recurrent_bw_dC",
    "mlstm_chunkwise__parallel_bw_dQ",
    "mlstm_chunkwise__parallel_bw_dK",
    "mlstm_chunkwise__parallel_bw_dV",
)
_H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of jit(fn) lowered for cuda without a GPU."""
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=_H100)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize(
    "shape",
    [(1, 2, 256, 64, 128, 64), (1, 1, 256, 48, 80, 128), (1, 1, 512, 256, 512, 256)],
    ids=["d64x128-L64", "d48x80-padded-L128", "d256x512-L256"],
)
def test_forward_and_backward_lower_to_triton(shape, dtype):
    batch, heads, seq_len, dhqk, dhhv, chunk = shape
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(
        case_key("lower", shape), batch, heads, seq_len, dhqk, dhhv, dtype, with_initial=True
    )

    def loss(q, k, v, i, f, c0, n0, m0):
        h, (c, n, _) = pallas_mlstm.mlstm_chunkwise(
            q, k, v, i, f, c0, n0, m0, chunk_size=chunk, backend="triton", return_last_states=True
        )
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(c) + jnp.sum(n)

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8))), q, k, v, i, f, c0, n0, m0)
    assert "__gpu$xla.gpu.triton" in text
    for name in KERNEL_NAMES:
        assert name in text, f"{name} missing from the lowered module"


def test_lowering_fails_loudly_for_unsupported_shapes():
    """The check is real: a chunk of 8 cannot be lowered (Triton dots need 16) and is refused up front."""
    q, k, v, i, f, *_ = mlstm_inputs(case_key("lower-bad"), 1, 1, 64, 16, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="at least 16"):
        lower_for_cuda(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, chunk_size=8, backend="triton"), q, k, v, i, f)
