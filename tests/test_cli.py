"""`python -m pallas_mlstm`: the check command, help (with and without the source tree's oracles), one-line usage
errors, where tune writes its configs, and what the installed wheel ships. Reading tuned configs:
tests/test_config.py; the bench and tune runs: tests/test_benchmarks.py."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import pallas_mlstm
from pallas_mlstm import config
from pallas_mlstm.config import ChunkwiseConfig, shape_class, tuned_config

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIR = pathlib.Path(pallas_mlstm.__file__).resolve().parent
PROGRAM = "python -m pallas_mlstm"
NOT_FOR_USERS = ("../shared", "perf.md", "design.md", "session", "device machine")
H200_7B = ("NVIDIA H200", 8, 8, 8192, 256, 512)


def _environment(on_cpu=True, **extra):
    platforms = {"JAX_PLATFORMS": "cpu"} if on_cpu else {}
    return {
        **os.environ,
        **platforms,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def _run_cli(tmp_path, *arguments, timeout=120, on_cpu=True):
    """Runs `python -m pallas_mlstm ARGUMENTS` (on the CPU unless not on_cpu), with the user's tuned configs at
    tmp_path."""
    environment = _environment(on_cpu, **{config.TUNED_CONFIGS_ENV: str(tmp_path / "user_tuned_configs.json")})
    return subprocess.run(
        [sys.executable, "-m", "pallas_mlstm", *arguments],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _run_cli_without_oracles(*arguments):
    """`python -m pallas_mlstm ARGUMENTS` in a process where `import reference` fails, as from a wheel."""
    program = (
        "import sys; sys.modules['reference'] = None; from pallas_mlstm.__main__ import main; "
        f"sys.argv = ['{PROGRAM}', *{list(arguments)!r}]; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO_ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_one_line_usage_error(result, command: str, expected: str):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{PROGRAM} {command}: ") and expected in lines[-1], result.stderr
    assert sum(line.startswith(PROGRAM) for line in lines) == 1, result.stderr
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
def test_check_command_runs_and_passes(tmp_path, arguments, expected):
    """`check` at a small shape prints its table and passes on this machine (its GPU too), for each cell."""
    result = _run_cli(
        tmp_path,
        "check",
        *arguments,
        "--check_shape=1,2,64,16,32",
        "--check_chunk_size=16",
        "--check_repeats=1",
        timeout=600,
        on_cpu=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout and "FAIL" not in result.stdout


# --- help and usage errors --------------------------------------------------------------------------------


def test_help_lists_the_subcommands(tmp_path):
    result = _run_cli(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {PROGRAM} {{check,bench,tune}}")


@pytest.mark.parametrize("with_oracles", [True, False], ids=["source-tree", "without-oracles"])
@pytest.mark.parametrize(
    "command, flag",
    [
        ("check", "--check_shape"),
        ("bench", "--shapes"),
        ("tune", "--configs_out"),
    ],
)
def test_subcommand_help_lists_its_flags_for_users(tmp_path, command, flag, with_oracles):
    """Every --help works, also where the oracles (the source tree's reference/ package) cannot be imported."""
    result = _run_cli(tmp_path, command, "--help") if with_oracles else _run_cli_without_oracles(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {PROGRAM} {command} [--flags]") and flag in result.stdout
    assert not [word for word in NOT_FOR_USERS if word in result.stdout.lower()]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["check", "--nonsense=1"], f"'nonsense'; see `{PROGRAM} check --help`"),
        (["check", "--check_backends=triton"], "use --check_backends=interpret,xla"),
        (["check", "--check_backends=cuda"], "--check_backends entries must be among triton,interpret,xla"),
        (["check", "--check_shape=1,2"], "--check_shape must be 5 comma-separated positive integers B,NH,S,DHQK,DHHV"),
        (["check", "--check_shape=1,2,x,64,64"], "--check_shape must be 5 comma-separated positive integers"),
        (["check", "--check_dtypes=int8"], "--check_dtypes entries must be among float32,bfloat16,float16"),
        (["check", "--check_input_gate=sigmod"], "--check_input_gate must be one of exponential,sigmoid"),
        (["check", "--check_chunk_size=48"], "--check_chunk_size must be a power of 2"),
        (["tune"], "pass --tune_backend=interpret --configs_out="),
        (["tune", "--tune_backend=interpret"], "pass --configs_out=PATH"),
        (["bench", "--shapes=huge"], "--shapes: unknown shape 'huge'"),
        (["bench", "--impls=torch"], "--impls entries must be among"),
        (["bench", "--calls=0"], "flag --calls=0"),
    ],
)
def test_bad_request_prints_one_line_and_exits_2(tmp_path, arguments, expected):
    _assert_one_line_usage_error(_run_cli(tmp_path, *arguments), arguments[0], expected)


def test_unknown_subcommand_is_refused(tmp_path):
    result = _run_cli(tmp_path, "frobnicate")
    assert result.returncode == 2
    assert "usage" in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ["check", "--check_shape=1,2,64,16,32", "--check_chunk_size=16"],
        ["bench", "--shapes=tiny", "--impls=xla"],
        ["tune", "--tune_backend=interpret", "--configs_out=/nonexistent/tuned_configs.json"],
    ],
    ids=["check", "bench", "tune"],
)
def test_commands_that_need_the_oracles_refuse_in_one_line(arguments):
    _assert_one_line_usage_error(_run_cli_without_oracles(*arguments), arguments[0], "reference/ package")


# --- where tune writes, what the wheel ships --------------------------------------------------------------


def test_tune_refuses_a_malformed_configs_out_before_tuning(tmp_path):
    configs_out = tmp_path / "broken.json"
    configs_out.write_text("{not json")
    result = _run_cli(tmp_path, "tune", "--tune_backend=interpret", f"--configs_out={configs_out}")
    _assert_one_line_usage_error(result, "tune", f"--configs_out: cannot read the tuned configs in {configs_out}")


def test_default_tune_output_is_the_user_config_file(monkeypatch, tmp_path):
    from pallas_mlstm.benchmarks import sweep

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
    from pallas_mlstm.benchmarks import sweep

    configs_path = tmp_path / "new" / "pallas_mlstm" / "tuned_configs.json"
    entry = {"config": {"chunk_size": 64}}
    sweep.write_tuned_entry(str(configs_path), "NVIDIA H200", shape_class(8192, 256, 512), entry)
    assert tuned_config(*H200_7B, path=configs_path) == ChunkwiseConfig(chunk_size=64)


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
