"""absl flags read by the tests; tests/conftest.py exposes each as a pytest option of the same name."""

from absl import flags

BACKEND = flags.DEFINE_list(
    "backend",
    ["xla", "interpret"],
    "Backends to test (comma-separated): any of pallas_mlstm.BACKENDS (triton and mosaic need a GPU, mosaic a "
    "Hopper one; mosaic_interpret is slow).",
)
SEED = flags.DEFINE_integer("seed", 0, "Base seed of the random inputs (each case derives its own).")
GPU_SHAPES = flags.DEFINE_bool(
    "gpu_shapes", True, "On a GPU, also check the benchmark shapes (benchmarks/README.md; triton and mosaic backends)."
)

FLAGS = flags.FLAGS
