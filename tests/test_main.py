"""`python -m pallas_mlstm check` runs, prints its table and passes on this machine."""

import subprocess
import sys


def test_check_command_runs_and_passes():
    result = subprocess.run(
        [sys.executable, "-m", "pallas_mlstm", "check", "--check_shape=1,2,64,16,32", "--check_chunk_size=16",
         "--check_repeats=1"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "h rel err" in result.stdout
    assert "FAIL" not in result.stdout


def test_check_command_checks_the_sigmoid_cell():
    result = subprocess.run(
        [sys.executable, "-m", "pallas_mlstm", "check", "--check_input_gate=sigmoid", "--check_backends=xla",
         "--check_shape=1,2,64,16,32", "--check_chunk_size=16", "--check_repeats=1"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sigmoid input gate" in result.stdout and "FAIL" not in result.stdout


def test_unknown_subcommand_is_refused():
    result = subprocess.run([sys.executable, "-m", "pallas_mlstm", "frobnicate"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    assert "usage" in result.stderr
