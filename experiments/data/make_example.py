"""Writes the tiny example dataset of README's "Fine-tune on your own data" (already shipped):
eight 28-px PNG images (`images/`), `train.jsonl` (LLaVA records about them, plus two text-only
ones) and `eval.jsonl` (a held-out phrasing of the question).

    python experiments/data/make_example.py [--out_dir=experiments/data]

The images are a coloured square on a grey background; the answer is the square's colour.
Any of the record formats in `nvlm_jax/data/formats.py` would do as well (e.g. OpenAI/HF chat
`messages` with `{"type": "image"}` parts).
"""

import argparse
import json
import os

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (130, 50, 170), "orange": (240, 130, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
TRAIN_QUESTIONS = ("What colour is the square?", "Name the colour of the square.")
EVAL_QUESTION = "Which colour does the square have?"
SIZE = 28  # the tiny model's tile: one tile per image, no thumbnail


def _image(rgb: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((6, 6, SIZE - 7, SIZE - 7), fill=rgb)
    return image


def _record(path: str, question: str, answer: str) -> dict:
    return {"image": path, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                             {"from": "gpt", "value": answer}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    out = parser.parse_args().out_dir
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train, held_out = [], []
    for name, rgb in COLOURS.items():
        path = f"images/{name}.png"
        _image(rgb).save(os.path.join(out, path), optimize=True)
        train += [_record(path, q, name) for q in TRAIN_QUESTIONS]
        held_out.append(_record(path, EVAL_QUESTION, name))
    train += [{"conversations": [{"from": "human", "value": "How many colours are in the example set?"},
                                 {"from": "gpt", "value": str(len(COLOURS))}]},
              {"conversations": [{"from": "human", "value": "What is the background colour?"},
                                 {"from": "gpt", "value": "grey"}]}]
    for filename, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(os.path.join(out, filename), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {len(COLOURS)} images, {len(train)} training and {len(held_out)} held-out records to {out}")


if __name__ == "__main__":
    main()
