"""Array input checks shared by the oracles and the public API: `ValueError`s that say how to fix the call.

The rules for the non-array options live in pallas_mlstm/plan.py."""

from __future__ import annotations

import jax.numpy as jnp


def _shape_of(x):
    return tuple(getattr(x, "shape", ()))


def _check_float(name, x):
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise ValueError(
            f"{name} must be an array (a jax.Array or numpy.ndarray of floats); got a "
            f"{type(x).__name__}: pass jnp.asarray({name})."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64); got dtype {dtype}."
        )


MLSTM_INPUT_NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")
# upstream's `mlstm_chunkwise_fw` / `_bw` names for the same arrays
UPSTREAM_INPUT_NAMES = ("matQ", "matK", "matV", "vecI", "vecF", "matC_initial", "vecN_initial", "scaM_initial")


def validate_mlstm_inputs(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *, names=MLSTM_INPUT_NAMES):
    """Checks ranks, shapes and dtypes of the mLSTM inputs, naming them as `names` does; returns (B, NH, S, DHQK,
    DHHV)."""
    nq, nk, nv, ni, nf, nc, nn, nm = names
    for name, x in ((nq, q), (nk, k), (nv, v), (ni, i), (nf, f)):
        _check_float(name, x)
    if len(_shape_of(q)) != 4:
        raise ValueError(f"{nq} must have rank 4, (B, NH, S, DHQK); got shape {_shape_of(q)}.")
    batch, heads, seq_len, dhqk = _shape_of(q)
    if _shape_of(k) != _shape_of(q):
        raise ValueError(f"{nk} must have the shape of {nq}, {_shape_of(q)}; got {_shape_of(k)}.")
    if len(_shape_of(v)) != 4 or _shape_of(v)[:3] != (batch, heads, seq_len):
        raise ValueError(
            f"{nv} must have shape (B, NH, S, DHHV) = ({batch}, {heads}, {seq_len}, DHHV); got {_shape_of(v)}."
        )
    dhhv = _shape_of(v)[3]
    if 0 in (seq_len, dhqk, dhhv):  # an empty batch or head axis is fine: the outputs are empty too
        raise ValueError(
            f"{nq} and {nv} must have at least one step (S) and one element per head (DHQK, DHHV); got {nq} "
            f"{_shape_of(q)}, {nv} {_shape_of(v)}."
        )
    for name, gate in ((ni, i), (nf, f)):
        if _shape_of(gate) != (batch, heads, seq_len):
            raise ValueError(f"{name} must have shape (B, NH, S) = {(batch, heads, seq_len)}; got {_shape_of(gate)}.")
    validate_optional_arrays(
        (nc, c_initial, (batch, heads, dhqk, dhhv)),
        (nn, n_initial, (batch, heads, dhqk)),
        (nm, m_initial, (batch, heads)),
        source=f"{nq} and {nv}",
    )
    if (n_initial is not None or m_initial is not None) and c_initial is None:
        raise ValueError(f"{nn} / {nm} were given without {nc}: pass {nc} too, or none of them.")
    return batch, heads, seq_len, dhqk, dhhv


def validate_optional_arrays(*expected, source: str = "q and v") -> None:
    """Checks each (name, array or None, shape) of `expected`: a given array is floating-point, of that shape
    (taken from the arrays `source` names)."""
    for name, x, shape in expected:
        if x is None:
            continue
        _check_float(name, x)
        if _shape_of(x) != shape:
            raise ValueError(f"{name} must have shape {shape} (from {source}); got {_shape_of(x)}.")


