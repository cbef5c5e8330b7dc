"""Quality of int8 / int4 weights against the unquantized model, on a trained checkpoint.

For held-out synthetic examples of the checkpoint's tasks: teacher-forced top-1 agreement of the
next-token argmax over every position of prompt + answer (and over the positions where the
unquantized model's top-1 logit leads its second by more than 0.5), max / mean absolute logit error
(and the logit scale, for reference), greedy answers equal to the unquantized model's, and
held-out exact match. Run from the repo root, e.g. on the main job's workdir:

    python experiments/main_job.py --workdir=runs/main
    python bench/quantize_quality.py --checkpoint=runs/main [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvlm_jax  # noqa: E402
from nvlm_jax.data import synthetic  # noqa: E402


def batch(model, examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(input_ids [n, s], tiles [n, H, W, 3], valid [n, s])`: prompt + answer + <|im_end|> of
    each example, right-padded (a causal model's earlier positions do not see the padding)."""
    ids, tiles = [], []
    for ex in examples:
        inputs = model.prepare_chat([ex.image], ex.question)
        answer = model.tokenizer.encode(ex.answer + "<|im_end|>", add_special_tokens=False)
        ids.append(np.concatenate([np.asarray(inputs.input_ids).ravel(), np.asarray(getattr(answer, "ids", answer))]))
        tiles.append(np.asarray(inputs.pixel_values).reshape(-1, *np.shape(inputs.pixel_values)[-3:]))
    length = max(len(x) for x in ids)
    valid = np.asarray([[i < len(x) for i in range(length)] for x in ids])
    padded = np.asarray([np.pad(x, (0, length - len(x))) for x in ids], np.int32)
    return padded, np.concatenate(tiles), valid


def quality(checkpoint, tasks=("colour", "shape"), samples: int = 32, modes=("int8", "int4"),
            answers: bool = True, gptq_modes: Sequence[str] = (), gptq_samples: int = 64) -> dict:
    """The report (see module doc) of `checkpoint` over `samples` held-out examples per task;
    `answers=False` skips the greedy answers (teacher-forced figures only); `gptq_modes` adds
    those modes quantized by GPTQ (`nvlm_jax.quantize_gptq`, reported as "<mode>_gptq") on
    `gptq_samples` training examples per task."""
    base = nvlm_jax.load_pretrained(checkpoint, dtype="float32")
    examples = [ex for t in tasks for ex in synthetic.heldout_examples(t, samples)]
    ids, tiles, valid = batch(base, examples)
    ref = np.asarray(base.forward(ids, tiles))[valid]  # [positions, vocab]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5  # [positions]
    report = {"checkpoint": str(checkpoint), "examples": len(examples), "positions": int(valid.sum()),
              "positions_margin_over_0.5": int(clear.sum()), "logit_abs_max": float(np.abs(ref).max())}
    if answers:
        ref_answers = [base.chat([ex.image], ex.question, max_new_tokens=8) for ex in examples]
        report["float32"] = {"exact_match": float(np.mean([r == ex.answer
                                                           for r, ex in zip(ref_answers, examples, strict=True)]))}
    if gptq_modes:  # calibrated on training examples, never the held-out ones
        calibration = [batch(base, [ex])[:2] for t in tasks
                       for ex in synthetic.heldout_examples(t, gptq_samples, split="train")]
        report["gptq_calibration_examples"] = len(calibration)
    for name in [m for mode in modes for m in ((mode, mode + "_gptq") if mode in gptq_modes else (mode,))]:
        mode = name.removesuffix("_gptq")
        if name.endswith("_gptq"):
            start = time.perf_counter()
            model = nvlm_jax.quantize_gptq(base, calibration, mode)
            report[name] = {"calibration_s": round(time.perf_counter() - start, 1)}
        else:
            model = nvlm_jax.load_pretrained(checkpoint, dtype="float32", quantize=mode)
            report[name] = {}
        got = np.asarray(model.forward(ids, tiles))[valid]
        err = np.abs(got - ref)
        same = got.argmax(-1) == ref.argmax(-1)
        report[name] |= {"top1_agreement": float(same.mean()),
                        # where the float model's top-1 leads its top-2 by > 0.5: flips elsewhere are near-ties
                        "top1_agreement_margin_over_0.5": float(same[clear].mean()),
                        "logit_err_max": float(err.max()), "logit_err_mean": float(err.mean())}
        if answers:
            out = [model.chat([ex.image], ex.question, max_new_tokens=8) for ex in examples]
            report[name]["greedy_same_as_float"] = float(np.mean([x == y for x, y in zip(out, ref_answers,
                                                                                          strict=True)]))
            report[name]["exact_match"] = float(np.mean([x == ex.answer for x, ex in zip(out, examples,
                                                                                          strict=True)]))
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", default="colour,shape")
    p.add_argument("--samples", type=int, default=32, help="held-out examples per task")
    p.add_argument("--gptq", action="store_true", help="also GPTQ-quantized models (int8_gptq, int4_gptq)")
    p.add_argument("--gptq_samples", type=int, default=64, help="GPTQ calibration (training) examples per task")
    a = p.parse_args()
    print(json.dumps(quality(a.checkpoint, a.tasks.split(","), a.samples, gptq_modes=("int8", "int4") if a.gptq else (),
                             gptq_samples=a.gptq_samples), indent=1))


if __name__ == "__main__":
    main()
