"""The bench, kernel-timer and tune runs at the tiny CPU shape (records, table, disclaimer) and tune's search stages
(reading tuned configs: tests/test_config.py). bench runs as a user runs it, a fresh process that starts one worker
process per implementation; kernel_times and tune run `python -m pallas_mlstm`'s main in this process (its flags
restored after), which shares this process's compiled programs."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver
from jax.experimental import pallas as pl

import pallas_mlstm
import pallas_mlstm.__main__ as cli
import pallas_mlstm.check  # noqa: F401  (every command's flags exist before flagsaver saves them)
import pallas_mlstm.config  # noqa: F401
from pallas_mlstm import mosaic_gpu, registry
from pallas_mlstm.accuracy import BENCH_TOLERANCE, rel_err
from pallas_mlstm.benchmarks import impls, kernel_times, mosaic_check, runner, step_bench, sweep, timing  # noqa: F401
from pallas_mlstm.benchmarks.shapes import Shape, resolve_shapes
from pallas_mlstm.config import ChunkwiseConfig, shape_class

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = {
    "impl",
    "shape",
    "B",
    "NH",
    "S",
    "DHQK",
    "DHHV",
    "chunk_size",
    "mode",
    "median_ms",
    "back_to_back_ms",
    "peak_bytes",
    "rel_err",
    "card",
    "jax_version",
    "date",
    "command",
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `python -m pallas_mlstm bench` at the tiny shape, in a fresh process with its worker. One implementation:
    bench's per-implementation path is the same for each (impls.py maps a name to `mlstm_chunkwise` on a backend;
    the interpreter's backend is tests/test_api.py's), and each implementation costs a worker process."""
    records_path = tmp_path_factory.mktemp("bench") / "records.json"
    command = [
        sys.executable,
        "-m",
        "pallas_mlstm",
        "bench",
        "--shapes=tiny",
        "--impls=xla",
        "--calls=2",
        f"--json={records_path}",
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    with open(records_path) as file:
        return finished.stdout, json.load(file)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the bench's CPU smoke run (tiny shape, disclaimer)")
def test_bench_records_and_disclaimer(bench_run):
    stdout, records = bench_run
    assert "these times mean nothing" in stdout.lower()
    assert {(r["impl"], r["mode"]) for r in records} == {("xla", "fw"), ("xla", "fwbw")}
    for record in records:
        assert RECORD_FIELDS <= set(record)
        assert (record["shape"], record["B"], record["NH"], record["S"]) == ("tiny", 1, 2, 256)
        assert record["median_ms"] > 0 and record["back_to_back_ms"] > 0 and record["rel_err"] < BENCH_TOLERANCE
        assert record["card"] == "cpu" and record["command"].startswith("python -m pallas_mlstm bench")
    assert "median ms" in stdout and "back to back ms" in stdout and "xla" in stdout  # the table


def test_back_to_back_rounds_rotate_the_sets_and_bound_the_outputs_alive(monkeypatch):
    """timing.back_to_back_ms: calls // per_round rounds (at least one), each after IN_FLIGHT + 1 untimed calls on
    its first set, the sets rotating by call; when a call is issued at most IN_FLIGHT earlier outputs are alive
    (the host waits for a call once IN_FLIGHT are queued behind it); the median of the rounds' times per call."""
    seconds = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}  # each call's duration on a fake clock
    clock, seen, alive, most_alive = [0.0], [], set(), [0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Output:
        def __init__(self, name):
            self.name = name
            alive.add(name)

        def __del__(self):
            alive.discard(self.name)

        def block_until_ready(self):
            return self

    def function(name):
        most_alive[0] = max(most_alive[0], len(alive))
        seen.append(name)
        clock[0] += seconds[name]
        return Output(len(seen))

    sets = [(name,) for name in "abcd"]
    ms = timing.back_to_back_ms(function, sets, calls=9, per_round=4)
    assert seen == ["a"] * 3 + ["a", "b", "c", "d"] + ["a"] * 3 + ["a", "b", "c", "d"]  # two rounds of 4, warmed up
    assert ms == pytest.approx(1e3 * (1 + 2 + 3 + 4) / 4)  # both rounds' time per call (their median)
    assert most_alive[0] == timing.IN_FLIGHT
    seen.clear()
    timing.back_to_back_ms(function, sets, calls=2, per_round=10)  # fewer calls than a round: one round of 2
    assert seen == ["a"] * 3 + ["a", "b"]


def _run_command(*arguments) -> None:
    """`python -m pallas_mlstm ARGUMENTS` in this process, its flags restored after; fails on a non-zero exit."""
    with flagsaver.flagsaver():
        try:
            cli.main(list(arguments))
        except SystemExit as exit:
            assert not exit.code, f"{arguments[0]} exited with {exit.code}"


def _kernel_times(tmp_path, *flags):
    """Runs `python -m pallas_mlstm kernel_times` in interpret mode at the tiny shape; returns its rows."""
    rows_path = tmp_path / "rows.json"
    flags = ("--kernel_backend=interpret", "--kernel_shapes=tiny", "--kernel_chunk=32", "--kernel_calls=1", *flags)
    _run_command("kernel_times", *flags, f"--kernel_json={rows_path}")
    with open(rows_path) as file:
        return json.load(file)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU smoke run of the per-kernel timer (interpret)")
def test_kernel_times_rows(tmp_path, monkeypatch):
    """A row per kernel of the backend's KernelSet, and one for its call of dK and dQ together where it has one
    (here the interpreter's set given one that runs its two launchers), with the FLOPs of both."""
    interpret = registry.registered("interpret")
    kernels = interpret.kernels
    both = lambda dk_call, dq_call, *arrays: (
        kernels.parallel_bw_dK(dk_call, *arrays),
        kernels.parallel_bw_dQ(dq_call, *arrays),
    )
    one_launch = dataclasses.replace(interpret, kernels=dataclasses.replace(kernels, parallel_bw_dK_dQ=both))
    monkeypatch.setitem(registry._BY_NAME, "interpret", one_launch)
    rows = _kernel_times(tmp_path)
    assert [row["kernel"] for row in rows] == [
        "gates (vecA, vecB, vecR)",
        "recurrent_fw_C",
        "parallel_fw_Hintra",
        "recurrent_bw_dC",
        "parallel_bw_dQ",
        "parallel_bw_dK",
        "parallel_bw_dV",
        "dK_and_dQ",
    ]
    assert all(row["ms"] > 0 and row["gbytes"] > 0 and row["backend"] == "interpret" and row["date"] for row in rows)
    by_name = {row["kernel"]: row for row in rows}
    assert by_name["dK_and_dQ"]["tflop"] == 2 * by_name["parallel_bw_dK"]["tflop"] > 0


def test_kernel_times_chains_the_kernels_as_the_op_does():
    """The backward kernels' cases, run on the arrays kernel_times chains through the forward kernels, give the
    op's gradients of q, k and v for the cotangent dh that the cases use (xla backend, bf16 kernels)."""
    shape = resolve_shapes(["tiny"])[0]
    cases = {case.name: case for case in kernel_times.kernel_cases(shape, 64, "xla")}
    q, k, v, i, _, _, _, _, dh, _ = cases["parallel_bw_dV"].args
    f = cases["recurrent_fw_C"].args[2]
    op = lambda q, k, v: pallas_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=64, backend="xla", eps=0.0)
    _, pullback = jax.vjp(op, q, k, v)
    expected = dict(zip(("parallel_bw_dQ", "parallel_bw_dK", "parallel_bw_dV"), pullback(dh)))
    for name, gradient in expected.items():
        case = cases[name]
        output = jax.tree.leaves(case.make(None)(*case.args))[0]
        assert output.shape == gradient.shape and rel_err(output, gradient) < 1e-2, name


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_kernel_times_counts_the_arrays_each_kernel_reads(backend):
    """A case's `read` (the bytes its GB/s counts) holds what the kernel reads: with every other argument NaN its
    outputs are unchanged, and with any of the large arrays of `read` (q, k, v, dh and the states: the head dims
    last) NaN they change."""
    shape = resolve_shapes(["tiny"])[0]
    poison = lambda x: jnp.full_like(x, jnp.nan)
    for case in kernel_times.kernel_cases(shape, 64, backend):
        if case.read is None:
            continue
        run = case.make(None)
        expected = jax.tree.leaves(run(*case.args))
        read = {id(x) for x in jax.tree.leaves(case.read)}
        unread_poisoned = jax.tree.map(lambda x: x if id(x) in read else poison(x), case.args)
        assert any(id(x) not in read for x in jax.tree.leaves(case.args)), case.name
        for got, want in zip(jax.tree.leaves(run(*unread_poisoned)), expected):
            np.testing.assert_array_equal(got, want, err_msg=case.name)
        for array in jax.tree.leaves(case.read):
            if array.shape[-1] not in (shape.DHQK, shape.DHHV) or array.shape[-1] == 64:  # gates: (..., chunk 64)
                continue
            poisoned = jax.tree.map(lambda x: poison(x) if x is array else x, case.args)
            outputs = jax.tree.leaves(run(*poisoned))
            assert any(not np.array_equal(g, w, equal_nan=True) for g, w in zip(outputs, expected)), (
                case.name,
                array.shape,
            )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU smoke run of the per-kernel launch sweep (interpret)")
