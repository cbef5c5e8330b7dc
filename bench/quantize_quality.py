"""Quality of int8 / int4 weights against the unquantized model, on a trained checkpoint.

For held-out synthetic examples of the checkpoint's tasks: teacher-forced top-1 agreement of the
next-token argmax over every position of prompt + answer, max / mean absolute logit error
(and the logit scale, for reference), greedy answers equal to the unquantized model's, and
held-out exact match. Run from the repo root, e.g. on the main job's workdir:

    python experiments/main_job.py --workdir=runs/main
    python bench/quantize_quality.py --checkpoint=runs/main [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvlm_jax  # noqa: E402
from nvlm_jax.data import synthetic  # noqa: E402


def rows(model, examples):
    """(input_ids [1, s], pixels) of prompt + answer + <|im_end|> for each example."""
    out = []
    for ex in examples:
        inputs = model.prepare_chat([ex.image], ex.question)
        answer = model.tokenizer.encode(ex.answer + "<|im_end|>", add_special_tokens=False)
        answer = np.asarray(getattr(answer, "ids", answer)).reshape(1, -1)
        ids = np.concatenate([np.asarray(inputs.input_ids).reshape(1, -1), answer], axis=1)
        out.append((ids, inputs.pixel_values))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", default="colour,shape")
    p.add_argument("--samples", type=int, default=32, help="held-out examples per task")
    a = p.parse_args()
    base = nvlm_jax.load_pretrained(a.checkpoint, dtype="float32")
    examples = [ex for t in a.tasks.split(",") for ex in synthetic.heldout_examples(t, a.samples)]
    data = rows(base, examples)
    ref = [np.asarray(base.forward(ids, px))[0] for ids, px in data]
    ref_answers = [base.chat([ex.image], ex.question, max_new_tokens=8) for ex in examples]
    report = {"checkpoint": a.checkpoint, "examples": len(examples),
              "positions": int(sum(r.shape[0] for r in ref)),
              "float32": {"exact_match": float(np.mean([r == ex.answer
                                                        for r, ex in zip(ref_answers, examples, strict=True)]))},
              "logit_abs_max": float(max(np.abs(r).max() for r in ref))}
    for mode in ("int8", "int4"):
        model = nvlm_jax.load_pretrained(a.checkpoint, dtype="float32", quantize=mode)
        got = [np.asarray(model.forward(ids, px))[0] for ids, px in data]
        agree = np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref, strict=True)])
        err = np.concatenate([np.abs(g - r).ravel() for g, r in zip(got, ref, strict=True)])
        answers = [model.chat([ex.image], ex.question, max_new_tokens=8) for ex in examples]
        report[mode] = {
            "top1_agreement": float(agree.mean()), "logit_err_max": float(err.max()),
            "logit_err_mean": float(err.mean()),
            "greedy_same_as_float": float(np.mean([x == y for x, y in zip(answers, ref_answers, strict=True)])),
            "exact_match": float(np.mean([x == ex.answer for x, ex in zip(answers, examples, strict=True)])),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
