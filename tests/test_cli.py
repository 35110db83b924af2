"""`python -m pallas_mlstm`: the check command, help (with and without the source tree's oracles), one-line usage
errors, one-line failures (tracebacks behind --traceback), warnings before slow CPU runs, where tune writes its
configs, and what the installed wheel ships. Most run `main` in this process (`run_main`); a fresh process where
that is the point. Reading tuned configs: tests/test_config.py; the bench and tune runs: tests/test_benchmarks.py."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest
from absl.testing import flagsaver

import pallas_mlstm
import pallas_mlstm.__main__ as cli
from pallas_mlstm import check, config  # noqa: F401  (every command's flags exist before run_main saves them)
from pallas_mlstm.benchmarks import impls, kernel_times, plot, runner, step_bench, sweep  # noqa: F401
from pallas_mlstm.benchmarks.shapes import cpu_shape_warning, resolve_shapes
from pallas_mlstm.config import ChunkwiseConfig, shape_class, tuned_config

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIR = pathlib.Path(pallas_mlstm.__file__).resolve().parent
PROGRAM = "python -m pallas_mlstm"
NOT_FOR_USERS = ("../shared", "perf.md", "design.md", "session", "device machine")
H200_7B = ("NVIDIA H200", 8, 8, 8192, 256, 512)
COMMANDS = ("check", "bench", "tune", "step_bench", "kernel_times")
ON_CPU = pytest.mark.skipif(jax.default_backend() == "gpu", reason="what the command says on a machine without a GPU")


def _environment(**extra):
    """The environment of a fresh `python -m pallas_mlstm` process on the CPU, this checkout importable."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def _help_without_oracles(commands) -> dict:
    """`python -m pallas_mlstm COMMAND --help` for each of `commands`, in one process where `import reference`
    fails (as from a wheel): {command: CompletedProcess}, each with its own exit code and output."""
    program = (
        "import contextlib, io, json, sys; sys.modules['reference'] = None; from pallas_mlstm.__main__ import main\n"
        "results = {}\n"
        f"for command in {list(commands)!r}:\n"
        "    out, err, code = io.StringIO(), io.StringIO(), 0\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code or 0\n"
        "    results[command] = [code, out.getvalue(), err.getvalue()]\n"
        "print(json.dumps(results))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {command: subprocess.CompletedProcess([command, "--help"], *results[command]) for command in commands}


@pytest.fixture
def run_main(capfd, monkeypatch):
    """`run_main(*ARGUMENTS)`: `python -m pallas_mlstm ARGUMENTS` in this process, its flags restored after; returns
    a CompletedProcess (stdout and stderr of this process and its children)."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)  # bench sets it for its workers

    def run(*arguments):
        with flagsaver.flagsaver():
            try:
                cli.main(list(arguments))
                returncode = 0
            except SystemExit as exit:
                returncode = exit.code or 0
        captured = capfd.readouterr()
        return subprocess.CompletedProcess(arguments, returncode, captured.out, captured.err)

    return run


def _assert_one_line_error(result, command: str | None, expected: str, returncode: int = 2):
    """`result` failed with `returncode`, no traceback, and one line naming the program (its last on stderr) that
    names the command and says `expected`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    program = PROGRAM if command is None else f"{PROGRAM} {command}"
    assert result.returncode == returncode, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{program}: ") and expected in lines[-1], result.stderr
    assert sum(line.startswith(PROGRAM) for line in lines) == 1, result.stderr


def _assert_one_line_usage_error(result, command: str, expected: str):
    _assert_one_line_error(result, command, expected)
    assert result.stdout == ""


# --- check ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ([], "h rel err"),
        (["--check_input_gate=sigmoid", "--check_backends=xla"], "sigmoid input gate"),
    ],
    ids=["exponential", "sigmoid"],
)
def test_check_command_runs_and_passes(run_main, monkeypatch, tmp_path, arguments, expected):
    """`check` at a small shape prints its table and passes on this machine (its GPU too), for each cell (the user's
    tuned configs aside)."""
    monkeypatch.setenv(config.TUNED_CONFIGS_ENV, str(tmp_path / "user_tuned_configs.json"))
    result = run_main("check", *arguments, "--check_shape=1,2,64,16,32", "--check_chunk_size=16", "--check_repeats=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout and "FAIL" not in result.stdout


# --- help and usage errors --------------------------------------------------------------------------------


def test_help_lists_the_subcommands(run_main):
    result = run_main("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {PROGRAM} {{{','.join(COMMANDS)}}}")


# each command and a flag its help must list
HELP_FLAGS = {
    "check": "--check_shape",
    "bench": "--shapes",
    "tune": "--configs_out",
    "step_bench": "--step_batches",
    "kernel_times": "--kernel_shapes",
}


@pytest.fixture(scope="module")
def help_without_oracles():
    return _help_without_oracles(HELP_FLAGS)


@pytest.mark.parametrize("with_oracles", [True, False], ids=["source-tree", "without-oracles"])
@pytest.mark.parametrize("command", HELP_FLAGS)
def test_subcommand_help_lists_its_flags_for_users(request, run_main, command, with_oracles):
    """Every --help works, also where the oracles (the source tree's reference/ package) cannot be imported (a
    fresh process, as from a wheel: one for every command)."""
    if with_oracles:
        result = run_main(command, "--help")
    else:
        result = request.getfixturevalue("help_without_oracles")[command]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {PROGRAM} {command} [--flags]") and HELP_FLAGS[command] in result.stdout
    assert "--[no]traceback" in result.stdout
    assert not [word for word in NOT_FOR_USERS if word in result.stdout.lower()]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["check", "--nonsense=1"], f"'nonsense'; see `{PROGRAM} check --help`"),
        pytest.param(["check", "--check_backends=triton"], "use --check_backends=interpret,xla", marks=ON_CPU),
        pytest.param(["check", "--check_backends=mosaic"], "backend='mosaic' needs a Hopper GPU", marks=ON_CPU),
        (["check", "--check_backends=cuda"], "--check_backends entries must be among triton,interpret,xla"),
        (["check", "--check_shape=1,2"], "--check_shape must be 5 comma-separated positive integers B,NH,S,DHQK,DHHV"),
        (["check", "--check_shape=1,2,x,64,64"], "--check_shape must be 5 comma-separated positive integers"),
        (["check", "--check_dtypes=int8"], "--check_dtypes entries must be among float32,bfloat16,float16"),
        (["check", "--check_input_gate=sigmod"], "--check_input_gate must be one of exponential,sigmoid"),
        (["check", "--check_chunk_size=48"], "--check_chunk_size must be a power of 2"),
        pytest.param(["tune"], "pass --tune_backend=interpret --configs_out=", marks=ON_CPU),
        (["tune", "--tune_backend=interpret"], "pass --configs_out=PATH"),
        (["bench", "--shapes=huge"], "--shapes: unknown shape 'huge'"),
        (["bench", "--impls=torch"], "--impls entries must be among"),
        (["bench", "--calls=0"], "flag --calls=0"),
        (["bench", "--chunk_sizes=24"], "--chunk_sizes takes powers of 2"),
        (
            ["bench", "--chunk_sizes=8", "--impls=interpret"],
            "--chunk_sizes=8: interpret takes chunks of at least 16 (its backend's minimum); use --chunk_sizes=16",
        ),
        pytest.param(
            ["bench", "--impls=triton"],
            "--impls=triton: triton needs an NVIDIA GPU, and JAX's platform here is cpu; use --impls=",
            marks=ON_CPU,
        ),
        (["bench", "--json=/nonexistent/records.json"], "--json=/nonexistent/records.json: its folder does not exist"),
        pytest.param(
            ["step_bench"],
            "step_bench times the Pallas step kernel (backend triton) on an NVIDIA GPU, and JAX's platform here is "
            "cpu; on a CPU, `python -m pallas_mlstm check` checks the kernels",
            marks=ON_CPU,
        ),
        (["step_bench", "--step_batches=1,x"], "--step_batches must be positive integers"),
        pytest.param(
            ["kernel_times"],
            "--kernel_backend=triton: backend='triton' needs an NVIDIA GPU, and JAX's default backend here is 'cpu'",
            marks=ON_CPU,
        ),
        (["kernel_times", "--kernel_backend=cuda"], "--kernel_backend must be one of triton, interpret, xla, mosaic"),
        (
            ["kernel_times", "--kernel_backend=xla", "--kernel_sweep"],
            "--kernel_sweep tries Triton launches, which backend xla's kernels do not take",
        ),
        (["kernel_times", "--kernel_shapes=huge"], "--kernel_shapes: unknown shape 'huge'"),
        (["kernel_times", "--kernel_chunk=8"], "--kernel_chunk must be at least 16"),
        (["kernel_times", "--kernel_names=dQ"], "--kernel_names: backend triton times recurrent_fw_C,"),
        (
            ["kernel_times", "--kernel_names=dK_and_dQ"],
            "--kernel_names: backend triton times recurrent_fw_C,parallel_fw_Hintra,recurrent_bw_dC,parallel_bw_dQ,"
            "parallel_bw_dK,parallel_bw_dV; got ['dK_and_dQ']",
        ),
        (
            ["kernel_times", "--kernel_sweep", "--kernel_names=dK_and_dQ"],
            "--kernel_names: --kernel_sweep sweeps recurrent_fw_C,",
        ),
        (
            ["kernel_times", "--kernel_backend=mosaic", "--kernel_sweep"],
            "--kernel_sweep tries Triton launches, which backend mosaic's kernels do not take",
        ),
        (
            ["kernel_times", "--kernel_backend=xla", "--kernel_shapes=tiny", "--kernel_chunk=512"],
            "--kernel_chunk=512 does not divide tiny's S = 256",
        ),
    ],
)
def test_bad_request_prints_one_line_and_exits_2(run_main, arguments, expected):
    _assert_one_line_usage_error(run_main(*arguments), arguments[0], expected)