def test_kernel_launch_sweep_agrees_across_launches(tmp_path):
    from pallas_mlstm.benchmarks.kernel_times import LAUNCH_CANDIDATES

    rows = _kernel_times(tmp_path, "--kernel_sweep", "--kernel_names=parallel_bw_dK,recurrent_bw_dC")
    for name in ("parallel_bw_dK", "recurrent_bw_dC"):
        launches = [row for row in rows if row["kernel"] == name]
        assert [row["launch"] for row in launches] == [dict(c) for c in LAUNCH_CANDIDATES[name]]
        assert launches[0]["launch"] == {} and launches[0]["rel_diff"] == 0.0
        # bf16 inputs: launches differ only in summation order
        assert all("error" not in row and row["rel_diff"] < 1e-2 for row in launches), launches


def test_tune_stages_offer_the_kernel_defaults():
    shape = resolve_shapes(["7b"])[0]
    first = sweep._sequence_stage(ChunkwiseConfig(), shape)
    # every chunk size alone first (tiles left to the kernels), then with the tile pairs
    assert first[:3] == [ChunkwiseConfig(chunk_size=c) for c in (64, 128, 256)]
    assert len(set(first)) == len(first) == 18  # 7 tile pairs x 3 chunks, less the pairs longer than the chunk
    assert all(c.siz_b_L_parallel is None or c.siz_b_L_parallel <= c.chunk_size for c in first)
    assert ChunkwiseConfig(chunk_size=256, siz_b_L_parallel=128, siz_b_L_loop=128) in first
    heads = sweep._head_stage(ChunkwiseConfig(chunk_size=256), shape)
    assert ChunkwiseConfig(chunk_size=256) in heads and len(heads) == 16
    intra = sweep._intra_stage(ChunkwiseConfig(), shape)
    assert intra[0] == ChunkwiseConfig() and len(intra) == 7  # both None, or warps x stages set together


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU smoke run of tune (interpret, tiny shape)")
def test_tune_smoke_writes_an_entry(tmp_path):
    configs_path = tmp_path / "configs.json"
    _run_command(
        "tune",
        "--tune_backend=interpret",
        "--shapes=tiny",
        f"--configs_out={configs_path}",
        "--time_budget_s=1",  # the start config and one candidate (the budget counts from one on)
        "--calls=2",
    )
    entry = json.loads(configs_path.read_text())["configs"][jax.devices()[0].device_kind][shape_class(256, 32, 32)]
    assert entry["configs_timed"] >= 2 and entry["fwbw_ms"] > 0 and entry["backend"] == "interpret"
    ChunkwiseConfig(**entry["config"])  # the stored fields are the config's
    assert entry["temp_bytes"] <= entry["default_temp_bytes"] * (1 + sweep.TEMP_MEMORY_SLACK)


