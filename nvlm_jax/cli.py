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


# ------------------------------------------------------------------------------------------
# Loading a model for answering (chat, serve): the flags and the one way they are read.


def define_model_flags() -> None:
    """--checkpoint (required), --step, --dtype, --quantize, --layer_layout and --tensor_parallel."""
    flags.DEFINE_string("checkpoint", None, "What `nvlm_jax.load_pretrained` reads: a converted folder (NVLM-D/X/H), "
                        "a Hugging Face NVLM-D folder, a training workdir or one of its checkpoints/<step> folders.")
    flags.DEFINE_string("step", "latest", "Training workdir: 'latest', 'best' (its keep-best metric) or a step.")
    flags.DEFINE_string("dtype", "bfloat16", "Dtype to load and run the model in.")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Weight-only quantized Linear kernels (a folder "
                      "converted with --quantize loads as stored).")
    flags.DEFINE_enum("layer_layout", "auto", ["auto", "stacked", "per_layer"], "How the decoder layers' "
                      "weights are held: per_layer (NVLM-D) decodes faster on CPU; auto picks it there.")
    flags.DEFINE_integer("tensor_parallel", 0, "Devices on the mesh's tensor axis (the rest go to fsdp); "
                         "0 = the most that the model's head counts allow.")
    flags.mark_flag_as_required("checkpoint")


def locate_checkpoint():
    """--checkpoint and --step as a located checkpoint (`checkpoint.folders.Located`); a missing
    or unreadable one is a `UserError`, found before anything loads."""
    from nvlm_jax.checkpoint.folders import locate, parse_step

    try:
        return locate(flags.FLAGS.checkpoint, parse_step(flags.FLAGS.step))
    except ValueError as e:  # CheckpointNotFoundError included
        raise UserError(str(e)) from None


def load_model(located, needed_by: str):
    """The model of a located checkpoint per the model flags, on a mesh over every device (or
    --tensor_parallel), with load progress on stderr. A checkpoint the loader refuses, or one
    without tokenizer files, ends the program with one line naming `needed_by`."""
    import time

    import jax

    import nvlm_jax
    from nvlm_jax.compile_cache import enable_compilation_cache
    from nvlm_jax.pretrained import choose_mesh, read_config
    from nvlm_jax.sharding import make_mesh

    enable_compilation_cache()  # a restart reuses the compiled prefill/decode programs
    fl = flags.FLAGS
    step = located.step if located.kind == "workdir" else "latest"
    print(f"loading {located.path} ({located.describe()})...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    mesh = None
    if fl.tensor_parallel:
        mesh = make_mesh(data=1, fsdp=-1, tensor=fl.tensor_parallel)
    elif jax.device_count() > 1:
        mesh = choose_mesh(read_config(located.path, step), jax.device_count())
    try:
        model = nvlm_jax.load_pretrained(located.path, dtype=fl.dtype, mesh=mesh, step=step, quantize=fl.quantize,
                                        layer_layout=fl.layer_layout)
    except ValueError as e:  # a damaged checkpoint or tokenizer: named by the loader, one line here
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if model.tokenizer is None:
        fail(f"{located.path} has no tokenizer files; {needed_by} needs them")
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model
