"""Parses the absl flags of tests/flags.py once, from pytest options of the same names."""

import sys
import warnings

from tests import flags as test_flags

# The Triton backend of Pallas is deprecated upstream; we use it on purpose (see BUILD.md).
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

_ABSL_FLAGS = ("backend", "seed", "gpu_shapes")


def pytest_addoption(parser):
    for name in _ABSL_FLAGS:
        flag = test_flags.FLAGS[name]
        parser.addoption(f"--{name}", action="store", default=None, help=f"absl flag: {flag.help}")


def pytest_configure(config):
    argv = [sys.argv[0]]
    for name in _ABSL_FLAGS:
        value = config.getoption(name)
        if value is not None:
            argv.append(f"--{name}={value}")
    test_flags.FLAGS(argv)