def test_tune_shares_its_budget_among_the_shapes(monkeypatch, tmp_path):
    """With two shapes and --time_budget_s=100, the first may search until about 50 s from the start and the second
    gets what is left (about 100 s, as the first here returns at once), not the first everything."""
    start, deadlines = time.monotonic(), []

    def tune_shape(shape, backend, calls, deadline):
        deadlines.append(deadline - start)
        return {"config": {}, "fwbw_ms": 1.0, "default_fwbw_ms": 1.0, "complete": True}

    monkeypatch.setattr(sweep, "tune_shape", tune_shape)
    configs_path = tmp_path / "configs.json"
    _run_command(
        "tune", "--tune_backend=interpret", "--shapes=tiny,tiny-packed", f"--configs_out={configs_path}",
        "--time_budget_s=100",
    )  # fmt: skip
    assert len(deadlines) == 2 and 45 < deadlines[0] < 51 and 95 < deadlines[1] < 101, deadlines


def _tune_without_compiling(
    monkeypatch, milliseconds, evaluate=None, program_key=None, memory=None, like_cards=()
) -> dict | None:
    """`sweep.tune_shape` at the tiny shape with made-up measurements: a candidate's time is `milliseconds(config)`,
    its "compiled forward+backward" the candidate itself (`evaluate` may also record it), its program
    `program_key(config)` (default: the config) and its temporary memory `memory(config)` (default: 1000 bytes).
    The search starts from the heuristics, with `like_cards` as the entries of cards like this one."""
    monkeypatch.setattr(sweep, "tuned_config_for", lambda *arguments: None)
    monkeypatch.setattr(sweep, "like_cards_configs_for", lambda *arguments: list(like_cards))
    monkeypatch.setattr(sweep.runner, "make_inputs", lambda *arguments: ())
    monkeypatch.setattr(sweep.runner, "make_weights", lambda *arguments: None)
    monkeypatch.setattr(sweep.runner, "check_forward", lambda *arguments: (0.0, "the reference"))
    evaluate = evaluate or (lambda config, *arguments: (milliseconds(config), (None,), config))
    monkeypatch.setattr(sweep, "_evaluate", evaluate)
    monkeypatch.setattr(sweep, "_program_key", lambda config, *arguments: (program_key or (lambda c: c))(config))
    monkeypatch.setattr(sweep, "_temp_bytes", lambda fwbw, arguments: (memory or (lambda c: 1000))(fwbw))
    monkeypatch.setattr(sweep.timing, "back_to_back_ms", lambda fwbw, argument_sets, calls: milliseconds(fwbw))
    return sweep.tune_shape(resolve_shapes(["tiny"])[0], "interpret", 2, deadline=float("inf"))