@pytest.mark.parametrize("arguments, problem", [(["foo"], "unknown command 'foo'"), ([], "no command")])
def test_unknown_subcommand_is_named_in_one_line(run_main, arguments, problem):
    result = run_main(*arguments)
    _assert_one_line_error(result, None, f"{problem}; choose one of: {', '.join(COMMANDS)} (`{PROGRAM} --help`")
    assert result.stdout == ""


@ON_CPU
def test_step_bench_module_refuses_a_cpu_in_one_line():
    """`python -m pallas_mlstm.benchmarks.step_bench`, the older spelling, answers as `step_bench` does."""
    command = [sys.executable, "-m", "pallas_mlstm.benchmarks.step_bench"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=120)
    _assert_one_line_usage_error(result, "step_bench", "on an NVIDIA GPU, and JAX's platform here is cpu")


@pytest.mark.parametrize(
    "arguments",
    [
        ["check", "--check_shape=1,2,64,16,32", "--check_chunk_size=16"],
        ["bench", "--shapes=tiny", "--impls=xla"],
        ["tune", "--tune_backend=interpret", "--configs_out=/nonexistent/tuned_configs.json"],
    ],
    ids=["check", "bench", "tune"],
)
def test_commands_that_need_the_oracles_refuse_in_one_line(run_main, monkeypatch, arguments):
    monkeypatch.setitem(sys.modules, "reference", None)  # `import reference` fails, as from a wheel
    _assert_one_line_usage_error(run_main(*arguments), arguments[0], "reference/ package")


