"""Pallas kernels and their pure-JAX oracles (DESIGN.md §3).

- `kernels.tile_attention`: `tile_attention(q, k, v, mask, scale=...)`, masked GQA flash
  attention (forward + custom-VJP backward) over a `MaskSpec`, with `unsupported_reason`.
- `kernels.masks`: packed mask ids, the element predicate `visible`, block maps and block lists.
- `kernels.reference`: `attention_reference`, the dense-mask float32 oracle.
"""