def test_tune_keeps_no_candidate_that_needs_more_memory(monkeypatch):
    """Three candidates faster than the start, in turn: the first needs more temporary memory than the start allows
    (TEMP_MEMORY_SLACK above it), the second just that much (kept), the third is faster still and within the slack
    of the second but not of the start (not kept: the slack counts from the start). Timings and memory stand in for
    measurements, so the search runs without compiling."""
    milliseconds = lambda config: {64: 1.0, 128: 1.5, 256: 1.2}.get(config.chunk_size, 3.0)
    allowed = int(1000 * (1 + sweep.TEMP_MEMORY_SLACK))
    memory = lambda config: {64: allowed + 1, 128: allowed, 256: allowed + 10}.get(config.chunk_size, 1000)
    entry = _tune_without_compiling(monkeypatch, milliseconds, memory=memory)
    assert entry["config"]["chunk_size"] == 128 and entry["complete"]
    assert entry["fwbw_ms"] == 1.5 and entry["default_fwbw_ms"] == 3.0
    assert entry["temp_bytes"] == allowed and entry["default_temp_bytes"] == 1000
    assert entry["calls"] == 34  # 2 calls asked for; MIN_TIMED_MS (100 ms) at the start's 3 ms a call


def test_tune_times_each_program_once(monkeypatch):
    """Candidates whose programs equal one already timed (here: every config of a chunk size, as with every kernel in
    Mosaic GPU, which ignores the Triton tiles) are not timed again: the start and one config per chunk size."""
    milliseconds = lambda config: 3.0 - (config.chunk_size or 0) / 128
    timed = []

    def evaluate(config, *arguments):
        timed.append(config.chunk_size)
        return milliseconds(config), (None,), config

    chunk = lambda config: config.chunk_size
    entry = _tune_without_compiling(monkeypatch, milliseconds, evaluate, program_key=chunk)
    assert timed == [None, *sweep.CHUNK_SIZES] and entry["configs_timed"] == len(timed)  # the start: heuristics
    assert entry["config"]["chunk_size"] == 256 and entry["complete"]


