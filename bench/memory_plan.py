"""Per-device memory of the real 72B NVLM-D/X/H steps on large meshes, without the hardware.

AOT-compiles (lower + compile; nothing is allocated) the inference forward and a training step
(AdamW, bf16 compute, f32 master weights and moments, remat) on simulated CPU devices, and prints
XLA's memory analysis next to an analytic estimate. Run:

    python bench/memory_plan.py [--archs D,X,H] [--meshes infer8,train64,train128] [--lora sft8,lora8]

The `--lora` rows compile the project's own training step (`nvlm_jax.train.step`: stage-2 SFT
freezing, only trainable leaves get gradients and AdamW moments) for NVLM-D-72B on 8 devices:
"sft8" full SFT (f32 master weights of the LLM and projector, the ViT frozen), "lora8" LoRA
rank 64 on the LLM with the whole base frozen in bf16 and f32 adapters.

The `--serve` rows compile what `nvlm_jax.generate.generate` runs for one NVLM-D-72B request (a
6+1-tile image and a 3,200-token prompt, 512 new tokens, greedy): the ViT program and the
prefill + decode-loop program, through generate's own `runner` hook (lowered and compiled, never
run), with bf16 activations and bf16, int8 or int4 weights (issue 18): "int8x1" one device,
"int8x2" two (tensor-parallel), "int4x1" one, "bf16x8" today's 8-device bf16 for reference.
Each program is compiled twice: as XLA:CPU compiles it, and without while-loop invariant code
motion ("no LICM"). XLA:CPU has no bf16 (or int) dot: it converts each layer's weights to f32 for
the dot, simplifies convert(slice(stack)) to slice(convert(stack)) and hoists that convert out of
the layer loop, so its temp holds an f32 copy of every stacked weight (2x the bf16 params, 4x
int8) that a GPU/TPU compile, with native bf16 dots, does not have. The no-LICM figure leaves
one layer's converted weights per step: the estimate to plan a device with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=128"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from nvlm_jax import config as C  # noqa: E402
from nvlm_jax.models import nvlm  # noqa: E402
from nvlm_jax.sharding import DEFAULT_RULES, logical_sharding, make_mesh, tree_shardings  # noqa: E402
from nvlm_jax.train import freeze, optim  # noqa: E402
from nvlm_jax.train import step as train_step  # noqa: E402

GIB = 1024**3
# name: (devices, data, fsdp, tensor, training?, global batch)
MESHES = {
    "infer8": (8, 1, 1, 8, False, 1),
    "train64": (64, 1, 8, 8, True, 8),
    "train128": (128, 1, 16, 8, True, 16),
}
SEQ = {"D": 3200, "X": 1024, "H": 1280}  # paper SFT decoder lengths (Table 11)
TILES = 7


def arch_config(arch: str, training: bool) -> C.NVLMConfig:
    cfg = {"D": C.nvlm_d_72b, "X": C.nvlm_x_72b, "H": C.nvlm_h_72b}[arch]()
    return cfg.replace(dtype="bfloat16", param_dtype="float32" if training else "bfloat16",
                       remat_policy="full" if training else "none")


def abstract_batch(cfg: C.NVLMConfig, batch: int, mesh):
    s, t, px = SEQ[cfg.arch], TILES, cfg.vision.image_size
    tok = logical_sharding((batch, s), ("activation_batch", "activation_length"), mesh, what="tokens")
    tiles = logical_sharding((batch, t), ("activation_batch", None), mesh, what="tiles")
    pix = logical_sharding((batch, t, px, px, 3), ("activation_batch", None, None, None, None), mesh, what="pixels")
    sd = jax.ShapeDtypeStruct
    ints = lambda shape, sh: sd(shape, jnp.int32, sharding=sh)  # noqa: E731
    return {
        "input_ids": ints((batch, s), tok), "targets": ints((batch, s), tok),
        "loss_mask": sd((batch, s), jnp.bool_, sharding=tok), "segment_ids": ints((batch, s), tok),
        "positions": ints((batch, s), tok), "pixel_values": sd((batch, t, px, px, 3), jnp.bfloat16, sharding=pix),
        "tile_valid": sd((batch, t), jnp.bool_, sharding=tiles), "tile_image": ints((batch, t), tiles),
        "token_image": ints((batch, s), tok), "token_tile": ints((batch, s), tok),
    }


def loss_fn(params, cfg, batch):
    logits = nvlm.apply_batch(params, cfg, batch)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def analytic_gib(cfg: C.NVLMConfig, devices: int, training: bool) -> float:
    n = C.param_count(cfg)
    per_param = 4 + 4 + 4 + 4 if training else 2  # f32 params, grads, Adam mu and nu | bf16 params
    return n * per_param / devices / GIB


def plan(arch: str, mesh_name: str):
    devices, data, fsdp, tensor, training, batch = MESHES[mesh_name]
    mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[:devices])
    cfg = arch_config(arch, training)
    boxed = nvlm.abstract_params(cfg)
    shardings = tree_shardings(boxed, mesh)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.meta.unbox(boxed), shardings)
    abatch = abstract_batch(cfg, batch, mesh)
    if training:
        opt = optax.adamw(1e-5)
        opt_state = jax.eval_shape(opt.init, params)
        opt_state = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_like(x, params, shardings, mesh)), opt_state)

        def step(p, o, b):
            loss, grads = jax.value_and_grad(loss_fn)(p, cfg, b)
            updates, o = opt.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        fn = jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings, None, None))
        args = (params, opt_state, abatch)
    else:
        fn = jax.jit(lambda p, b: nvlm.apply_batch(p, cfg, b)[:, -1])
        args = (params, abatch)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes) / GIB
    return dict(arch=arch, mesh=mesh_name, devices=devices, shape=f"data={data} fsdp={fsdp} tensor={tensor}",
                batch=batch, seq=SEQ[arch], args=mem.argument_size_in_bytes / GIB, temp=mem.temp_size_in_bytes / GIB,
                total=total, analytic=analytic_gib(cfg, devices, training), compile_s=seconds,
                fits_h100=total <= 80 * 1e9 / GIB, fits_v5p=total <= 95 * 1e9 / GIB)


# name: (devices, data, fsdp, tensor, LoRA rank or 0 for full SFT, global batch)
LORA_MESHES = {"sft8": (8, 1, 1, 8, 0, 1), "lora8": (8, 1, 1, 8, 64, 1)}


def plan_lora(name: str):
    """The D-72B SFT step of `nvlm_jax.train.step` on 8 devices, full or LoRA (see module doc)."""
    devices, data, fsdp, tensor, rank, batch = LORA_MESHES[name]
    mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[:devices])
    cfg = C.nvlm_d_72b().replace(dtype="bfloat16", param_dtype="bfloat16" if rank else "float32",
                                 remat_policy="full", lora=C.LoraConfig(rank=rank, alpha=2.0 * rank))
    optimizer = optim.make_optimizer(optim.OptimConfig(mu_dtype="float32"))
    shapes = train_step.param_shapes(cfg)
    mask = freeze.trainable_mask(shapes, "D", "sft")
    _, state = train_step.train_state_shardings(cfg, optimizer, mask, mesh)
    fn = jax.jit(train_step.make_train_step(cfg, optimizer, mask), donate_argnums=0)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        compiled = fn.lower(state, abstract_batch(cfg, batch, mesh)).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes) / GIB
    trainable, _ = freeze.partition(shapes, mask)
    n, n_train = C.param_count(cfg), freeze.count_params(trainable)
    return dict(arch="D", mesh=name, devices=devices, shape=f"data={data} fsdp={fsdp} tensor={tensor}",
                batch=batch, seq=SEQ["D"], args=mem.argument_size_in_bytes / GIB, temp=mem.temp_size_in_bytes / GIB,
                total=total, trainable=n_train, params=n, compile_s=seconds, fits_h100=total <= 80 * 1e9 / GIB)


# name: (devices, weights, fits-in GB per device)
SERVE = {"bf16x8": (8, None, 80), "int8x1": (1, "int8", 141), "int8x2": (2, "int8", 80), "int4x1": (1, "int4", 80)}
SERVE_PROMPT, SERVE_NEW, SERVE_TILES = 3200, 512, 7
NO_LICM = "while-loop-invariant-code-motion"


class _Compiled(Exception):
    """Ends `generate` after its last program is compiled (nothing runs)."""


def plan_serve(name: str):
    """Per-device memory of each program `generate` compiles for one D-72B request (see module doc)."""
    import numpy as np

    from nvlm_jax import generate as gen
    from nvlm_jax.pretrained import choose_mesh

    devices, weights, fits_gb = SERVE[name]
    cfg = C.nvlm_d_72b().replace(dtype="bfloat16", param_dtype="bfloat16", quantize=weights)
    mesh = choose_mesh(cfg, devices)
    boxed = nvlm.abstract_params(cfg)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.meta.unbox(boxed), tree_shardings(boxed, mesh))
    image = SERVE_TILES * cfg.num_image_tokens
    ids = np.full((1, SERVE_PROMPT), 1, np.int32)
    ids[0, 100 : 100 + image] = cfg.image_context_token_id
    pixels = np.zeros((SERVE_TILES, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
    programs = {}

    def runner(jitted, *args, **static):
        lowered = jitted.lower(*args, **static)
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        no_licm = lowered.compile(compiler_options={"xla_disable_hlo_passes": NO_LICM}).memory_analysis()
        programs[jitted.__name__.lstrip("_")] = dict(
            args=mem.argument_size_in_bytes / GIB, temp=mem.temp_size_in_bytes / GIB,
            temp_no_licm=no_licm.temp_size_in_bytes / GIB,
            total=(no_licm.argument_size_in_bytes + no_licm.output_size_in_bytes + no_licm.temp_size_in_bytes
                   - no_licm.alias_size_in_bytes) / GIB)
        if jitted is gen._generate:
            raise _Compiled
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding),
                                      compiled.out_info)

    t0 = time.perf_counter()
    try:
        gen.generate(params, cfg, ids, pixels, max_new_tokens=SERVE_NEW, mesh=mesh, runner=runner)
    except _Compiled:
        pass
    peak = max(p["total"] for p in programs.values())
    return dict(name=name, devices=devices, shape=" x ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1)
                or "1 device", weights=weights or "bf16", params_gib=programs["generate"]["args"], programs=programs,
                peak=peak, fits_gb=fits_gb, fits=peak <= fits_gb * 1e9 / GIB, compile_s=time.perf_counter() - t0)


def _like(x, params, shardings, mesh):
    """Adam moments shard like their params; scalars (counts) replicate."""
    flat = {leaf.shape: s for leaf, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings),
                                             strict=True)}
    return flat.get(x.shape, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="D,X,H")
    parser.add_argument("--meshes", default=",".join(MESHES))
    parser.add_argument("--lora", default="", help="LoRA vs full SFT rows: sft8,lora8 ('' = none)")
    parser.add_argument("--serve", default="", help="generate rows: " + ",".join(SERVE) + " ('' = none)")
    args = parser.parse_args()
    if args.serve:
        print(f"D-72B generate: {SERVE_TILES}-tile image, {SERVE_PROMPT}-token prompt, {SERVE_NEW} new tokens, bf16 "
              "activations; GiB per device (args = params + inputs; temp = XLA temporaries)")
        print("run | weights | layout | params | ViT program args / temp / temp no LICM | prefill+decode args / temp "
              "/ temp no LICM | peak (no LICM) | fits")
        for name in args.serve.split(","):
            r = plan_serve(name)
            v, g = r["programs"]["encode_images"], r["programs"]["generate"]
            print(f"{r['name']} | {r['weights']} | {r['shape']} | {r['params_gib']:.1f} | "
                  f"{v['args']:.1f} / {v['temp']:.1f} / {v['temp_no_licm']:.1f} | "
                  f"{g['args']:.1f} / {g['temp']:.1f} / {g['temp_no_licm']:.1f} | {r['peak']:.1f} | "
                  f"{'yes' if r['fits'] else 'no'} ({r['fits_gb']} GB), compile {r['compile_s']:.0f} s", flush=True)
        if not args.meshes:
            return
    if args.lora:
        print("D-72B SFT step on 8 devices (nvlm_jax.train.step), GiB per device")
        print("run | layout | batch x seq | trainable params | args | temp | total (XLA) | compile s | fits 80 GB")
        for name in args.lora.split(","):
            r = plan_lora(name)
            print(f"{r['mesh']} | {r['shape']} | {r['batch']}x{r['seq']} | {r['trainable'] / 1e9:.3f} B | "
                  f"{r['args']:.1f} | {r['temp']:.1f} | {r['total']:.1f} | {r['compile_s']:.0f} | "
                  f"{'yes' if r['fits_h100'] else 'no'}", flush=True)
        if not args.meshes:
            return
    print(f"{time.strftime('%Y-%m-%d')}, CPU AOT compile on {jax.device_count()} simulated devices; GiB per device")
    print("arch | mesh | devices | layout | batch x seq | args | temp | total (XLA) | analytic params+state | "
          "compile s | fits 80 GB | fits 95 GB")
    for mesh_name in args.meshes.split(","):
        for arch in args.archs.split(","):
            r = plan(arch, mesh_name)
            print(f"{r['arch']} | {r['mesh']} | {r['devices']} | {r['shape']} | {r['batch']}x{r['seq']} | "
                  f"{r['args']:.1f} | {r['temp']:.1f} | {r['total']:.1f} | {r['analytic']:.1f} | "
                  f"{r['compile_s']:.0f} | {'yes' if r['fits_h100'] else 'no'} | {'yes' if r['fits_v5p'] else 'no'}",
                  flush=True)


if __name__ == "__main__":
    main()
