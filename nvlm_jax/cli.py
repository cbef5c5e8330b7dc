"""What every command-line tool shares: quiet logs by default, and user mistakes reported as
one line on stderr with exit status 2, before any model is loaded.

    if __name__ == "__main__":
        define_flags()
        cli.run(main)            # main raises cli.UserError("...") for a mistake of the user's
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

USAGE_EXIT = 2
NOISY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "tensorstore", "etils")


class UserError(ValueError):
    """A mistake in what the user asked for (a flag value, a missing file): one line, exit 2."""


def program() -> str:
    """The running program's name: the module of `python -m nvlm_jax.chat` ("nvlm_jax.chat")."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else "nvlm_jax"


def fail(message: str) -> None:
    """Prints `message` as one line on stderr and exits with status 2."""
    print(f"{program()}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def quiet_logging() -> None:
    """Orbax / JAX / absl INFO chatter off unless the user passed `--verbosity` (absl's flag)."""
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Orbax logs through absl; its warnings about its own layout (e.g. per-item metadata files that
    # training checkpoints do not have) say nothing a CLI user can act on.
    logging.getLogger("absl").addFilter(_below_error_from_orbax)


def _below_error_from_orbax(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


def _parse_flags(argv: Sequence[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (see --help)")
        raise  # unreachable: fail exits


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`absl.app.run(main)` with one-line errors (exit 2) for bad flags and `UserError`s, and
    quiet logging (see `quiet_logging`)."""

    def wrapped(argv: Sequence[str]) -> None:
        quiet_logging()
        if len(argv) > 1:
            fail(f"unexpected arguments: {list(argv[1:])}")
        try:
            main(argv)
        except UserError as e:
            fail(str(e))

    app.run(wrapped, flags_parser=_parse_flags)
