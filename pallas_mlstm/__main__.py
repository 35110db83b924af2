"""`python -m pallas_mlstm {check,bench,tune} [--flags]`: check, time and tune the mLSTM kernels on this machine.

Only the chosen subcommand's module is imported, so its flags are the ones defined. A bad flag or an
impossible request (an `app.UsageError` from the subcommand) ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import NoReturn

from absl import app, flags

PROGRAM = "python -m pallas_mlstm"
USAGE_EXIT_CODE = 2
HELP_ARGUMENTS = ("-h", "--help", "--helpshort", "--helpfull")
SUBCOMMANDS = {
    "check": ("pallas_mlstm.check", "main_check", "check the kernels against the references on this machine"),
    "bench": ("pallas_mlstm.benchmarks.runner", "main_bench", "time pallas_mlstm and its peers"),
    "tune": ("pallas_mlstm.benchmarks.sweep", "main_tune", "measure the best launch configs for this card"),
}


def usage() -> str:
    """The top-level usage: the subcommands and how to get their flags."""
    lines = [f"  {name}: {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    return "\n".join(
        [
            f"usage: {PROGRAM} {{{','.join(SUBCOMMANDS)}}} [--flags]",
            *lines,
            f"`{PROGRAM} COMMAND --help` lists the flags of COMMAND.",
        ]
    )


def subcommand_usage(name: str, module) -> str:
    """The usage of one subcommand: what it does and its flags."""
    _, _, help_text = SUBCOMMANDS[name]
    return f"usage: {PROGRAM} {name} [--flags]\n\n{help_text[0].upper()}{help_text[1:]}.\n\nflags:\n" + (
        flags.FLAGS.module_help(module)
    )


def exit_with_usage_error(name: str, message) -> NoReturn:
    """Prints `message` as one line on stderr and exits with USAGE_EXIT_CODE."""
    print(f"{PROGRAM} {name}: {' '.join(str(message).splitlines())}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def main() -> None:
    """Dispatches to the subcommand named by the first argument; its main gets argv without that name."""
    if len(sys.argv) > 1 and sys.argv[1] in HELP_ARGUMENTS:
        print(usage())
        return
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        print(usage(), file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    name, arguments = sys.argv[1], sys.argv[2:]
    module_name, function_name, _ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    if any(argument in HELP_ARGUMENTS for argument in arguments):
        print(subcommand_usage(name, module))
        return
    subcommand_main = getattr(module, function_name)

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            exit_with_usage_error(name, f"{error}; see `{PROGRAM} {name} --help`.")

    def run_subcommand(argv: list[str]) -> None:
        try:
            subcommand_main(argv)
        except app.UsageError as error:
            exit_with_usage_error(name, error)

    # absl's handler shows INFO records, among them JAX's probing of platforms this machine lacks (TPU).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    app.run(run_subcommand, argv=[f"{PROGRAM} {name}", *arguments], flags_parser=parse_flags)


if __name__ == "__main__":
    main()