def test_tune_tries_the_entries_of_like_cards_first(monkeypatch):
    """The entries tuned on other cards of this card's compute capability are the first candidates after the start,
    each timed whole; the later stages do not time them again."""
    milliseconds = lambda config: 3.0 - (config.chunk_size or 0) / 128
    timed = []

    def evaluate(config, *arguments):
        timed.append(config.chunk_size)
        return milliseconds(config), (None,), config

    like_cards = [ChunkwiseConfig(chunk_size=256), ChunkwiseConfig(chunk_size=64)]
    chunk = lambda config: config.chunk_size
    entry = _tune_without_compiling(monkeypatch, milliseconds, evaluate, program_key=chunk, like_cards=like_cards)
    assert timed == [None, 256, 64, 128]  # the start, the two like cards' entries, then the chunk stage's new one
    assert entry["config"]["chunk_size"] == 256 and entry["complete"]


def test_tune_skips_a_candidate_that_fails_to_trace(monkeypatch, capsys):
    """A candidate whose tracing raises (as a config a kernel refuses does) is skipped with its error, like one that
    fails to compile; the search goes on and the others are timed."""
    milliseconds = lambda config: 3.0 - (config.chunk_size or 0) / 128

    def program_key(config):
        if config.chunk_size == 256:
            raise ValueError("chunk 256 refused")
        return config.chunk_size

    entry = _tune_without_compiling(monkeypatch, milliseconds, program_key=program_key)
    assert entry["config"]["chunk_size"] == 128 and entry["configs_timed"] == 3  # the start, 64, 128
    assert "skipped, ValueError: chunk 256 refused" in capsys.readouterr().out


def test_jaxpr_digest_sees_what_printing_leaves_out():
    """Two kernels that differ only in an input's index map print as the same jaxpr; their digests differ, and the
    same kernel traced again has the same digest."""

    def copy_block(index_map):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...]

        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
            grid=(2,),
            in_specs=[pl.BlockSpec((8, 128), index_map)],
            out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
            interpret=True,
        )

    x = jax.ShapeDtypeStruct((16, 128), jnp.float32)
    first, second, again = (
        jax.jit(copy_block(index_map)).trace(x).jaxpr
        for index_map in (lambda i: (0, 0), lambda i: (1, 0), lambda i: (0, 0))
    )
    assert str(first) == str(second)
    assert sweep.jaxpr_digest(first) != sweep.jaxpr_digest(second)
    assert sweep.jaxpr_digest(first) == sweep.jaxpr_digest(again)


def _program_keys(backend, configs):
    shape = resolve_shapes(["tiny"])[0]
    inputs = runner.make_inputs(impls.MLSTM, shape, seed=0)
    weights = runner.make_weights(lambda *arguments: pallas_mlstm.mlstm_chunkwise(*arguments, backend="xla"), inputs)
    return [sweep._program_key(config, backend, weights, inputs) for config in configs]


