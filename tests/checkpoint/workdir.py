"""Cheap training workdirs for checkpoint tests: a tiny model's random params saved with
`TrainCheckpoints` exactly as the training loop saves them (no training, no compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvlm_jax import config as C
from nvlm_jax.data.pipeline import config_for_tokenizer
from nvlm_jax.processing.tokenizer import build_tiny_backend
from nvlm_jax.train.checkpoint import CheckpointConfig, TrainCheckpoints
from nvlm_jax.train.step import TrainState, param_shapes


def tiny_model(arch: str = "D"):
    """(config, random params, tokenizer) of the tiny model with the built-in tiny tokenizer."""
    tok = build_tiny_backend()
    cfg = config_for_tokenizer(C.tiny(arch), tok)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), param_shapes(cfg))
    return cfg, params, tok


def params_at(params, step: int):
    """The params of checkpoint `step` (each step's differ by the step number)."""
    return jax.tree_util.tree_map(lambda x: x + np.asarray(step, x.dtype), params)


def write_workdir(workdir, cfg, params, steps=((5, None),), *, prompt_format=None, data=None):
    """Saves `params_at(params, step)` for each `(step, keep-best metric or None)` under
    `workdir/checkpoints/` with a run config like `launch.train`'s; returns the run config."""
    run_config = {"tokenizer": "tiny", "init": {"checkpoint": ""}, "model": cfg.to_dict(),
                  "checkpoint": {"best_metric": "eval/exact_match", "best_mode": "max"}, "data": data or {}}
    if prompt_format is not None:
        run_config["prompt_format"] = prompt_format.to_dict()
    ckpts = TrainCheckpoints(workdir / "checkpoints", CheckpointConfig(every=1, keep=10, keep_best=0,
                                                                       async_save=False))
    for step, metric in steps:
        state = TrainState(step=jnp.int32(step), applied=jnp.int32(step), params=params_at(params, step),
                           opt_state=optax.EmptyState(), nonfinite_run=jnp.int32(0), nonfinite_total=jnp.int32(0))
        ckpts.save(step, state, None, run_config, metrics=None if metric is None else {"eval/exact_match": metric})
    ckpts.close()
    return run_config
