"""Streaming copies: which contiguous byte runs a strided block of a tensor is read as."""

import numpy as np

from nvlm_jax.checkpoint import copying


def test_storage_runs_read_a_column_block_row_by_row():
    base = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    view = base.T[2:5, 1:4]  # kernel = weight.T: a block of columns 1..3 over rows 2..4 of the weight
    order, starts, run_bytes = copying._storage_runs(view, base)
    assert order == (1, 0) and run_bytes == 3 * 4
    np.testing.assert_array_equal(starts, [(r * 8 + 2) * 4 for r in (1, 2, 3)])