def test_tune_program_key_changes_with_what_the_kernels_run():
    """The key differs where a kernel that runs reads the changed field (the interpreted Triton kernels' tiles, the
    chunk size) and not where none does (backend xla reads no launch config)."""
    default, tiles, chunk = _program_keys(
        "interpret",
        [
            ChunkwiseConfig(chunk_size=64),
            ChunkwiseConfig(chunk_size=64, siz_b_L_parallel=32),
            ChunkwiseConfig(chunk_size=128),
        ],
    )
    assert len({default, tiles, chunk}) == 3
    xla_default, xla_tiles, xla_chunk = _program_keys(
        "xla",
        [
            ChunkwiseConfig(chunk_size=64),
            ChunkwiseConfig(chunk_size=64, siz_b_L_parallel=32, num_warps_intra=8, num_stages_intra=2),
            ChunkwiseConfig(chunk_size=128),
        ],
    )
    assert xla_default == xla_tiles != xla_chunk


@pytest.mark.skipif(
    not mosaic_gpu.interpreter_available(),
    reason=f"backend mosaic_interpret needs PJRT_NPROC >= {mosaic_gpu.INTERPRETER_THREADS} (tests/conftest.py sets it "
    "with --backend=mosaic_interpret)",
)
def test_tune_program_key_ignores_tiles_of_kernels_in_mosaic_gpu():
    """With the parallel kernels in Mosaic GPU (interpreted), their Triton tiles change nothing; the states kernels'
    warps, read by their Triton kernels, still do."""
    parallel = ("parallel_fw_Hintra", "parallel_bw_dV", "parallel_bw_dK", "parallel_bw_dQ")
    in_mosaic = tuple((kernel, "mosaic_interpret") for kernel in parallel)
    default, tiles, warps = _program_keys(
        "interpret",
        [
            ChunkwiseConfig(chunk_size=64, kernel_backends=in_mosaic),
            ChunkwiseConfig(chunk_size=64, kernel_backends=in_mosaic, siz_b_L_parallel=32, siz_b_DH_loop=16),
            ChunkwiseConfig(chunk_size=64, kernel_backends=in_mosaic, num_warps_inter=8, num_stages_inter=2),
        ],
    )
    assert default == tiles != warps


def test_tune_times_small_shapes_over_more_calls():
    """Each candidate is timed over at least MIN_TIMED_MS: more calls than asked where a call is short."""
    assert sweep.timed_calls(10, 1.5) == 67 and sweep.timed_calls(10, 25.0) == 10 and sweep.timed_calls(200, 1.5) == 200


def test_a_jax_triton_without_its_nvidia_backend_is_named(monkeypatch):
    """jax-triton, where Triton's NVIDIA backend does not import, runs on stand-ins that fail later with an error
    naming no cause; the peers' factories name it first (the import's own error, or a version mismatch), and pass
    where jax-triton has the real backend."""
    monkeypatch.setitem(sys.modules, "jax_triton.triton_lib", None)  # no such module: the peer's import speaks
    impls.require_jax_triton_nvidia_backend()
    triton_lib = types.ModuleType("jax_triton.triton_lib")
    monkeypatch.setitem(sys.modules, "jax_triton.triton_lib", triton_lib)
    triton_lib.cb = types.ModuleType("triton.backends.nvidia.compiler")  # the real backend: nothing to say
    impls.require_jax_triton_nvidia_backend()
    triton_lib.cb = types.SimpleNamespace(CUDABackend=object)  # jax-triton's stand-ins
    monkeypatch.setitem(sys.modules, "triton.backends.nvidia.compiler", None)  # its import fails
    with pytest.raises(RuntimeError, match=r"no usable Triton NVIDIA backend here: ModuleNotFoundError: .*compiler"):
        impls.require_jax_triton_nvidia_backend()
    for name in ("triton.backends.nvidia.compiler", "triton.backends.nvidia.driver"):  # they import, wrong version
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    lacks = (
        r"it imports, but lacks what this jax-triton takes from it \(Triton .+, jax-triton .+; jax-triton 0.4.1 takes"
    )
    with pytest.raises(RuntimeError, match=lacks):
        impls.require_jax_triton_nvidia_backend()


