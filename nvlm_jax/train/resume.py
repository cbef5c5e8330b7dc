"""What a resumed run must agree on with the run that saved the checkpoint.

A run resumes exactly (same batches, same numbers) only if everything that shapes the data, the
model, the optimiser and the trained subset is what it was. The run config is saved with every
checkpoint; on resume `config_changes` compares it with the current one, key by key, and the
loop refuses a resume that changed anything outside `FREE_TO_CHANGE` (listing every change),
unless the run says the change is deliberate (`allow_resume_changes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Dotted keys (or prefixes ending in ".") that do not change what is trained on or how:
# logging, evaluation, checkpoint cadence, the total length, throughput settings, the mesh
# (a checkpoint restores onto any mesh) and the init checkpoint (only read by fresh runs).
FREE_TO_CHANGE = (
    "num_steps", "log_every", "max_nonfinite", "peak_flops_per_device", "compilation_cache_dir",
    "allow_resume_changes", "eval.", "checkpoint.", "mesh.", "init.", "data.num_workers", "data.read_threads",
    "data.eval_size", "optim.total_steps",
    # Derived from data.* and model, which are compared; checkpoints from before it was saved lack it.
    "prompt_format.",
    # A LoRA run's frozen-base record (`nvlm_jax.checkpoint.frozen_base`): checked on its own,
    # by re-creating the base and comparing fingerprints.
    "frozen_base.",
)


class ResumeConfigError(ValueError):
    """The run config changed in ways that break exact resumption."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    if isinstance(tree, list | tuple):
        return {prefix[:-1]: [_flatten(v) if isinstance(v, Mapping) else v for v in tree]}
    return {prefix[:-1]: tree}


def _free(key: str) -> bool:
    return any(key.startswith(f) if f.endswith(".") else key == f for f in FREE_TO_CHANGE)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable changes `key: saved -> current` that break exact resumption (sorted).

    A key present on one side only counts as a change, except that a key the saved config
    lacks and the current one sets to its default cannot be told apart: keys added to the
    configs after a checkpoint was written are reported, so the user decides."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if _free(key):
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            changes.append(f"{key}: {_show(a)} -> {_show(b)}")
    return changes


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: str, allow: bool) -> list[str]:
    """Raises `ResumeConfigError` listing the changes unless `allow`; returns the changes."""
    changes = config_changes(saved, current)
    if changes and not allow:
        raise ResumeConfigError(
            f"{where}: the run config changed since this checkpoint was saved, so the run would not resume "
            f"exactly: {'; '.join(changes)}. Restore the saved values, use a new workdir, or set "
            "allow_resume_changes=True (--config.allow_resume_changes=True) to resume anyway")
    return changes
