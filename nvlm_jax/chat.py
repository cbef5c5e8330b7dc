"""Command-line chat with an NVLM model (the release's `model.chat` flow).

    python -m nvlm_jax.chat --checkpoint=DIR --image=photo.jpg --question="Describe the image."
    python -m nvlm_jax.chat --checkpoint=DIR --image=a.png --image=b.png --interactive

`--checkpoint` is anything `nvlm_jax.load_pretrained` reads: a converted folder (NVLM-D, -X or
-H: `model.chat` builds each arch's prompt and per-row tiles), a Hugging Face NVLM-D folder, a
training workdir (its latest checkpoint, or `--step=best` / a number) or one
`checkpoints/<step>` folder; prompts follow the checkpoint's saved prompt format. With
`--interactive`, questions are read from stdin one per line (the first one may come from
`--question`) and the conversation history is kept; an empty line or end of input quits.
Compiled programs go to the persistent compilation cache (`nvlm_jax.compile_cache`).
Mistakes (a checkpoint or image that is not there, bad flag values) are one line on stderr and
exit status 2, before the model loads; load progress goes to stderr; `--verbosity=0` shows the
libraries' INFO logs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from nvlm_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module adds none)."""
    cli.define_model_flags()
    flags.DEFINE_multi_string("image", [], "Image file(s); repeat the flag for several images.")
    flags.DEFINE_string("question", None, "The question (required unless --interactive).")
    flags.DEFINE_bool("interactive", False, "Keep asking questions from stdin, with history.")
    flags.DEFINE_integer("max_new_tokens", 512, "Longest answer, in tokens.")
    flags.DEFINE_bool("do_sample", False, "Sample instead of greedy decoding.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _read_line(prompt: str) -> str | None:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def _check_flags():
    """Everything checkable before loading (`cli.UserError`); returns the located checkpoint."""
    from nvlm_jax.checkpoint.paths import as_path

    if not FLAGS.interactive and not FLAGS.question:
        raise cli.UserError("give --question (or --interactive)")
    if FLAGS.max_new_tokens < 1:
        raise cli.UserError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    if FLAGS.temperature <= 0 or not 0 < FLAGS.top_p <= 1 or FLAGS.top_k < 0 or FLAGS.tensor_parallel < 0:
        raise cli.UserError("--temperature must be > 0, --top_p in (0, 1], --top_k and --tensor_parallel >= 0")
    located = cli.locate_checkpoint()
    for image in FLAGS.image:
        if not as_path(image).is_file():
            raise cli.UserError(f"--image {image}: no such file")
    return located


def main(argv: Sequence[str]) -> None:
    del argv
    located = _check_flags()
    model = cli.load_model(located, "chat")
    images = list(FLAGS.image) or None
    options = dict(max_new_tokens=FLAGS.max_new_tokens, do_sample=FLAGS.do_sample, temperature=FLAGS.temperature,
                   top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    if not FLAGS.interactive:
        try:
            print(model.chat(images, FLAGS.question, **options))
        except ValueError as e:  # a question this model cannot take (too long, images vs <image>, ...)
            cli.fail(str(e))
        return
    history = None
    question = FLAGS.question or _read_line("user> ")
    while question:
        try:
            answer, history = model.chat(images, question, history, return_history=True, **options)
        except ValueError as e:
            # One rejected follow-up must not end the session or lose the conversation so far.
            print(f"error: {e} (not added to the conversation; ask again)", file=sys.stderr, flush=True)
        else:
            print(f"assistant> {answer}", flush=True)
        question = _read_line("user> ")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
