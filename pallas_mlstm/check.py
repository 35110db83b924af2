"""`python -m pallas_mlstm check`: run the chunkwise mLSTM on this machine and compare it with the oracle."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_mlstm
from pallas_mlstm import accuracy
from pallas_mlstm.benchmarks.timing import median_ms
from pallas_mlstm.plan import INPUT_GATES, validate_chunk_size
from pallas_mlstm.registry import get_backend, registered

_BACKENDS = flags.DEFINE_list(
    "check_backends",
    None,
    f"Backends to check, any of {','.join(pallas_mlstm.BACKENDS)} (default: triton,xla "
    "on a GPU, interpret,xla otherwise).",
)
_SHAPE = flags.DEFINE_list(
    "check_shape", ["2", "2", "256", "64", "128"], "B,NH,S,DHQK,DHHV of the random inputs: 5 positive integers."
)
_CHUNK = flags.DEFINE_integer(
    "check_chunk_size",
    64,
    "Chunk size: a power of 2 dividing S, at least the backend's smallest chunk (16 on the "
    "Pallas backends triton and interpret).",
)
_DTYPES = flags.DEFINE_list(
    "check_dtypes",
    None,
    "Input dtypes of q, k, v, any of float32,bfloat16,float16 (default: float32,bfloat16 on a GPU, float32 otherwise).",
)
_SEED = flags.DEFINE_integer("check_seed", 0, "Seed of the random inputs.")
_INPUT_GATE = flags.DEFINE_string(
    "check_input_gate",
    "exponential",
    "The cell: exponential (mLSTMexp, the default) or sigmoid (mLSTMsig, "
    "normalised), checked against its own float64 oracle.",
)
_REPEATS = flags.DEFINE_integer("check_repeats", 5, "Timed calls per measurement (median reported).", lower_bound=1)

GRAD_NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")


def _loss(fn, weights_key):
    def loss(*args):
        h, (c_last, n_last, *_) = fn(*args)  # no m with the sigmoid gate
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        weights = jax.random.normal(weights_key, h.shape, jnp.float32).astype(h.dtype)
        return jnp.sum(weights * h) + jnp.sum(c_last) + jnp.sum(n_last)

    return loss


def run_check(backends, shape, chunk_size, dtypes, seed, repeats, input_gate="exponential") -> list[dict]:
    """Errors (vs the float64 recurrent oracle of `input_gate`'s cell, kernel gradient semantics) and times for each
    backend × dtype.

    The oracle runs on exactly the values the kernels get (q, k, v rounded to the dtype), so the errors
    measure the computation, not the rounding of the inputs.
    """
    reference = accuracy.load_oracles()
    key = jax.random.PRNGKey(seed)
    weights_key = jax.random.fold_in(key, 1)
    with jax.enable_x64(True):
        inputs64 = accuracy.mlstm_inputs(key, *shape, jnp.float64, with_initial=True)
    if input_gate == "sigmoid":  # states (c, n): no m_initial
        inputs64 = (*inputs64[:7], None)
        oracle = lambda *a: reference.mlstm_sigmoid_recurrent(
            *a[:7], return_last_states=True, kernel_gradient_semantics=True
        )
    else:
        oracle = lambda *a: reference.mlstm_recurrent(*a, return_last_states=True, kernel_gradient_semantics=True)
    argnums = tuple(index for index, x in enumerate(inputs64) if x is not None)
    rows = []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        with jax.enable_x64(True):
            args, rounded64 = accuracy.kernel_and_oracle_inputs(inputs64, dtype)
            h_ref, _ = jax.jit(oracle)(*rounded64)
            grads_ref = jax.jit(jax.grad(_loss(oracle, weights_key), argnums=argnums))(*rounded64)
        for backend in backends:
            run = lambda *a: pallas_mlstm.mlstm_chunkwise(
                *a, chunk_size=chunk_size, backend=backend, return_last_states=True, input_gate=input_gate
            )
            forward = jax.jit(run)
            backward = jax.jit(jax.grad(_loss(run, weights_key), argnums=argnums))
            h, _ = forward(*args)
            grads = backward(*args)
            names = [GRAD_NAMES[index] for index in argnums]
            grad_errors = {name: accuracy.rel_err(g, e) for name, g, e in zip(names, grads, grads_ref)}
            worst = max(grad_errors, key=grad_errors.get)
            fw_tol, grad_tol = accuracy.CHECK_TOLERANCE[dtype.name]
            fw_err = accuracy.rel_err(h, h_ref)
            rows.append(
                dict(
                    backend=backend,
                    dtype=dtype.name,
                    fw_err=fw_err,
                    grad_err=grad_errors[worst],
                    worst_grad=worst,
                    fw_ms=median_ms(forward, [args], repeats),
                    fwbw_ms=median_ms(backward, [args], repeats),
                    ok=fw_err <= fw_tol and grad_errors[worst] <= grad_tol,
                )
            )
    return rows


def _validated_shape(entries: list[str]) -> tuple[int, ...]:
    """--check_shape as 5 ints; UsageError unless it is 5 positive integers."""
    if len(entries) != 5 or not all(entry.isdecimal() and int(entry) > 0 for entry in entries):
        raise app.UsageError(
            f"--check_shape must be 5 comma-separated positive integers B,NH,S,DHQK,DHHV (e.g. "
            f"--check_shape=2,2,256,64,128); got {','.join(entries)!r}."
        )
    return tuple(int(entry) for entry in entries)


def _validated_backends(backends: list[str], on_gpu: bool, chunk_size: int, seq_len: int) -> list[str]:
    """`backends`; UsageError for an unknown one, triton without a GPU, or a chunk size that cannot run."""
    for backend in backends:
        if backend not in pallas_mlstm.BACKENDS:
            raise app.UsageError(
                f"--check_backends entries must be among {','.join(pallas_mlstm.BACKENDS)}; got {backend!r}."
            )
        if backend == "triton" and not on_gpu:
            raise app.UsageError(
                "--check_backends=triton needs a GPU and JAX sees none here; use --check_backends=interpret,xla."
            )
        if not registered(backend).available():
            unavailable = registered(backend).unavailable.format(platform=jax.default_backend())
            raise app.UsageError(f"--check_backends={backend}: {unavailable}")
        try:
            validate_chunk_size(chunk_size, seq_len, name="--check_chunk_size", minimum=get_backend(backend).min_chunk)
        except ValueError as error:
            raise app.UsageError(f"backend {backend} at --check_shape S={seq_len}: {error}") from None
    return backends


def main_check(argv) -> None:
    """Entry point of `python -m pallas_mlstm check`; exits 1 if any error is above its bound."""
    if len(argv) > 1:
        raise app.UsageError(f"check takes flags only; got the arguments {argv[1:]} (see --help).")
    shape = _validated_shape(_SHAPE.value)
    on_gpu = jax.default_backend() == "gpu"
    backends = _validated_backends(
        _BACKENDS.value or (["triton", "xla"] if on_gpu else ["interpret", "xla"]),
        on_gpu,
        _CHUNK.value,
        seq_len=shape[2],
    )
    dtypes = _DTYPES.value or (["float32", "bfloat16"] if on_gpu else ["float32"])
    for dtype in dtypes:
        if dtype not in accuracy.CHECK_TOLERANCE:
            raise app.UsageError(
                f"--check_dtypes entries must be among {','.join(accuracy.CHECK_TOLERANCE)}; got {dtype!r}."
            )
    if _INPUT_GATE.value not in INPUT_GATES:
        raise app.UsageError(f"--check_input_gate must be one of {','.join(INPUT_GATES)}; got {_INPUT_GATE.value!r}.")
    accuracy.load_oracles()  # before any output: a missing oracle is a one-line usage error
    device = jax.devices()[0]
    print(
        f"pallas_mlstm {pallas_mlstm.__version__} check on {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}"
    )
    print(
        f"shape B,NH,S,DHQK,DHHV = {shape}, chunk {_CHUNK.value}, {_INPUT_GATE.value} input gate; reference: "
        "float64 recurrent scan (den and m held constant in its gradient, as in the kernels)"
    )
    if not on_gpu:
        print("no GPU: interpret runs the Pallas kernels in the interpreter; its times say nothing about speed.")
    rows = run_check(backends, shape, _CHUNK.value, dtypes, _SEED.value, _REPEATS.value, _INPUT_GATE.value)
    header = (
        f"{'backend':<10} {'dtype':<9} {'h rel err':>10} {'grad rel err (worst)':>24} {'fw ms':>9} "
        f"{'fw+bw ms':>9}  result"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        grad = f"{row['grad_err']:.1e} ({row['worst_grad']})"
        print(
            f"{row['backend']:<10} {row['dtype']:<9} {row['fw_err']:>10.1e} {grad:>24} {row['fw_ms']:>9.2f} "
            f"{row['fwbw_ms']:>9.2f}  {'ok' if row['ok'] else 'FAIL'}"
        )
    bounds = ", ".join(
        f"{name} {fw:g}/{grad:g}" for name, (fw, grad) in accuracy.CHECK_TOLERANCE.items() if name in dtypes
    )
    print(f"bounds (h / gradients): {bounds}")
    failed = [f"{row['backend']} {row['dtype']}" for row in rows if not row["ok"]]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} rows above their bounds: {', '.join(failed)}.")
