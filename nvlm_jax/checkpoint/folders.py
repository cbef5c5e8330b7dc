"""Which kind of checkpoint a path is: the one place that decides.

Four kinds are recognised (every loader, CLI and the training launcher's init go through
`locate`):

    hf          a Hugging Face NVLM-D release-layout folder: config.json + *.safetensors
                [+ model.safetensors.index.json] + tokenizer files
    converted   a folder written by `nvlm_jax.convert`: nvlm_config.json + params/ (Orbax)
                + tokenizer files
    workdir     a training workdir: checkpoints/<step>/{state,config} (Orbax CheckpointManager);
                one step is chosen: the latest complete one, the best by the run's keep-best
                metric, or a given number
    step        one training checkpoint folder `checkpoints/<step>` (state/ + config/)

Anything else is a ValueError that names the path and lists what was looked for; a path that
does not exist is a `CheckpointNotFoundError` (both a FileNotFoundError and a ValueError).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from nvlm_jax.checkpoint.paths import as_path

HF_CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
OUR_CONFIG_FILE = "nvlm_config.json"
PARAMS_DIR = "params"
FORMAT = "nvlm_jax.orbax"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
)
CHECKPOINTS_DIR = "checkpoints"  # <workdir>/checkpoints/<step>/
STATE_ITEM = "state"  # the TrainState (params under "params")
RUN_CONFIG_ITEM = "config"  # the run config (JSON)
ORBAX_METADATA_FILE = "_CHECKPOINT_METADATA"
KINDS = ("hf", "converted", "workdir", "step")

Step = int | str  # "latest", "best" or a step number


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A checkpoint path that does not exist (or a step that is not there)."""