# --- failures: one line each, the traceback behind --traceback; warnings before slow runs ----------------


@pytest.mark.parametrize("traceback", [False, True], ids=["one-line", "traceback"])
def test_an_unexpected_error_is_one_line_unless_traceback(run_main, monkeypatch, traceback):
    def broken_bench(argv):
        raise KeyError("shape")

    monkeypatch.setattr(runner, "main_bench", broken_bench)
    result = run_main("bench", *(["--traceback"] if traceback else []))
    assert result.returncode == 1 and ("Traceback" in result.stderr) == traceback, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"{PROGRAM} bench: KeyError: 'shape'") and (len(lines) > 1) == traceback, lines


@pytest.mark.parametrize("traceback", [False, True], ids=["one-line", "traceback"])
def test_bench_says_each_failed_run_in_one_line_and_exits_1(run_main, monkeypatch, tmp_path, traceback):
    """--noisolate, and a worker (which reports its failures to the parent in its records file)."""

    def broken_build(name, chunk_size):
        raise ValueError(f"no kernel\nfor {name}")

    monkeypatch.setattr(impls, "build", broken_build)
    flags = ["--shapes=tiny", "--impls=xla,interpret", "--noisolate", *(["--traceback"] if traceback else [])]
    result = run_main("bench", *flags)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert failed == [
        "FAILED xla at tiny chunk default: ValueError: no kernel for xla",
        "FAILED interpret at tiny chunk default: ValueError: no kernel for interpret",
    ]
    assert result.returncode == 1 and result.stderr.count("Traceback") == (2 if traceback else 0), result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{PROGRAM} bench: 2 of 2 runs failed (the FAILED and REFUSED lines above), the first: xla at tiny chunk "
        f"default: ValueError: no kernel for xla{'' if traceback else '; --traceback shows where'}."
    )
    assert traceback or len(result.stderr.splitlines()) == 1, result.stderr

    worker_records = tmp_path / "records.json"
    result = run_main("bench", "--shapes=tiny", "--impls=xla", "--noisolate", f"--worker_records={worker_records}")
    assert result.returncode == 0 and "FAILED xla at tiny" in result.stdout, result.stdout + result.stderr
    assert json.loads(worker_records.read_text()) == {
        "records": [],
        "failures": ["xla at tiny chunk default: ValueError: no kernel for xla"],
    }


