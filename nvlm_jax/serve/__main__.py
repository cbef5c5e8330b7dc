"""OpenAI-compatible server for NVLM-D/X/H checkpoints.

    python -m nvlm_jax.serve --checkpoint=DIR --port=8000 --max_batch=8

`--checkpoint` is anything `nvlm_jax.load_pretrained` reads (Hugging Face folder, converted
folder, training workdir, `checkpoints/<step>`). Clients use any OpenAI client:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="nvlm", messages=[{"role": "user", "content": "Hi"}])

Mistakes (a checkpoint that is not there, bad flag values) are one line on stderr and exit
status 2, before the model loads.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from nvlm_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    cli.define_model_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes it to the network).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("served_model_name", "nvlm", "The model name clients pass as `model`.")
    flags.DEFINE_integer("max_batch", 8, "Decode slots (requests answered at once).")
    flags.DEFINE_integer("max_model_len", 0, "Prompt + answer tokens per request (0 = the model's "
                         "max_position_embeddings); sets the KV cache size.")
    flags.DEFINE_integer("limit_images_per_prompt", 4, "Most images in one request (vLLM's limit_mm_per_prompt).")
    flags.DEFINE_integer("max_image_pixels", 36_000_000, "Largest image (width x height) accepted.")
    flags.DEFINE_string("image_root", None, "Folder that local image paths (file:// or plain) must lie under; "
                        "unset = local paths refused.")
    flags.DEFINE_bool("allow_remote_images", False, "Fetch http(s) image URLs (off: refused).")
    flags.DEFINE_integer("image_cache_size", 64, "Images whose projected tokens stay cached (0 = off).")


def _check_flags():
    from nvlm_jax.checkpoint.paths import as_path

    for name, low in (("port", 0), ("max_batch", 1), ("max_model_len", 0), ("limit_images_per_prompt", 0),
                      ("max_image_pixels", 1), ("image_cache_size", 0), ("tensor_parallel", 0)):
        if getattr(FLAGS, name) < low:
            raise cli.UserError(f"--{name} must be >= {low}, got {getattr(FLAGS, name)}")
    if FLAGS.image_root is not None and not as_path(FLAGS.image_root).is_dir():
        raise cli.UserError(f"--image_root {FLAGS.image_root}: no such folder")
    return cli.locate_checkpoint()


def main(argv: Sequence[str]) -> None:
    del argv
    located = _check_flags()
    import uvicorn

    from nvlm_jax.serve.app import create_app
    from nvlm_jax.serve.engine import Engine
    from nvlm_jax.serve.requests import Limits

    model = cli.load_model(located, "the server")
    try:
        engine = Engine(model, max_batch=FLAGS.max_batch, max_len=FLAGS.max_model_len or None,
                        image_cache_size=FLAGS.image_cache_size,
                        max_images=max(1, FLAGS.limit_images_per_prompt)).start(warmup=True)
    except ValueError as e:
        cli.fail(str(e))
    limits = Limits(max_image_pixels=FLAGS.max_image_pixels, limit_images_per_prompt=FLAGS.limit_images_per_prompt,
                    image_root=FLAGS.image_root, allow_remote_images=FLAGS.allow_remote_images)
    app = create_app(engine, model_name=FLAGS.served_model_name, limits=limits)
    print(f"serving {FLAGS.served_model_name!r} on http://{FLAGS.host}:{FLAGS.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
