"""Parses the absl flags of tests/flags.py once, from pytest options of the same names."""

import os
import shutil
import sys
import tempfile
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
    _cheap_cpu_compiles()
    _shared_compilation_cache(config)
    _mosaic_interpreter_threads()


def _mosaic_interpreter_threads():
    """With --backend=mosaic_interpret, at least the worker threads Mosaic GPU's interpreter needs in JAX's CPU
    backend (pallas_mlstm.mosaic_gpu.INTERPRETER_THREADS; one per core by default, too few on a 2-core machine).
    Set before JAX starts its backend; the xdist workers and the subprocesses inherit it. Only then: the other
    tests keep one thread per core."""
    from pallas_mlstm import mosaic_gpu

    if "mosaic_interpret" in test_flags.BACKEND.value and not mosaic_gpu.interpreter_available():
        os.environ["PJRT_NPROC"] = str(mosaic_gpu.INTERPRETER_THREADS)


def _shared_compilation_cache(config):
    """One JAX compilation cache for the whole session, in a fresh temporary folder: the tests compile many identical
    programs (the same oracle or op at the same shape in several tests, in each pytest-xdist worker and in the
    subprocesses), and a program compiled once is loaded thereafter (about a third of the session's CPU time on a
    CPU). Set by the main process before it starts the workers, which inherit the environment, as do subprocesses;
    removed at its end. A JAX_COMPILATION_CACHE_DIR of the caller's own is kept (and left in place)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="pallas-mlstm-tests-jax-cache-")
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    # every program, however small or quick to compile
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=folder,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _cheap_cpu_compiles():
    """LLVM optimization level 0 for the code XLA compiles, unless --backend includes triton (a GPU run) or XLA_FLAGS
    already sets a level (pass XLA_FLAGS=--xla_backend_optimization_level=2 for XLA's default). The tests compile
    hundreds of small programs that run for milliseconds, and XLA's default optimization costs up to seconds per
    program on a CPU (a jax.random.normal of 3360 float32 elements: 5 s, 0.2 s at level 0). Results differ only in
    float32 rounding (about 1e-7 relative: another instruction selection, no fast-math either way), far inside every
    bound. Set before JAX starts a backend; the xdist workers and the subprocesses inherit it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "triton" not in test_flags.BACKEND.value and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


# Files whose tests wait on one long subprocess (tests/test_sharding.py: every sharded case of a backend in one
# 4-device process, ~2 minutes on 2 cores): run first.
_FIRST = ("tests/test_sharding.py", "tests/test_examples.py")


def pytest_collection_modifyitems(config, items):
    """Moves the tests of _FIRST to the front (a stable sort: the order within each part stays). Under pytest-xdist
    the first worker then takes them all with its first batch and runs the long subprocess while the others work
    through the rest, instead of the subprocess starting last and ending the run alone."""
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))