@ON_CPU
def test_bench_says_a_crashed_worker_in_one_line_and_exits_1(run_main, monkeypatch):
    """A worker that dies before it reports (here: JAX cannot start) is one FAILED line, and the bench exits 1."""
    monkeypatch.setattr(runner, "_ENVIRONMENT_AT_START", _environment(JAX_PLATFORMS="no-such-platform"))
    result = run_main("bench", "--shapes=tiny", "--impls=xla", "--calls=1")
    assert "FAILED xla at tiny chunk default: its worker exited with code 1 (its error above)" in result.stdout
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    worker_error, summary = [line for line in result.stderr.splitlines() if line.strip()]
    assert worker_error.startswith(f"{PROGRAM} bench: RuntimeError: Unable to initialize backend 'no-such-platform'")
    assert summary == (
        f"{PROGRAM} bench: 1 of 1 runs failed: xla at tiny chunk default: its worker exited with code 1 (its error "
        "above); --traceback shows where."
    )


def test_bench_exits_1_when_nothing_was_timed(run_main):
    result = run_main("bench", "--shapes=tiny", "--impls=xla", "--chunk_sizes=512")
    assert "SKIP xla at tiny chunk 512: it does not divide S=256." in result.stdout
    _assert_one_line_error(result, "bench", "nothing was timed: every requested run was skipped", 1)


def test_large_shapes_get_a_cpu_warning():
    assert cpu_shape_warning(resolve_shapes(["tiny", "tiny-packed"]), "--shapes") is None
    warning = cpu_shape_warning(resolve_shapes(["tiny", "7b"]), "--kernel_shapes")
    assert warning.startswith("WARNING: 7b (B=8, NH=8, S=8192, DHQK=256, DHHV=512) is a GPU shape: on this CPU")
    assert warning.endswith("use a small shape: --kernel_shapes=tiny or --kernel_shapes=tiny-packed.")


@ON_CPU
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_a_large_shape_on_a_cpu_is_warned_of_before_the_runs(run_main, monkeypatch, tmp_path, command):
    def first_run(*arguments):
        runner.say("first run starts")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_run_in_worker", first_run)
    monkeypatch.setattr(sweep, "tune_shape", first_run)
    flags = ["--impls=xla"] if command == "bench" else ["--tune_backend=interpret", f"--configs_out={tmp_path}/c.json"]
    result = run_main(command, "--shapes=tiny,7b", *flags)
    lines = result.stdout.splitlines()
    warning = next(index for index, line in enumerate(lines) if line.startswith("WARNING: 7b (B=8, NH=8, S=8192"))
    assert "--shapes=tiny" in lines[warning] and lines.index("first run starts") > warning
    _assert_one_line_error(result, command, "interrupted.", 1)


