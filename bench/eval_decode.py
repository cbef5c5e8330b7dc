"""In-training held-out evaluation of the main job: the former decoder (one full training
forward per new token, no KV cache) vs the KV-cache decoder (`nvlm_jax.generate`), same run.

Builds the main job's run (`experiments/configs/tiny.py`: both tasks, colour and shape, 100
held-out samples each, eval batch 48), trains the tiny model for `--train_steps` steps (0 = random
init) so its answers look like the main job's, then times one whole evaluator call (greedy
answers + teacher-forced held-out loss, every batch of every task) on each path: one warm-up
call each (compilation included: "first call"; "compile" = first call - median), then `--repeats` interleaved timed
calls (median and range). The former path is a copy of the former code (`_old_*` below); it
decoded each batch for its own longest reference answer. Checks that both paths give the same
answers: every row's tokens up to its stop token equal token for token (the former path run
once more with the evaluator's `max_new_tokens`) and the same exact-match metrics.

    python bench/eval_decode.py [--arch D] [--train_steps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import tiny  # noqa: E402
from nvlm_jax import batch_decode  # noqa: E402
from nvlm_jax import generate as gen  # noqa: E402
from nvlm_jax.models import nvlm  # noqa: E402
from nvlm_jax.train import evaluate, launch, multihost  # noqa: E402

# ---- the former decoder (nvlm_jax/train/evaluate.py before the KV-cache decoder) ----------------


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def full_forward_greedy(params, batch, start, *, cfg, max_new_tokens):
    ids = batch["input_ids"]
    b, s = ids.shape
    rows = jnp.arange(b)

    def body(j, carry):
        ids, out = carry
        logits = nvlm.apply_batch(params, cfg, dict(batch, input_ids=ids))  # [B, S, V]
        pos = jnp.clip(start + j, 0, s - 1)
        step_logits = logits[rows, pos].at[:, cfg.image_context_token_id].set(-jnp.inf)
        tok = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
        out = out.at[:, j].set(tok)
        nxt = jnp.clip(pos + 1, 0, s - 1)
        ids = ids.at[rows, nxt].set(jnp.where(pos + 1 < s, tok, ids[rows, nxt]))
        return ids, out

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    _, out = jax.lax.fori_loop(0, max_new_tokens, body, (ids, out))
    return out


def full_forward_batch(batch, starts, max_new_tokens):
    out = {k: np.array(v) for k, v in batch.items()}
    b, s = out["input_ids"].shape
    idx = np.arange(s)[None, :]
    end = np.minimum(starts[:, None] + max_new_tokens + 1, s)
    real = np.asarray(batch["segment_ids"]) > 0
    keep = real.any(axis=1, keepdims=True)
    out["segment_ids"] = np.where(keep & ((idx < end) | real), 1, 0).astype(np.int32)
    out["positions"] = np.broadcast_to(idx, (b, s)).astype(np.int32).copy()
    after = idx > starts[:, None]
    last_image = np.take_along_axis(out["token_image"], starts[:, None].astype(np.int64), axis=1)
    out["token_image"] = np.where(after, last_image, out["token_image"]).astype(np.int32)
    out["token_tile"] = np.where(after, -1, out["token_tile"]).astype(np.int32)
    return out


def _old_tokens(params, cfg, batch, max_new=None):
    starts, lengths = evaluate.answer_spans(batch)
    max_new = int(max_new or lengths.max())
    batch = full_forward_batch(batch, starts, max_new)
    return multihost.to_host(multihost.synced_call(full_forward_greedy, params, batch, starts, cfg=cfg,
                                                   max_new_tokens=max_new))


def old_evaluate(ev: evaluate.ExactMatchEvaluator, params, max_new=None) -> tuple[dict, dict]:
    """The former `ExactMatchEvaluator.__call__`: (metrics, {task: [answer tokens per row]})."""
    metrics, answers = {}, {}
    loss_sum = count = 0.0
    for task, batches in ev.batches.items():
        correct, answers[task] = [], []
        for batch in batches:
            starts, lengths = evaluate.answer_spans(batch)
            tokens = _old_tokens(params, ev.cfg, batch, max_new)
            for r in np.flatnonzero(lengths > 0):
                pred, stopped = gen.cut_at_stop(tokens[r], ev.stop_ids)
                ref, _ = gen.cut_at_stop(batch["targets"][r, starts[r]: starts[r] + lengths[r]], ev.stop_ids)
                pred_text, ref_text = ev.decode(pred.tolist()).strip(), ev.decode(ref.tolist()).strip()
                correct.append(stopped and pred_text == ref_text)
                answers[task].append((pred.tolist(), stopped))
            stats = multihost.to_host(multihost.synced_call(evaluate._heldout_stats, params, batch, cfg=ev.cfg))
            loss_sum += float(stats.loss_sum)
            count += float(stats.count)
        metrics[f"exact_match/{task}"] = float(np.mean(correct)) if correct else 0.0
    metrics["exact_match"] = float(np.mean([metrics[f"exact_match/{t}"] for t in ev.batches]))
    metrics["loss"] = loss_sum / max(count, 1.0)
    return metrics, answers


def new_answers(ev: evaluate.ExactMatchEvaluator, params) -> dict:
    """{task: [(answer tokens, stopped) per row]} of the KV-cache path (the evaluator's settings)."""
    out = {}
    for task, batches in ev.batches.items():
        out[task] = []
        for batch in batches:
            _, lengths = evaluate.answer_spans(batch)
            tokens = batch_decode.greedy_batch(params, ev.cfg, batch, ev.max_new_tokens, stop_token_ids=ev.stop_ids,
                                      prompt_bucket=ev.prompt_bucket)
            for r in np.flatnonzero(lengths > 0):
                pred, stopped = gen.cut_at_stop(tokens[r], ev.stop_ids)
                out[task].append((pred.tolist(), stopped))
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    return dict(cpu=model or platform.processor(), cores=os.cpu_count(), avx512_bf16="avx512_bf16" in flags,
                amx_bf16="amx_bf16" in flags, jax=jax.__version__, backend=jax.default_backend())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="D", choices=["D", "X", "H"])
    ap.add_argument("--train_steps", type=int, default=200, help="steps of the main job's training first (0: random)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    c = tiny.get_config(args.arch)
    c.peak_flops_per_device = 1e11  # skip the matmul measurement
    c.checkpoint.async_save = False
    run = launch.prepare(c)  # the main job's evaluator: 100 held-out samples per task
    ev = run.evaluator
    rows = {t: sum(int((b["loss_mask"].sum(1) > 0).sum()) for b in bs) for t, bs in ev.batches.items()}
    shapes = {t: [tuple(b["input_ids"].shape) for b in bs] for t, bs in ev.batches.items()}
    print(f"held-out rows per task {rows}, batches {shapes}, max_new_tokens {ev.max_new_tokens}, "
          f"prompt width {ev.prompt_bucket}", flush=True)

    with tempfile.TemporaryDirectory(prefix="eval_decode_") as workdir:
        if args.train_steps:
            c.num_steps = args.train_steps
            c.checkpoint.every = args.train_steps
            tick = time.perf_counter()
            result = launch.train(c, workdir, console=False, run=dataclasses.replace(run, evaluator=None))
            params = result.state.params
            print(f"trained {args.train_steps} steps in {time.perf_counter() - tick:.0f} s", flush=True)
        else:
            params = nvlm.init_params(run.model, jax.random.key(c.seed))
        params = jax.block_until_ready(params)

        # The teacher-forced held-out loss is common to both paths: compile it before either first call.
        jax.block_until_ready(evaluate._heldout_stats(params, next(iter(ev.batches.values()))[0], cfg=ev.cfg))
        first_old = _timed(lambda: old_evaluate(ev, params))
        first_new = _timed(lambda: ev(params, 0))
        programs = gen._generate._cache_size()
        old_s, new_s = [], []
        for _ in range(args.repeats):
            old_s.append(_timed(lambda: old_evaluate(ev, params)))
            new_s.append(_timed(lambda: ev(params, 0)))
        assert gen._generate._cache_size() == programs, "the KV-cache path recompiled between calls"

        old_metrics, _ = old_evaluate(ev, params)
        new_metrics = ev(params, 0)
        _, old_same_budget = old_evaluate(ev, params, max_new=ev.max_new_tokens)
        new_tokens = new_answers(ev, params)
    same_tokens = old_same_budget == new_tokens
    diff = {t: sum(a != b for a, b in zip(old_same_budget[t], new_tokens[t], strict=True)) for t in new_tokens}

    def summary(first, xs):
        median = statistics.median(xs)
        return dict(first_call_s=round(first, 2), compile_s=round(first - median, 2), median_s=round(median, 3),
                    min_s=round(min(xs), 3), max_s=round(max(xs), 3))

    out = dict(
        bench="eval_decode", date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=_machine(), arch=args.arch, train_steps=args.train_steps, repeats=args.repeats,
        heldout_rows=rows, eval_batch=c.eval.batch_size, seq_len=c.data.seq_len, max_new_tokens=ev.max_new_tokens,
        full_forward=summary(first_old, old_s),
        kv_cache=dict(**summary(first_new, new_s), generate_programs=programs),
        speedup=round(statistics.median(old_s) / statistics.median(new_s), 2),
        same_answer_tokens=same_tokens, rows_differing=diff,
        metrics_full_forward=old_metrics, metrics_kv_cache=new_metrics,
    )
    print(json.dumps(out, indent=1))
    if not same_tokens or old_metrics != new_metrics:
        sys.exit("the two decoders disagree")


if __name__ == "__main__":
    main()