def validate_step_inputs(q, k, v, c, n) -> tuple[int, int, int, int]:
    """Checks the shapes and dtypes of one decoding step's token (q, k (B, NH, DHQK), v (B, NH, DHHV)) and states
    (c (B, NH, DHQK, DHHV), n (B, NH, DHQK)); returns (B, NH, DHQK, DHHV)."""
    if len(_shape_of(q)) != 3:
        raise ValueError(f"q must have shape (B, NH, DHQK) for one token; got {_shape_of(q)}.")
    batch, heads, dhqk = _shape_of(q)
    if _shape_of(k) != _shape_of(q):
        raise ValueError(f"k must have the shape of q, {_shape_of(q)}; got {_shape_of(k)}.")
    if len(_shape_of(v)) != 3 or _shape_of(v)[:2] != (batch, heads):
        raise ValueError(f"v must have shape (B, NH, DHHV) = ({batch}, {heads}, DHHV); got {_shape_of(v)}.")
    dhhv = _shape_of(v)[2]
    for name, x, expected in (("c", c, (batch, heads, dhqk, dhhv)), ("n", n, (batch, heads, dhqk))):
        if _shape_of(x) != expected:
            raise ValueError(
                f"{name} must have shape {expected} (from q and v); got {_shape_of(x)}: pass the states "
                "mlstm_chunkwise(..., return_last_states=True) or the previous step returned."
            )
    for name, x in (("q", q), ("k", k), ("v", v), ("c", c), ("n", n)):
        _check_float(name, x)
    validate_operand_dtypes(q, k, v)
    return batch, heads, dhqk, dhhv


def validate_step_gate(name: str, x, batch: int, heads: int):
    """A step's gate or m state, given as (B, NH) or upstream's (B, NH, 1), as (B, NH)."""
    if _shape_of(x) not in ((batch, heads), (batch, heads, 1)):
        raise ValueError(f"{name} must have shape (B, NH) = {(batch, heads)} or (B, NH, 1); got {_shape_of(x)}.")
    _check_float(name, x)
    return x.reshape(batch, heads)


# The shapes of the six chunkwise kernels' arrays, by upstream's argument names (NC chunks of L steps; the states'
# NC counts the chunks they are saved at).
_KERNEL_ARRAY_SHAPES = {
    **dict.fromkeys(("matQ", "matK"), ("B", "NH", "S", "DHQK")),
    **dict.fromkeys(("matV", "matDeltaH"), ("B", "NH", "S", "DHHV")),
    **dict.fromkeys(("vecI", "vecF", "vecN_out", "vecM_out", "vecM_combine"), ("B", "NH", "S")),
    **dict.fromkeys(("vecA", "vecB", "vecR"), ("B", "NH", "NC", "L")),
    **dict.fromkeys(("matC_all", "matC_states", "matDeltaC_states"), ("B", "NH", "(NC+1)·DHQK", "DHHV")),
    "vecN_all": ("B", "NH", "(NC+1)·DHQK"),
    **dict.fromkeys(("scaM_all", "scaM_inter"), ("B", "NH", "NC+1")),
    **dict.fromkeys(("matC_initial", "matDeltaC_last"), ("B", "NH", "DHQK", "DHHV")),
    "vecN_initial": ("B", "NH", "DHQK"),
    "scaMinter_initial": ("B", "NH"),
}


def _kernel_dims(arrays: dict) -> tuple[str, dict]:
    """The source names and dims (B, NH, S, DHQK from matQ, else matK; DHHV from matV, else matDeltaH) of one
    chunkwise kernel's `arrays`, those two arrays checked."""
    qk_name = "matQ" if "matQ" in arrays else "matK"
    hv_name = "matV" if "matV" in arrays else "matDeltaH"
    for name in (qk_name, hv_name):
        _check_float(name, arrays[name])
    qk, hv = _shape_of(arrays[qk_name]), _shape_of(arrays[hv_name])
    if len(qk) != 4:
        raise ValueError(f"{qk_name} must have rank 4, (B, NH, S, DHQK); got shape {qk}.")
    if len(hv) != 4 or hv[:3] != qk[:3]:
        lead = ", ".join(map(str, qk[:3]))
        raise ValueError(f"{hv_name} must have shape (B, NH, S, DHHV) = ({lead}, DHHV); got {hv}.")
    return f"{qk_name} and {hv_name}", dict(zip(("B", "NH", "S", "DHQK"), qk), DHHV=hv[3])