def test_plot_refuses_unreadable_records_in_one_line(capsys, tmp_path):
    assert plot.main(["plot", str(tmp_path / "out.png"), str(tmp_path / "missing.json")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("python -m pallas_mlstm.benchmarks.plot: cannot read the records in ")
    assert len(stderr.splitlines()) == 1


def test_tune_exits_1_when_the_start_config_is_refused(run_main, monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "tune_shape", lambda *arguments: None)
    result = run_main("tune", "--tune_backend=interpret", "--shapes=tiny", f"--configs_out={tmp_path}/c.json")
    _assert_one_line_error(result, "tune", "nothing stored for tiny: the start config failed the check", 1)


# --- where tune writes, what the wheel ships --------------------------------------------------------------


def test_tune_refuses_a_malformed_configs_out_before_tuning(run_main, tmp_path):
    configs_out = tmp_path / "broken.json"
    configs_out.write_text("{not json")
    result = run_main("tune", "--tune_backend=interpret", f"--configs_out={configs_out}")
    _assert_one_line_usage_error(result, "tune", f"--configs_out: cannot read the tuned configs in {configs_out}")


def test_default_tune_output_is_the_user_config_file(monkeypatch, tmp_path):
    assert sweep.CONFIGS_OUT.default == str(config.user_tuned_configs_path())
    assert not pathlib.Path(sweep.CONFIGS_OUT.default).resolve().is_relative_to(PACKAGE_DIR)
    monkeypatch.delenv(config.TUNED_CONFIGS_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.user_tuned_configs_path() == tmp_path / "xdg" / "pallas_mlstm" / "tuned_configs.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")  # the XDG spec says to ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.user_tuned_configs_path() == tmp_path / "home" / ".config" / "pallas_mlstm" / "tuned_configs.json"
    monkeypatch.setenv(config.TUNED_CONFIGS_ENV, str(tmp_path / "mine.json"))
    assert config.user_tuned_configs_path() == tmp_path / "mine.json"


def test_tune_creates_the_folder_of_its_configs_file(tmp_path):
    configs_path = tmp_path / "new" / "pallas_mlstm" / "tuned_configs.json"
    entry = {"config": {"chunk_size": 64}}
    sweep.write_tuned_entry(str(configs_path), "NVIDIA H200", shape_class(8192, 256, 512), entry)
    assert tuned_config(*H200_7B, path=configs_path) == ChunkwiseConfig(chunk_size=64)


def test_tune_keeps_one_entry_per_set_of_backends_best_first(tmp_path):
    """write_tuned_entry puts the new entry first and keeps the class's entries that name other backends behind it
    (Triton's own entry stays behind one that runs Mosaic GPU kernels); an entry naming the same backends is
    replaced."""
    path, key = tmp_path / "tuned.json", shape_class(8192, 256, 512)
    entry = lambda chunk, **backends: {"config": {"chunk_size": chunk, "kernel_backends": backends}}
    stored = lambda: json.loads(path.read_text())["configs"]["NVIDIA H200"][key]
    sweep.write_tuned_entry(str(path), "NVIDIA H200", key, entry(64))
    assert stored() == entry(64)  # one entry: an object, as before lists
    sweep.write_tuned_entry(str(path), "NVIDIA H200", key, entry(256, parallel_fw_Hintra="mosaic"))
    assert stored() == [entry(256, parallel_fw_Hintra="mosaic"), entry(64)]
    sweep.write_tuned_entry(str(path), "NVIDIA H200", key, entry(128, recurrent_fw_C="mosaic"))
    assert stored() == [entry(128, recurrent_fw_C="mosaic"), entry(64)]
    sweep.write_tuned_entry(str(path), "NVIDIA H200", key, entry(32))
    assert stored() == [entry(32), entry(128, recurrent_fw_C="mosaic")]
    assert [config.chunk_size for config in config.tuned_configs_in(path)["NVIDIA H200"][key]] == [32, 128]


def test_installed_wheel_ships_tuned_configs_and_no_reference_or_benchmark_results(tmp_path):
    """A non-editable `pip install .` into an empty target: pallas_mlstm with its tuned configs as data, no
    top-level `reference` package, no benchmark result files."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pallas_mlstm", "reference"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert {path.name for path in target.iterdir() if not path.name.endswith(".dist-info")} == {"pallas_mlstm"}
    data_files = {
        path.relative_to(target).as_posix()
        for path in (target / "pallas_mlstm").rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    }
    assert data_files == {"pallas_mlstm/tuned_configs.json"}