def test_mosaic_check_times_a_kernel_against_another_revision(tmp_path, monkeypatch):
    """mosaic_check --baseline: another revision's Mosaic GPU kernel modules load beside this one's (importing one
    another; this revision's names are put back), and a timing row runs Triton's, this revision's and that
    revision's launchers on the same inputs, rounds interleaved. Interpreted, with a copy of this revision (its
    common.py marked) as the baseline: the two Mosaic GPU launchers give the same outputs."""
    if not mosaic_gpu.interpreter_available():
        pytest.skip(
            f"Mosaic GPU's interpreter needs {mosaic_gpu.INTERPRETER_THREADS} CPU worker threads: pass"
            " --backend=mosaic_interpret (which sets PJRT_NPROC)"
        )
    folder = tmp_path / "pallas_mlstm" / "mosaic_gpu"
    folder.mkdir(parents=True)
    for name in mosaic_check.KERNEL_MODULES:
        text = (pathlib.Path(mosaic_gpu.__file__).parent / f"{name}.py").read_text()
        (folder / f"{name}.py").write_text(text + ("\nREVISION_MARK = True\n" if name == "common" else ""))
    current = mosaic_check.current_modules()
    baseline = mosaic_check.load_revision(tmp_path)
    assert list(baseline) == list(mosaic_check.KERNEL_MODULES)
    assert baseline["parallel_bw"].common is baseline["common"] and baseline["common"].REVISION_MARK
    assert baseline["recurrent_bw"].recurrent_fw is baseline["recurrent_fw"]
    assert mosaic_check.current_modules() == current  # this revision's modules are put back, in sys.modules
    assert all(getattr(mosaic_gpu, name) is module for name, module in current.items())  # and on the package
    with pytest.raises(ValueError, match="--baseline: .* is not a directory; make it with"):
        mosaic_check.load_revision(tmp_path / "elsewhere")
    (tmp_path / "empty" / "pallas_mlstm" / "mosaic_gpu").mkdir(parents=True)
    with pytest.raises(ValueError, match="--baseline: .* holds none of common, parallel_fw"):
        mosaic_check.load_revision(tmp_path / "empty")

    # the baseline revision's dV launcher doubles dV, so its outputs tell which launcher ran
    dv = baseline["parallel_bw"].parallel_bw_dV
    monkeypatch.setattr(baseline["parallel_bw"], "parallel_bw_dV", lambda *a: 2 * dv(*a))
    monkeypatch.setitem(mosaic_check.SHAPES, "tiny", Shape("tiny", 1, 2, 128, 64, 64, why="a test"))
    row = mosaic_check.timing_row("tiny", "parallel_bw_dV", calls=1, rounds=3, baseline=baseline, interpret=True)
    assert not [key for key in row if key.endswith("error")], row
    assert all(row[f"{name}_ms"] > 0 for name in ("triton", "mosaic", "baseline")), row
    assert row["mosaic_vs_triton"] < 1e-2 and 0.4 < row["mosaic_vs_baseline"] < 0.6, row  # |x − 2x| / |2x|
    assert 0 <= row["mosaic_faster_rounds"] <= row["rounds"] == 3


