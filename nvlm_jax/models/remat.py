"""Rematerialisation policies by name, as configured (`NVLMConfig.remat_policy`)."""

from __future__ import annotations

import jax

_POLICIES = {
    # Save nothing: recompute the whole layer in the backward pass (least memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Save matmul outputs without batch dims (weights-stationary dots); recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
    """The `jax.checkpoint` policy for `name` ("full" or "dots")."""
    if name not in _POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(_POLICIES)} or 'none'")
    return _POLICIES[name]