def kernel_seq_len(arrays: dict) -> int:
    """S of one chunkwise kernel's `arrays` {upstream's argument name: array or None}, after checking the two arrays
    it takes the dims from (matQ or matK, matV or matDeltaH)."""
    return _kernel_dims(arrays)[1]["S"]


def validate_kernel_arrays(arrays: dict, chunk_size: int, save_states_every_nth_chunk: int = 1) -> None:
    """Checks one chunkwise kernel's `arrays` {upstream's argument name: array or None} against one another, for a
    checked chunk size: the dims from `kernel_seq_len`'s two arrays, L = `chunk_size`, the states' NC from chunks
    of chunk_size · save_states_every_nth_chunk steps. vecR is an integer array, the others floating-point."""
    source, dims = _kernel_dims(arrays)
    nc = dims["S"] // (chunk_size * save_states_every_nth_chunk)
    dims.update(L=chunk_size, NC=dims["S"] // chunk_size)
    dims.update({"NC+1": nc + 1, "(NC+1)·DHQK": (nc + 1) * dims["DHQK"]})
    for name, x in arrays.items():
        if x is None:
            continue
        if name == "vecR":
            if not jnp.issubdtype(getattr(x, "dtype", jnp.float32), jnp.integer):
                raise ValueError(
                    f"vecR must be an integer array (from compute_chunkwise_reset_gates); got dtype "
                    f"{getattr(x, 'dtype', type(x).__name__)}."
                )
        else:
            _check_float(name, x)
        pattern = _KERNEL_ARRAY_SHAPES[name]
        expected = tuple(dims[dim] for dim in pattern)
        if _shape_of(x) != expected:
            raise ValueError(
                f"{name} must have shape ({', '.join(pattern)}) = {expected} (from {source} and the chunk size); "
                f"got {_shape_of(x)}."
            )


def validate_segment_ids(segment_ids, batch: int, seq_len: int) -> None:
    """Checks that segment_ids is an integer array of shape (B, S)."""
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer array (B, S) of document ids, e.g. int32; got dtype {dtype}.")
    if _shape_of(segment_ids) != (batch, seq_len):
        raise ValueError(
            f"segment_ids must have shape (B, S) = {(batch, seq_len)}, one document id per token; got "
            f"{_shape_of(segment_ids)}."
        )


def validate_operand_dtypes(q, k, v, names=MLSTM_INPUT_NAMES) -> None:
    """Checks that q, k and v (the matmul operands) share a dtype."""
    if v.dtype != q.dtype or k.dtype != q.dtype:
        raise ValueError(
            f"{names[0]}, {names[1]} and {names[2]} must share a dtype (got {q.dtype}, {k.dtype}, {v.dtype}); cast "
            "them to one (mlstm_chunkwise also takes autocast_kernel_dtype)."
        )


_AUTOCAST_DTYPES = ("float16", "bfloat16", "float32")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def validate_float_dtype(name: str, dtype, allow_none: bool = False):
    """`dtype` (an output or state-buffer dtype) as a NumPy dtype: float16, bfloat16, float32 or float64; None
    passes where `allow_none`."""
    if dtype is None and allow_none:
        return None
    try:
        checked = None if dtype is None else jnp.dtype(dtype)
    except TypeError:
        checked = None
    if checked is None or checked.name not in _FLOAT_DTYPES:
        choices = "float16, bfloat16, float32, float64" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be a floating-point dtype ({choices}); got {dtype!r}.")
    return checked


def validate_autocast_dtype(dtype):
    """`autocast_kernel_dtype` as a NumPy dtype: float16, bfloat16, float32, or None (no cast)."""
    if dtype is None:
        return None
    try:
        checked = jnp.dtype(dtype)
    except TypeError:
        checked = None
    if checked is None or checked.name not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast_kernel_dtype must be float16, bfloat16, float32 or None; got {dtype!r}.")
    return checked
