"""Checkpoint conversion, the command line: Hugging Face safetensors <-> our Orbax checkpoints.

    python -m nvlm_jax.convert --hf_dir=DIR --out_dir=DIR [--dtype=bfloat16] [--drop_dummy_heads]
    # Sharded: the same command in each of N processes, with JAX_COORDINATOR_ADDRESS=HOST0:PORT,
    # JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i set (or --coordinator_address/--num_processes/
    # --process_id; one process needs none); out_dir on a file system all processes share:
    python -m nvlm_jax.convert --hf_dir=DIR --out_dir=DIR --mesh=DATA,FSDP,TENSOR
    python -m nvlm_jax.convert --verify=DIR          # a converted folder against its sha256 manifest
    # Export a converted folder, a training workdir (its latest step, or --step) or checkpoints/N:
    python -m nvlm_jax.convert --export_from=DIR --out_dir=DIR [--max_shard_size=5GB] [--step=best]
    python -m nvlm_jax.convert --vit_dir=DIR --llm_dir=DIR --out_dir=DIR [--arch=D]
    # GPTQ: quantize any checkpoint calibrated on an eval task's prompts (synthetic: its train split)
    python -m nvlm_jax.convert --gptq_from=DIR --quantize=int4 --calibration_task=synthetic_colour --out_dir=DIR

The work is done in `nvlm_jax.checkpoint` (import: `hf_import`, export: `export`, assembly:
`assemble`, folder kinds: `folders`); the names below are re-exported for scripts that used
`nvlm_jax.convert.convert(...)` and friends. Mistakes in the flags (an existing --out_dir
without --overwrite, an --out_dir that is, holds or lies inside a source, a non-float --dtype,
a checkpoint that is not there) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from absl import flags

from nvlm_jax import cli, distributed
from nvlm_jax.checkpoint.assemble import assemble, assembled_config, fresh_params
from nvlm_jax.checkpoint.export import DEFAULT_MAX_SHARD_BYTES, export_checkpoint, export_hf, to_hf_config
from nvlm_jax.checkpoint.folders import (
    HF_CONFIG_FILE,
    INDEX_FILE,
    OUR_CONFIG_FILE,
    PARAMS_DIR,
    TOKENIZER_FILES,
    is_converted,
    locate,
    parse_step,
)
from nvlm_jax.checkpoint.hf_import import convert, convert_sharded, load_hf_params
from nvlm_jax.checkpoint.manifest import verify_manifest
from nvlm_jax.checkpoint.paths import as_path, check_apart, local_path
from nvlm_jax.checkpoint.restore import float_dtype, load_our_params, param_shardings, read_our_config
from nvlm_jax.checkpoint.writers import check_out_dir

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES", "HF_CONFIG_FILE", "INDEX_FILE", "OUR_CONFIG_FILE", "PARAMS_DIR", "TOKENIZER_FILES",
    "assemble", "assembled_config", "convert", "convert_sharded", "export_checkpoint", "export_hf", "fresh_params",
    "is_our_checkpoint", "load_hf_params", "load_our_params", "param_shardings", "parse_mesh", "parse_size",
    "read_our_config", "to_hf_config",
]

is_our_checkpoint = is_converted

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module adds none)."""
    flags.DEFINE_string("hf_dir", None, "NVLM-D Hugging Face folder to convert into --out_dir.")
    flags.DEFINE_string("export_from", None, "Checkpoint to export (Hugging Face layout) into --out_dir: a "
                        "converted folder, a training workdir or one checkpoints/<step> folder.")
    flags.DEFINE_string("step", "latest", "Export from a training workdir: 'latest', 'best' (its keep-best metric) "
                        "or a step number.")
    flags.DEFINE_string("vit_dir", None, "Standalone InternViT folder to assemble (with --llm_dir).")
    flags.DEFINE_string("llm_dir", None, "Standalone Qwen2/Llama folder to assemble (with --vit_dir).")
    flags.DEFINE_string("out_dir", None, "Destination folder (written atomically).")
    flags.DEFINE_string("dtype", "bfloat16", "Stored dtype of converted params (import/assembly); export: "
                        "stored dtype of the safetensors (default: the params' own).")
    flags.DEFINE_bool("drop_dummy_heads", False, "Import: slice the (verified zero) dummy ViT heads away.")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Import: store the Linear kernels quantized (weight-only "
                      "int8 per output channel / int4 per 128 inputs), quantized while streaming; loads as stored. "
                      "With --gptq_from: the GPTQ mode.")
    flags.DEFINE_string("gptq_from", None, "Checkpoint to quantize by GPTQ (`nvlm_jax.quantize_gptq`, whole model "
                        "in memory) into --out_dir, calibrated on --calibration_task; stored in --dtype.")
    flags.DEFINE_list("calibration_task", [], "GPTQ: eval task(s) whose prompts calibrate (synthetic_<name>: its "
                      "training split; others read --calibration_data).")
    flags.DEFINE_string("calibration_data", None, "GPTQ: the calibration task's JSONL (as `nvlm_jax.eval --data`).")
    flags.DEFINE_integer("calibration_samples", 64, "GPTQ: prompts per calibration task.")
    flags.DEFINE_integer("vit_dummy_heads", None, "Assembly: zero heads to pad the ViT with (default 0); "
                         "export: dummy heads to store (default: 7 for the 72B ViT as the release, else as in the "
                         "params).")
    flags.DEFINE_bool("merge_lora", False, "Export: fold the model's LoRA adapters into its weights (required for a "
                      "LoRA-trained model: the release layout has no adapters).")
    flags.DEFINE_string("remote_code_repo", "nvidia/NVLM-D-72B", "Export: where config.json's auto_map points for "
                        "the release's modelling code ('' = modules beside the weights).")
    flags.DEFINE_enum("arch", "D", ["D", "X", "H"], "Assembly: the NVLM architecture to build.")
    flags.DEFINE_integer("seed", 0, "Assembly: seed of the freshly initialised params.")
    flags.DEFINE_integer("image_context_token_id", None, "Assembly: image context token id "
                         "(default: the LLM tokenizer's <|vision_pad|>).")
    flags.DEFINE_string("max_shard_size", "5GB", "Export: largest shard, e.g. 5GB or 500MB.")
    flags.DEFINE_bool("check_finite", True, "Import/assembly: fail, naming the tensor, when a source weight "
                      "holds NaN or Inf.")
    flags.DEFINE_string("verify", None, "Check a converted folder against its sha256 manifest (naming every "
                        "missing, extra or damaged file) and exit; no other flag is needed.")
    flags.DEFINE_bool("overwrite", False, "Replace --out_dir if it exists.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_string("mesh", None, "Import/assembly: write straight into the sharded layout of a "
                        "data,fsdp,tensor mesh over every device of every process (e.g. 1,2,4; one size may be "
                        "-1); each process reads and writes only its own shards. Run the same command in every "
                        "process, with the distributed flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                        "JAX_PROCESS_ID.")
    distributed.define_flags()


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'1,2,4' → (data, fsdp, tensor) = (1, 2, 4); one size may be -1 (the remaining devices)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(n == 0 or n < -1 for n in sizes):
        raise ValueError(f"--mesh must be three sizes data,fsdp,tensor (positive, or one -1), got {text!r}")
    return sizes


def parse_size(text: str) -> int:
    """'5GB' → 5e9, '500MiB' → 500·2^20, '1234' → 1234 bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 5GB, 500MiB or a byte count)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _check_flags() -> tuple[tuple[int, int, int] | None, int]:
    """Every check that needs no model: raises `cli.UserError` naming the mistake."""
    modes = [bool(FLAGS.hf_dir), bool(FLAGS.export_from), bool(FLAGS.vit_dir or FLAGS.llm_dir), bool(FLAGS.gptq_from)]
    if FLAGS.verify:
        if any(modes) or FLAGS.out_dir:
            raise cli.UserError("--verify=DIR checks one converted folder; give no other mode or --out_dir")
        if not as_path(FLAGS.verify).is_dir():
            raise cli.UserError(f"--verify {FLAGS.verify}: no such folder")
        return None, 0
    if sum(modes) != 1 or not FLAGS.out_dir:
        raise cli.UserError("give --out_dir and exactly one of: --hf_dir, --export_from, --vit_dir + --llm_dir, "
                            "--gptq_from")
    if FLAGS.quantize and not (FLAGS.hf_dir or FLAGS.gptq_from):
        raise cli.UserError("--quantize applies to --hf_dir imports and --gptq_from")
    if FLAGS.gptq_from and not (FLAGS.quantize and FLAGS.calibration_task):
        raise cli.UserError("--gptq_from needs --quantize=int8|int4 and --calibration_task")
    if FLAGS.gptq_from and FLAGS.mesh:
        raise cli.UserError("--gptq_from runs on one host: drop --mesh (the folder restores onto any mesh)")
    if FLAGS.calibration_samples < 1:
        raise cli.UserError(f"--calibration_samples must be >= 1, got {FLAGS.calibration_samples}")
    if FLAGS.quantize and FLAGS.mesh:
        raise cli.UserError("--quantize streams through one host: drop --mesh (the folder restores onto any mesh)")
    if FLAGS.mesh and FLAGS.export_from:
        raise cli.UserError("--mesh applies to --hf_dir and --vit_dir/--llm_dir, not to --export_from")
    if (FLAGS.vit_dir or FLAGS.llm_dir) and not (FLAGS.vit_dir and FLAGS.llm_dir):
        raise cli.UserError("assembly needs both --vit_dir and --llm_dir")
    try:
        sizes = parse_mesh(FLAGS.mesh) if FLAGS.mesh else None
        max_shard = parse_size(FLAGS.max_shard_size)
        if not FLAGS.export_from or FLAGS["dtype"].present:
            float_dtype(FLAGS.dtype)
        check_apart(FLAGS.out_dir, {f"--{name}": FLAGS[name].value
                                    for name in ("hf_dir", "export_from", "vit_dir", "llm_dir", "gptq_from")})
        out = as_path(FLAGS.out_dir)
        if out.exists() and not FLAGS.overwrite:
            raise cli.UserError(f"--out_dir {out} already exists (pass --overwrite to replace it)")
        check_out_dir(local_path(out, "--out_dir"), overwrite=True)
        for name in ("hf_dir", "vit_dir", "llm_dir"):
            if FLAGS[name].value and not as_path(FLAGS[name].value).is_dir():
                raise cli.UserError(f"--{name} {FLAGS[name].value}: no such folder")
        if FLAGS.gptq_from:
            from nvlm_jax.eval.tasks import get_task

            locate(FLAGS.gptq_from, parse_step(FLAGS.step))
            for name in FLAGS.calibration_task:
                get_task(name)
        if FLAGS.export_from:
            located = locate(FLAGS.export_from, parse_step(FLAGS.step))
            if located.kind == "hf":
                raise cli.UserError(f"--export_from {FLAGS.export_from} is already a Hugging Face folder")
    except cli.UserError:
        raise
    except ValueError as e:  # CheckpointNotFoundError included
        raise cli.UserError(str(e)) from None
    return sizes, max_shard


def main(argv: Sequence[str]) -> None:
    del argv
    sizes, max_shard = _check_flags()
    if FLAGS.verify:
        try:
            count = verify_manifest(local_path(FLAGS.verify, "--verify"))
        except ValueError as e:  # every missing, extra or damaged file, listed
            print(f"{cli.program()}: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        print(f"verified {FLAGS.verify}: {count} files match its manifest")
        return
    # Before anything touches a JAX backend.
    if distributed.initialize(distributed.from_flags()) and sizes is None:
        raise cli.UserError("a multi-process run needs --mesh: without it every process would write the whole "
                            "checkpoint")
    import jax

    from nvlm_jax.sharding import make_mesh

    mesh = make_mesh(*sizes) if sizes is not None else None
    try:
        if FLAGS.hf_dir and mesh is not None:
            out, stats = convert_sharded(FLAGS.hf_dir, FLAGS.out_dir, mesh, dtype=FLAGS.dtype,
                                         drop_dummy_heads=FLAGS.drop_dummy_heads, overwrite=FLAGS.overwrite,
                                         progress=FLAGS.progress, check_finite=FLAGS.check_finite)
            print(f"process {jax.process_index()} of {jax.process_count()}: read {stats.bytes_read} source bytes "
                  f"(its share {stats.share_bytes}, whole checkpoint {stats.total_bytes}) in {stats.blocks} "
                  f"blocks; peak RSS {_peak_rss_bytes()} bytes", flush=True)
        elif FLAGS.hf_dir:
            out = convert(FLAGS.hf_dir, FLAGS.out_dir, dtype=FLAGS.dtype, drop_dummy_heads=FLAGS.drop_dummy_heads,
                          overwrite=FLAGS.overwrite, progress=FLAGS.progress, check_finite=FLAGS.check_finite,
                          quantize=FLAGS.quantize)
        elif FLAGS.export_from:
            dtype = FLAGS.dtype if FLAGS["dtype"].present else None
            out = export_checkpoint(FLAGS.export_from, FLAGS.out_dir, step=parse_step(FLAGS.step), dtype=dtype,
                                    vit_dummy_heads=FLAGS.vit_dummy_heads, max_shard_bytes=max_shard,
                                    overwrite=FLAGS.overwrite, progress=FLAGS.progress,
                                    merge_lora=FLAGS.merge_lora, remote_code_repo=FLAGS.remote_code_repo)
        elif FLAGS.gptq_from:
            out = _gptq()
        else:
            out = assemble(FLAGS.vit_dir, FLAGS.llm_dir, FLAGS.out_dir, arch=FLAGS.arch, dtype=FLAGS.dtype,
                           seed=FLAGS.seed, vit_dummy_heads=FLAGS.vit_dummy_heads or 0,
                           image_context_token_id=FLAGS.image_context_token_id, overwrite=FLAGS.overwrite,
                           progress=FLAGS.progress, mesh=mesh, check_finite=FLAGS.check_finite)
    except ValueError as e:  # the source's problems, all listed; nothing was written
        print(f"{cli.program()}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"wrote {out}")


def _gptq():
    """--gptq_from: load, calibrate on the tasks' prompts, quantize, save (see the flags)."""
    import nvlm_jax
    from nvlm_jax.checkpoint.gptq import task_inputs
    from nvlm_jax.checkpoint.save_model import save_model

    model = nvlm_jax.load_pretrained(FLAGS.gptq_from, dtype=FLAGS.dtype, step=parse_step(FLAGS.step))
    inputs = task_inputs(model, FLAGS.calibration_task, FLAGS.calibration_data, FLAGS.calibration_samples)
    quantized = nvlm_jax.quantize_gptq(model, inputs, FLAGS.quantize)
    return save_model(quantized, FLAGS.out_dir, overwrite=FLAGS.overwrite)


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux `VmHWM`), or None where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