@dataclasses.dataclass(frozen=True)
class Located:
    """What `locate` found.

    Attributes:
      kind: "hf", "converted", "workdir" or "step" (see the module docstring).
      path: the path as given (an epath).
      root: the model folder (hf / converted), the training workdir (workdir, and step when its
        parent is a `checkpoints/` folder), else None.
      step_dir: the chosen training checkpoint `checkpoints/<step>` (workdir / step), else None.
      step: its step number (None for hf / converted).
    """

    kind: str
    path: epath.Path
    root: epath.Path | None = None
    step_dir: epath.Path | None = None
    step: int | None = None

    @property
    def is_training(self) -> bool:
        return self.kind in ("workdir", "step")

    @property
    def params_dir(self) -> epath.Path | None:
        """The Orbax folder holding the params (a TrainState for training checkpoints, params
        under "params"); None for a Hugging Face folder."""
        if self.kind == "converted":
            return self.root / PARAMS_DIR
        if self.is_training:
            return self.step_dir / STATE_ITEM
        return None

    def describe(self) -> str:
        """E.g. "training workdir, step 20" or "converted folder"."""
        what = {"hf": "Hugging Face folder", "converted": "converted folder", "workdir": "training workdir",
                "step": "training checkpoint"}[self.kind]
        return f"{what}, step {self.step}" if self.step is not None else what


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's contents (ValueError naming the file when it is unreadable)."""
    try:
        return json.loads(as_path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read JSON {path}: {e}") from e


def is_converted(path: str | os.PathLike) -> bool:
    p = as_path(path)
    return (p / OUR_CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir()


def is_step_dir(path: str | os.PathLike) -> bool:
    p = as_path(path)
    return (p / STATE_ITEM).is_dir() and (p / RUN_CONFIG_ITEM).is_dir()


def has_tokenizer(folder: str | os.PathLike) -> bool:
    p = as_path(folder)
    return (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()


def training_steps(workdir: str | os.PathLike) -> list[int]:
    """The complete training checkpoints of `workdir`, ascending. Orbax saves into a temporary
    name and renames it to the bare step number when every item is written, so a digit-named
    folder with a state is complete (set-aside `<step>.unusable` folders are not digits)."""
    root = as_path(workdir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and (d / STATE_ITEM).is_dir())


def read_run_config(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The run config saved with a training checkpoint (`<step>/config`, Orbax's JSON item)."""
    path = as_path(step_dir) / RUN_CONFIG_ITEM / "metadata"  # Orbax's JSON item file
    if not path.is_file():
        raise ValueError(f"{path.parent}: no saved run config")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the saved run config is a {type(data).__name__}, not a JSON object")
    return data


def step_metrics(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The keep-best metrics saved with a training checkpoint (empty when none were)."""
    path = as_path(step_dir) / ORBAX_METADATA_FILE
    if not path.is_file():
        return {}
    try:
        meta = read_json(path)
    except ValueError:
        return {}
    custom = meta.get("custom_metadata") or {}
    return dict(custom.get("metrics") or meta.get("metrics") or {})


def best_step(workdir: str | os.PathLike, steps: list[int] | None = None) -> int:
    """The step with the best keep-best metric (the run config's `checkpoint.best_metric` and
    `best_mode`); ValueError naming the workdir when no checkpoint has that metric."""
    workdir = as_path(workdir)
    steps = training_steps(workdir) if steps is None else steps
    if not steps:
        raise CheckpointNotFoundError(f"{workdir}: no complete training checkpoint under {CHECKPOINTS_DIR}/")
    run = read_run_config(workdir / CHECKPOINTS_DIR / str(steps[-1])).get("checkpoint") or {}
    metric, mode = run.get("best_metric", "eval/exact_match"), run.get("best_mode", "max")
    scored = {}
    for s in steps:
        value = step_metrics(workdir / CHECKPOINTS_DIR / str(s)).get(metric)
        if value is not None:
            scored[s] = float(value)
    if not scored:
        raise ValueError(f"{workdir}: no checkpoint of steps {steps} was saved with the keep-best metric {metric!r} "
                         "(checkpoint.keep_best = 0, or no evaluation ran); ask for 'latest' or a step number")
    pick = max if mode == "max" else min
    return pick(scored, key=lambda s: (scored[s], s))


def _choose_step(workdir: epath.Path, step: Step) -> int:
    steps = training_steps(workdir)
    if not steps:
        raise CheckpointNotFoundError(f"{workdir}: no complete training checkpoint under {CHECKPOINTS_DIR}/ "
                                      "(expected <step>/state and <step>/config folders)")
    if step == "latest":
        return steps[-1]
    if step == "best":
        return best_step(workdir, steps)
    if isinstance(step, int) and not isinstance(step, bool):
        if step not in steps:
            raise CheckpointNotFoundError(f"{workdir}: no complete checkpoint for step {step}; steps: {steps}")
        return step
    raise ValueError(f"step must be 'latest', 'best' or a step number, got {step!r}")


def parse_step(text: str | int) -> Step:
    """A step as given on a command line: "latest", "best" or a number."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("latest", "best"):
        return t
    if t.isdigit():
        return int(t)
    raise ValueError(f"step must be 'latest', 'best' or a step number, got {text!r}")


def locate(path: str | os.PathLike, step: Step = "latest") -> Located:
    """Which checkpoint `path` is (see the module docstring) and, for a training workdir, which
    step `step` ("latest", "best" or a number) picks. `step` other than "latest" only applies
    to training workdirs (and to a step folder whose number it is)."""
    p = as_path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: checkpoint path does not exist")
    if not p.is_dir():
        raise ValueError(f"{p}: a checkpoint is a folder, this is a file")
    if is_converted(p):
        located = Located("converted", p, root=p)
    elif (p / HF_CONFIG_FILE).is_file():
        located = Located("hf", p, root=p)
    elif is_step_dir(p):
        number = int(p.name) if p.name.isdigit() else None
        root = p.parent.parent if p.parent.name == CHECKPOINTS_DIR else None
        if step not in ("latest", number):
            raise ValueError(f"{p}: a single training checkpoint (step {number}); cannot pick step {step!r} from it, "
                             "pass its workdir instead")
        located = Located("step", p, root=root, step_dir=p, step=number)
    elif (p / CHECKPOINTS_DIR).is_dir():
        number = _choose_step(p, step)
        return Located("workdir", p, root=p, step_dir=p / CHECKPOINTS_DIR / str(number), step=number)
    else:
        raise ValueError(
            f"{p}: not a checkpoint: expected a Hugging Face folder ({HF_CONFIG_FILE} + *.safetensors), a converted "
            f"folder ({OUR_CONFIG_FILE} + {PARAMS_DIR}/), a training workdir ({CHECKPOINTS_DIR}/<step>/) or a "
            f"training checkpoint folder (<step>/{STATE_ITEM} + <step>/{RUN_CONFIG_ITEM})")
    if step != "latest" and located.kind in ("hf", "converted"):
        raise ValueError(f"{p}: step {step!r} applies to training workdirs only, this is a {located.describe()}")
    return located
