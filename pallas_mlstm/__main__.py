"""`python -m pallas_mlstm check | bench | tune [--flags]`: the package's command-line tools.

Only the chosen subcommand's module is imported, before absl parses the flags, so each subcommand defines
its flags in its own module and `--help` lists those.
"""

from __future__ import annotations

import importlib
import logging
import sys

from absl import app, flags

SUBCOMMANDS = {
    "check": ("pallas_mlstm.check", "main_check", "check the kernels against the references on this machine"),
    "bench": ("pallas_mlstm.benchmarks.runner", "main_bench", "time pallas_mlstm and its peers"),
    "tune": ("pallas_mlstm.benchmarks.sweep", "main_tune", "measure the best launch configs for this card"),
}


def main() -> None:
    """Dispatches to the subcommand named by the first argument; its main gets argv without that name."""
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        lines = [f"  {name}: {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
        print("usage: python -m pallas_mlstm {check,bench,tune} [--flags]\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(2)
    module_name, function_name, _ = SUBCOMMANDS[sys.argv[1]]
    module = importlib.import_module(module_name)
    flags.adopt_module_key_flags(module)  # so that --help lists the subcommand's flags
    subcommand_main = getattr(module, function_name)
    program = f"{sys.argv[0]} {sys.argv[1]}"
    # absl's handler shows INFO records, among them JAX's probing of platforms this machine lacks (TPU).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    app.run(subcommand_main, argv=[program, *sys.argv[2:]])


if __name__ == "__main__":
    main()
