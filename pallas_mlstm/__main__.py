"""`python -m pallas_mlstm COMMAND [--flags]`: check, time and tune the mLSTM kernels on this machine.

Only the chosen command's module is imported, so its flags are the ones defined. An unknown command, a bad flag
or an impossible request (an `app.UsageError` from the command) ends in one line on stderr and exit code 2; a
failed run (`sys.exit(message)` from the command, or any other exception) in one line and exit code 1, with the
traceback too under --traceback.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import NoReturn

from absl import app, flags

PROGRAM = "python -m pallas_mlstm"
USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1
HELP_ARGUMENTS = ("-h", "--help", "--helpshort", "--helpfull")
SUBCOMMANDS = {
    "check": ("pallas_mlstm.check", "main_check", "check the kernels against the references on this machine"),
    "bench": ("pallas_mlstm.benchmarks.runner", "main_bench", "time pallas_mlstm and its peers"),
    "tune": ("pallas_mlstm.benchmarks.sweep", "main_tune", "measure the best launch configs for this card"),
    "step_bench": (
        "pallas_mlstm.benchmarks.step_bench",
        "main",
        "time the decoding step against mlstm_kernels' step kernels (NVIDIA GPU)",
    ),
    "kernel_times": (
        "pallas_mlstm.benchmarks.kernel_times",
        "main",
        "time each kernel of a backend's chunkwise forward and backward (NVIDIA GPU; interpreted on a CPU)",
    ),
}
TRACEBACK = flags.DEFINE_bool("traceback", False, "On a failure, print its Python traceback before the one line.")


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
    """The usage of one subcommand: what it does, its flags, and --traceback."""
    _, _, help_text = SUBCOMMANDS[name]
    return (
        f"usage: {PROGRAM} {name} [--flags]\n\n{help_text[0].upper()}{help_text[1:]}.\n\nflags:\n"
        f"{flags.FLAGS.module_help(module)}\n\nany command:\n  --[no]traceback: {flags.FLAGS[TRACEBACK.name].help}"
    )


def exit_with_error(name: str | None, message, exit_code: int = USAGE_EXIT_CODE) -> NoReturn:
    """Prints `message` as one line on stderr, after the program (and command) name, and exits with exit_code."""
    program = PROGRAM if name is None else f"{PROGRAM} {name}"
    print(f"{program}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def run_subcommand(name: str, subcommand_main, module, arguments: list[str]) -> None:
    """Parses `arguments` as flags and runs `subcommand_main` (of `module`) on what remains, with the one-line
    errors of this module's docstring."""
    if any(argument in HELP_ARGUMENTS for argument in arguments):
        print(subcommand_usage(name, module))
        return
    try:
        argv = flags.FLAGS([f"{PROGRAM} {name}", *arguments])
    except flags.Error as error:
        exit_with_error(name, f"{error}; see `{PROGRAM} {name} --help`.")
    try:
        subcommand_main(argv)
    except app.UsageError as error:
        exit_with_error(name, error)
    except SystemExit as exit:
        if isinstance(exit.code, str):
            exit_with_error(name, exit.code, FAILURE_EXIT_CODE)
        raise
    except KeyboardInterrupt:
        exit_with_error(name, "interrupted.", FAILURE_EXIT_CODE)
    except Exception as error:
        if TRACEBACK.value:
            traceback.print_exc()
        hint = "" if TRACEBACK.value else f" (`{PROGRAM} {name} ... --traceback` shows where)"
        exit_with_error(name, f"{type(error).__name__}: {error}{hint}", FAILURE_EXIT_CODE)


def main(arguments: list[str] | None = None) -> None:
    """Runs the subcommand named by the first of `arguments` (default: the command line's) with the rest."""
    arguments = sys.argv[1:] if arguments is None else arguments
    if arguments and arguments[0] in HELP_ARGUMENTS:
        print(usage())
        return
    if not arguments or arguments[0] not in SUBCOMMANDS:
        problem = f"unknown command {arguments[0]!r}" if arguments else "no command"
        exit_with_error(
            None, f"{problem}; choose one of: {', '.join(SUBCOMMANDS)} (`{PROGRAM} --help` says what each does)."
        )
    name = arguments[0]
    module_name, function_name, _ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    run_subcommand(name, getattr(module, function_name), module, arguments[1:])


if __name__ == "__main__":
    main()
