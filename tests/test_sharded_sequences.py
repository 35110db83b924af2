"""Packed documents and decoding steps under sharded jit (4 CPU devices, a process of their own): equal to one
device, with a document that straddles two sequence shards."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests import flags as test_flags

_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import pallas_mlstm
from pallas_mlstm.accuracy import mlstm_inputs, rel_err

B, NH, S, DK, DV = 2, 2, 128, 16, 16
mesh = jax.make_mesh((2, 2), ("data", "seq"))
q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(3), B, NH, S, DK, DV, jnp.float32)
ids = np.zeros((B, S), np.int32)
ids[0, 20:] += 1; ids[0, 50:] += 1; ids[0, 70:] += 1   # documents 20-49 and 50-69 straddle the shard edge at 64
ids[1, 64:] += 1                                           # a document starting exactly at the shard edge
ids = jnp.asarray(ids)
w = jax.random.normal(jax.random.PRNGKey(4), (B, NH, S, DV), jnp.float32)

def loss(q, k, v, i, f, ids):
    return jnp.sum(w * pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="xla", segment_ids=ids))

grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
one_value, one_grads = jax.jit(grad)(q, k, v, i, f, ids)
seq = NamedSharding(mesh, P("data", None, "seq"))
put = lambda x: jax.device_put(x, seq if x.ndim >= 3 else NamedSharding(mesh, P("data", "seq")))
value, grads = jax.jit(grad)(*map(put, (q, k, v, i, f, ids)))
assert abs(float(value) - float(one_value)) <= 1e-5 * abs(float(one_value)), (value, one_value)
for g, e in zip(grads, one_grads):
    assert rel_err(g, e) <= 1e-5, rel_err(g, e)

# decoding steps with B and NH sharded
mesh2 = jax.make_mesh((2, 2), ("data", "heads"))
q1, k1, v1 = (x[:, :, 0] for x in (q, k, v))
c = jax.random.normal(jax.random.PRNGKey(5), (B, NH, DK, DV), jnp.float32)
n = jax.random.normal(jax.random.PRNGKey(6), (B, NH, DK), jnp.float32)
m = jnp.zeros((B, NH), jnp.float32)
args = (q1, k1, v1, i[:, :, 0], f[:, :, 0], c, n, m)
step = jax.jit(lambda *a: pallas_mlstm.mlstm_recurrent_step(*a, backend="xla"))
expected = step(*args)
shard = lambda x: jax.device_put(x, NamedSharding(mesh2, P("data", "heads")))
actual = step(*map(shard, args))
for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert rel_err(a, e) <= 1e-6
print("ok")
"""


def test_documents_and_steps_under_sharded_jit():
    if "xla" not in test_flags.BACKEND.value:
        pytest.skip("backend xla not selected by --backend")
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-6000:]
