"""Command-line chat with an NVLM model (the release's `model.chat` flow).

    python -m nvlm_jax.chat --checkpoint=DIR --image=photo.jpg --question="Describe the image."
    python -m nvlm_jax.chat --checkpoint=DIR --image=a.png --image=b.png --interactive

`--checkpoint` is one of our Orbax folders (NVLM-D, -X or -H: `model.chat` builds each arch's
prompt and per-row tiles) or a Hugging Face NVLM-D folder. With
`--interactive`, questions are read from stdin one per line (the first one may come from
`--question`) and the conversation history is kept; an empty line or end of input quits.
Compiled programs go to the persistent compilation cache (`nvlm_jax.compile_cache`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module adds none)."""
    flags.DEFINE_string("checkpoint", None, "Our Orbax checkpoint folder (NVLM-D/X/H) or a Hugging Face NVLM-D "
                        "folder.")
    flags.DEFINE_multi_string("image", [], "Image file(s); repeat the flag for several images.")
    flags.DEFINE_string("question", None, "The question (required unless --interactive).")
    flags.DEFINE_bool("interactive", False, "Keep asking questions from stdin, with history.")
    flags.DEFINE_string("dtype", "bfloat16", "Dtype to load and run the model in.")
    flags.DEFINE_integer("max_new_tokens", 512, "Longest answer, in tokens.")
    flags.DEFINE_bool("do_sample", False, "Sample instead of greedy decoding.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("tensor_parallel", 0, "Devices on the mesh's tensor axis (the rest go to fsdp); "
                         "0 = the most that the model's head counts allow.")
    flags.mark_flag_as_required("checkpoint")


def _read_line(prompt: str) -> str | None:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.interactive and not FLAGS.question:
        raise app.UsageError("give --question (or --interactive)")
    import jax

    import nvlm_jax
    from nvlm_jax.compile_cache import enable_compilation_cache
    from nvlm_jax.pretrained import choose_mesh, read_config
    from nvlm_jax.sharding import make_mesh

    enable_compilation_cache()  # a restart reuses the compiled prefill/decode programs

    mesh = None
    if FLAGS.tensor_parallel:
        mesh = make_mesh(data=1, fsdp=-1, tensor=FLAGS.tensor_parallel)
    elif jax.device_count() > 1:
        mesh = choose_mesh(read_config(FLAGS.checkpoint), jax.device_count())
    model = nvlm_jax.load_pretrained(FLAGS.checkpoint, dtype=FLAGS.dtype, mesh=mesh)
    images = list(FLAGS.image) or None
    options = dict(max_new_tokens=FLAGS.max_new_tokens, do_sample=FLAGS.do_sample, temperature=FLAGS.temperature,
                   top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    if not FLAGS.interactive:
        print(model.chat(images, FLAGS.question, **options))
        return
    history = None
    question = FLAGS.question or _read_line("user> ")
    while question:
        answer, history = model.chat(images, question, history, return_history=True, **options)
        print(f"assistant> {answer}", flush=True)
        question = _read_line("user> ")


if __name__ == "__main__":
    define_flags()
    app.run(main)