def test_kernel_times_come_from_the_gpu_streams_of_a_trace():
    """timing.kernel_ms sums a trace's GPU stream events by kernel name per call, most first, and leaves out the
    derived lines that repeat them; a trace without a GPU stream (a CPU run, here a real one) gives None."""
    trace = """
    planes { name: "/device:GPU:0"
      lines { name: "Stream #13(Compute)"
        events { metadata_id: 1 duration_ps: 2000000 } events { metadata_id: 2 offset_ps: 3000000 duration_ps: 500000 }
        events { metadata_id: 1 offset_ps: 4000000 duration_ps: 2000000 } }
      lines { name: "XLA Ops" events { metadata_id: 2 duration_ps: 9000000 } }
      event_metadata { key: 1 value { id: 1 name: "states_mosaic_gpu_kernel" } }
      event_metadata { key: 2 value { id: 2 name: "loop_fusion" } } }
    planes { name: "/host:CPU" }
    """
    ms = timing.kernel_ms(jax.profiler.ProfileData.from_text_proto(trace), calls=2)
    assert ms == {"states_mosaic_gpu_kernel": 2e-3, "loop_fusion": 2.5e-4} and list(ms)[0] == "states_mosaic_gpu_kernel"
    assert timing.device_kernel_ms(jax.jit(lambda x: x * 2), (jnp.ones(8),), calls=2) is None


def test_mosaic_check_times_the_whole_op_in_turns(monkeypatch):
    """mosaic_check's op rows: the forward with backend "mosaic_interpret" and "interpret" on the same inputs, in
    interleaved rounds, with their times, ratio, rounds won and the outputs' difference (and, profiled on the CPU,
    no kernel times and no error); mosaic at another chunk size than triton's; an unknown mode or chunk is refused."""
    if not mosaic_gpu.interpreter_available():
        pytest.skip(
            f"Mosaic GPU's interpreter needs {mosaic_gpu.INTERPRETER_THREADS} CPU worker threads: pass"
            " --backend=mosaic_interpret (which sets PJRT_NPROC)"
        )
    made = []  # (backend, chunk) of each forward op_row makes
    forward_of = mosaic_check.impls.pallas_mlstm_forward
    monkeypatch.setattr(
        mosaic_check.impls,
        "pallas_mlstm_forward",
        lambda backend: lambda c: made.append((backend, c)) or forward_of(backend)(c),
    )
    row = mosaic_check.op_row("tiny", "fw", calls=1, rounds=2, interpret=True, profile=True, chunk=64)
    assert set(made) == {("interpret", None), ("mosaic_interpret", 64)}, made  # the chunk goes to mosaic alone
    assert not [key for key in row if key.endswith("error")], row
    assert "mosaic_device_ms" not in row and "mosaic_kernels_ms" not in row  # no GPU trace on the CPU
    assert row["triton_ms"] > 0 and row["mosaic_ms"] > 0 and row["mosaic_over_triton"] > 0, row
    assert 0 <= row["mosaic_faster_rounds"] <= row["rounds"] == 2, row
    # chunk 64 against triton's 128 at S = 256: the same h up to the order of the sums, not the same bits
    assert row["mosaic_chunk"] == 64 and 0 < row["mosaic_vs_triton"] < 1e-2, row
    for flags in (["--ops=fw,backward"], ["--ops=fw", "--op_chunks=0"], ["--ops=fw", "--op_chunks=128,96"]):
        with pytest.raises(SystemExit):
            mosaic_check.main([*flags, "--shapes=", "--cases="])


def test_mosaic_check_runs_interpreted(tmp_path):
    """mosaic_check --interpret on the CPU: the correctness rows run in the interpreters and meet Triton's bound."""
    if not mosaic_gpu.interpreter_available():
        pytest.skip(
            f"Mosaic GPU's interpreter needs {mosaic_gpu.INTERPRETER_THREADS} CPU worker threads: pass"
            " --backend=mosaic_interpret (which sets PJRT_NPROC)"
        )
    out = tmp_path / "mosaic_check.json"
    mosaic_check.main(["--interpret", "--shapes=", "--cases=L64-d64x64", "--cells=exponential", f"--out={out}"])
    rows = [row for row in json.loads(out.read_text()) if row["step"] == "correctness"]
    assert [row["dtype"] for row in rows] == ["bfloat16", "float32"] and all(row["ok"] for row in rows), rows
