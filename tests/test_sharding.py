"""`mlstm_chunkwise` on sharded inputs: batch, heads and sequence over 4 CPU devices, vs one device, for both cells,
with segments inside shards; packed documents and decoding steps under sharded jit.

The sharded cases need 4 devices before JAX starts, so they run in a subprocess of their own
(tests/sharding_cases.py, one per backend, shared by the pytest-xdist workers); the tests here read its per-case
JSON. The Triton lowering of the per-shard program for a 2- and 4-GPU mesh runs here, deviceless, and the mosaic
backend's for a 4-GPU mesh.
"""

import fcntl
import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh, AxisType

from pallas_mlstm.accuracy import ORACLE_TOLERANCE, SHARDED_TOLERANCE
from tests import flags as test_flags
from tests.helpers import CUDA_DEVICE, lower_for_cuda
from tests.sharding_cases import CASES, DHHV, DHQK

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The interpreter is slow: one case, the Pallas kernels under batch and sequence sharding over Explicit axes (Auto
# axes, remat and the user's shard_map run the same partitioning whatever the kernels: xla covers them). xla runs
# every other case, and that one too where the interpreter does not (the partitioning is the same).
_INTERPRET_CASES = ("batch_seq_explicit",)
_RUNS = [
    ("xla", name) for name in CASES if name not in _INTERPRET_CASES or "interpret" not in test_flags.BACKEND.value
] + [("interpret", name) for name in _INTERPRET_CASES]

# Sharded vs one-device float32 results: within SHARDED_TOLERANCE. Where float32 itself is noisier than
# that (a gradient that is the exp of a sequence-long sum, or a reverse cumulative sum of differences: either
# result is then 1e-7 to 5e-6 from float64, and which of the two is closer depends on the seed), the sharded
# result passes if it keeps the op's float32 accuracy bound against float64 (ORACLE_TOLERANCE of xla, float32:
# the bound one device meets). A sharding defect (a state not passed, combined or placed right) moves results
# by orders of magnitude more.
FLOAT32_BOUND = dict(zip(("forward", "gradient"), ORACLE_TOLERANCE[("xla", "float32")]))


def _four_device_environment():
    return dict(
        os.environ,
        XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip(),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
    )


def _run_cases(backend: str) -> dict:
    """Every case of `backend`, run once in a 4-device subprocess: {case name: result}."""
    names = [name for run_backend, name in _RUNS if run_backend == backend]
    command = [sys.executable, "-m", "tests.sharding_cases", backend, str(test_flags.SEED.value), *names]
    done = subprocess.run(
        command, cwd=_REPO, env=_four_device_environment(), capture_output=True, text=True, timeout=900
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["case"]] = result
    if done.returncode:  # every case it did not reach fails with its error (run once, not once per case)
        results = {name: results.get(name, {"crash": done.stderr[-6000:]}) for name in names}
    return results


@functools.cache
def _results(backend: str, shared_dir: pathlib.Path) -> dict:
    """_run_cases(backend), once per pytest session: the first xdist worker to ask runs it, under a file lock in
    the session's shared temporary folder, and the others wait for its JSON (tests/conftest.py orders these tests
    first, so that under xdist one worker takes them all)."""
    path = shared_dir / f"sharding-{backend}-seed{test_flags.SEED.value}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(_run_cases(backend)))
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder of this pytest session that every xdist worker sees (the base temp folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.mark.parametrize("backend,name", _RUNS, ids=[f"{b}-{n}" for b, n in _RUNS])
def test_sharded_matches_one_device(backend, name, shared_dir):
    if backend not in test_flags.BACKEND.value:
        pytest.skip(f"backend {backend} not selected by --backend")
    case, result = CASES[name], _results(backend, shared_dir)[name]
    assert "crash" not in result, f"tests/sharding_cases.py failed:\n{result['crash']}"
    if case.expect_error is not None:
        assert case.expect_error in result.get("error", ""), result
        return
    for quantity, error in result["errors"].items():
        if case.tolerance is not None:
            assert error <= case.tolerance, (quantity, error, name, backend)
            continue
        if error <= SHARDED_TOLERANCE:
            continue
        exact_error, one_device_exact_error = result["errors_f64"][quantity], result["one_device_errors_f64"][quantity]
        bound = FLOAT32_BOUND["gradient" if quantity.startswith("d") else "forward"]
        assert exact_error <= bound, (
            f"{quantity}: relative error {error:.2e} vs one device (> {SHARDED_TOLERANCE:.0e}), {exact_error:.2e} vs "
            f"float64 (> {bound:.0e}; one device: {one_device_exact_error:.2e}) ({name}, {backend})"
        )
    for quantity, (got, expected) in result["shardings"].items():
        assert got == expected, f"{quantity} is sharded as {got}, expected {expected} ({name}, {backend})"
    collectives = result["collectives"]
    if "s" in case.axis_names:  # only states move: (..., DHQK, DHHV), (..., DHQK) or (...) over B, NH and shards
        assert collectives and all(_is_state_shaped(shape) for _, shape in collectives), (
            f"more than states move between devices: {collectives}"
        )
    else:  # nothing but the loss's scalar sums
        assert all(shape == [] for _, shape in collectives), f"arrays move between devices: {collectives}"


def _is_state_shaped(shape: list[int]) -> bool:
    """A state, its scalars or a stack of them: leading dims no larger than 8 (B, NH, the 4 shards, a vmap of 2),
    then (DHQK, DHHV), (DHQK,) or nothing. Every sequence-shaped array has a dim of at least 32 (S / 4)."""
    for tail in ((DHQK, DHHV), (DHQK,), ()):
        lead = shape[: len(shape) - len(tail)]
        if tuple(shape[len(lead) :]) == tail and all(d <= 8 for d in lead):
            return True
    return False


@functools.cache
def _single_gpu_kernel_count() -> int:
    mesh = AbstractMesh((1,), ("b",), axis_types=(AxisType.Auto,), abstract_device=CUDA_DEVICE)
    return lower_for_cuda(mesh, (None,)).count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize(
    "mesh_shape,axis_names,lead_spec",
    [
        ((2,), ("b",), ("b",)),
        ((2, 2), ("b", "h"), ("b", "h")),
        ((2, 2), ("b", "s"), ("b", None, "s")),
    ],
    ids=["2gpu-batch", "4gpu-batch-heads", "4gpu-batch-seq"],
)
def test_triton_lowers_on_gpu_mesh(mesh_shape, axis_names, lead_spec):
    """The per-shard program (the one XLA runs per GPU) lowers to Triton for a multi-GPU mesh, with the kernels of
    one GPU's program."""
    mesh = AbstractMesh(
        mesh_shape, axis_names, axis_types=(AxisType.Explicit,) * len(axis_names), abstract_device=CUDA_DEVICE
    )
    text = lower_for_cuda(mesh, lead_spec)
    kernels = text.count("__gpu$xla.gpu.triton")
    single = _single_gpu_kernel_count()
    # as many kernel launches as on one GPU: a sequence shard repeats no pass (Explicit axes keep the chunk states)
    assert kernels == single > 0, (kernels, single)
    assert "sdy.manual_computation" in text  # the kernels run per shard


def test_mosaic_lowers_on_gpu_mesh():
    """backend="mosaic" under batch and sequence sharding over 4 GPUs: the per-shard program holds two Mosaic GPU
    kernels (the forward's H kernel and dV) and Triton's others, as many launches as the Triton backend's."""
    mesh = AbstractMesh((2, 2), ("b", "s"), axis_types=(AxisType.Explicit,) * 2, abstract_device=CUDA_DEVICE)
    text = lower_for_cuda(mesh, ("b", None, "s"), backend="mosaic")
    mosaic, triton = text.count("stablehlo.custom_call @mosaic_gpu"), text.count("__gpu$xla.gpu.triton")
    assert mosaic == 2 and mosaic + triton == _single_gpu_kernel_count(), (mosaic, triton)
    assert "sdy.manual_computation" in text


_DOCUMENTS_AND_STEPS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
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

# unsplit inputs inside jax.set_mesh, on Explicit and on Auto axes: placed whole on the mesh, and uncommitted
plain = lambda q, k, v, i, f: jnp.sum(w * pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="xla"))
plain_grad = jax.value_and_grad(plain, argnums=(0, 1, 2, 3, 4))
one_value, one_grads = jax.jit(plain_grad)(q, k, v, i, f)
for kind in (AxisType.Explicit, AxisType.Auto):
    mesh3 = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(kind, kind))
    for inputs in ((q, k, v, i, f), jax.device_put((q, k, v, i, f), NamedSharding(mesh3, P()))):
        with jax.set_mesh(mesh3):
            value, grads = jax.jit(plain_grad)(*inputs)
        assert abs(float(value) - float(one_value)) <= 1e-6 * abs(float(one_value)), (kind, value, one_value)
        for g, e in zip(grads, one_grads):
            assert rel_err(g, e) <= 1e-6, (kind, rel_err(g, e))

# no chunk_size with S split over Explicit axes: the default (128 for S = 128) halved to divide a shard of 64
mesh4 = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
split = lambda x: jax.device_put(x, NamedSharding(mesh4, P("data", None, "seq")))
default = jax.jit(lambda *a: pallas_mlstm.mlstm_chunkwise(*a, backend="xla"))(*map(split, (q, k, v, i, f)))
assert rel_err(default, pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=64, backend="xla")) <= 1e-6
print("ok")
"""


def test_documents_and_steps_under_sharded_jit():
    """Packed documents (`segment_ids`) under batch x sequence sharding, with documents that straddle the shard edge
    and one that starts on it; decoding steps with B and NH sharded; unsplit inputs inside jax.set_mesh (Explicit
    and Auto axes): equal to one device (4 CPU devices, a process of their own)."""
    if "xla" not in test_flags.BACKEND.value:
        pytest.skip("backend xla not selected by --backend")
    done = subprocess.run(
        [sys.executable, "-c", _DOCUMENTS_AND_STEPS],
        cwd=_REPO,
        env=_four_device_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-6000:]
