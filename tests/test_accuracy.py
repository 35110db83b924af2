"""pallas_mlstm.accuracy: the relative error's edge cases, the inputs, the bound tables, and the oracles' loader
(the commands where the oracles cannot be imported: tests/test_cli.py)."""

from __future__ import annotations

import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from pallas_mlstm import accuracy
from tests.helpers import case_key

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAM = "python -m pallas_mlstm"

# (actual, expected, rel_err): the edge cases rel_err documents
EDGE_CASES = {
    "equal": ([1.0, -2.0], [1.0, -2.0], 0.0),
    "non-zero vs zeros": ([3.0, 4.0], [0.0, 0.0], float("inf")),
    "known": ([1.0, 2.0, 2.0], [1.0, 2.0, 2.0 + 3.0], 3.0 / np.sqrt(1 + 4 + 25)),
    "nan actual": ([np.nan, 1.0], [1.0, 1.0], float("inf")),
    "inf actual": ([np.inf, 1.0], [1.0, 1.0], float("inf")),
    "nan expected": ([1.0, 1.0], [np.nan, 1.0], float("nan")),
    "inf expected, nan actual": ([np.nan, 1.0], [np.inf, 1.0], float("nan")),
    "zeros vs zeros": ([0.0, 0.0], [0.0, 0.0], 0.0),
    "empty": (np.zeros((0, 3)), np.zeros((0, 3)), 0.0),
}


def _same(got: float, want: float) -> bool:
    return (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("on_accelerator", [False, True], ids=["host", "device-path"])
def test_rel_err_edge_cases(monkeypatch, case, on_accelerator):
    """Both paths (NumPy; the compiled one that accelerator arrays take) give the documented values."""
    monkeypatch.setattr(accuracy, "_on_accelerator", lambda x: on_accelerator)
    actual, expected, want = EDGE_CASES[case]
    with jax.enable_x64(True):
        actual, expected = jnp.asarray(actual, jnp.float64), jnp.asarray(expected, jnp.float64)
    got = accuracy.rel_err(actual, expected)
    assert isinstance(got, float) and _same(got, want), (case, got, want)


def test_rel_err_is_float64_for_any_input_dtype():
    expected = np.linspace(1.0, 2.0, 64)
    actual = expected * (1 + 1e-12)
    assert accuracy.rel_err(actual, expected) == pytest.approx(1e-12, rel=1e-3)  # below float32's resolution
    h = jax.random.normal(case_key("rel-err-bf16"), (4, 32), jnp.bfloat16)
    assert accuracy.rel_err(h, h.astype(jnp.float32)) == 0.0
    assert accuracy.rel_err(h.astype(jnp.float16), np.asarray(h.astype(jnp.float32))) <= 1e-3


def test_rel_err_refuses_different_shapes():
    with pytest.raises(ValueError, match="one shape"):
        accuracy.rel_err(np.ones((2, 3)), np.ones(3))


@pytest.mark.parametrize(
    "dtype, with_initial, per_array",
    [(jnp.float32, False, False), (jnp.float32, True, False), (jnp.bfloat16, False, False), (jnp.bfloat16, True, True)],
)
def test_mlstm_inputs_shapes_and_dtypes(dtype, with_initial, per_array):
    q, k, v, i, f, c0, n0, m0 = accuracy.mlstm_inputs(
        case_key("inputs", with_initial), 2, 3, 32, 8, 16, dtype, with_initial=with_initial, per_array=per_array
    )
    assert [x.shape for x in (q, k, v, i, f)] == [(2, 3, 32, 8), (2, 3, 32, 8), (2, 3, 32, 16), (2, 3, 32), (2, 3, 32)]
    assert q.dtype == k.dtype == v.dtype == dtype and i.dtype == f.dtype == jnp.float32
    assert 2.0 < float(jnp.mean(f)) < 4.0  # forget gates around +3
    if with_initial:
        assert (c0.shape, n0.shape, m0.shape) == ((2, 3, 8, 16), (2, 3, 8), (2, 3))
    else:
        assert c0 is n0 is m0 is None


def test_kernel_and_oracle_inputs_hold_the_same_values():
    with jax.enable_x64(True):
        inputs64 = accuracy.mlstm_inputs(case_key("rounded"), 1, 2, 16, 8, 8, jnp.float64, with_initial=True)
        kernel_inputs, oracle_inputs = accuracy.kernel_and_oracle_inputs(inputs64, jnp.bfloat16)
        assert [x.dtype for x in kernel_inputs] == [jnp.bfloat16] * 3 + [jnp.float32] * 5
        assert all(y.dtype == jnp.float64 for y in oracle_inputs)
        for x, y in zip(kernel_inputs, oracle_inputs):
            np.testing.assert_array_equal(np.asarray(x.astype(jnp.float64)), np.asarray(y))


def test_check_bounds_are_the_loosest_backend_bounds_against_the_oracle():
    for dtype, bounds in accuracy.CHECK_TOLERANCE.items():
        per_backend = [value for (_, name), value in accuracy.ORACLE_TOLERANCE.items() if name == dtype]
        assert bounds == tuple(max(column) for column in zip(*per_backend)), dtype
    for _, dtype in (*accuracy.ORACLE_TOLERANCE, *accuracy.KERNEL_TWIN_TOLERANCE):
        assert jnp.dtype(dtype).name == dtype


def test_load_oracles(monkeypatch):
    reference = accuracy.load_oracles()
    assert callable(reference.mlstm_recurrent) and callable(reference.mlstm_parallel)
    monkeypatch.setitem(sys.modules, "reference", None)  # as in an installed wheel: no `reference` to import
    with pytest.raises(app.UsageError, match=r"reference/ package.*pip install -e \.") as raised:
        accuracy.load_oracles()
    assert "\n" not in str(raised.value)
    monkeypatch.setitem(sys.modules, "reference", types.ModuleType("reference"))  # someone else's `reference`
    with pytest.raises(app.UsageError, match="is not this project's"):
        accuracy.load_oracles()
