"""Pixel shuffle index maps and the projector against PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nvlm_jax import config as C
from nvlm_jax.models.projector import Projector, pixel_shuffle
from nvlm_jax.weight_map import params_from_tensors
from tests import torch_reference as ref


def test_v2_matches_the_release_view_permute_sequence():
    x = np.random.default_rng(0).standard_normal((2, 64, 5)).astype(np.float32)
    want = ref.torch_pixel_shuffle_v2(torch.from_numpy(x).reshape(2, 8, 8, 5)).reshape(2, 16, 20)
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 2, "v2")), want.numpy())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_closed_form_index_map(version):
    g, c = 8, 3
    grid = np.arange(g * g * c, dtype=np.float32).reshape(1, g, g, c)
    out = np.asarray(pixel_shuffle(jnp.asarray(grid.reshape(1, g * g, c)), 2, version))
    for i in range(g // 2):
        for j in range(g // 2):
            t = (g // 2) * i + j if version == "v2" else (g // 2) * j + i
            for r in range(2):
                for cc in range(2):
                    block = out[0, t, (2 * r + cc) * c:(2 * r + cc + 1) * c]
                    np.testing.assert_array_equal(block, grid[0, 2 * i + r, 2 * j + cc])


def test_non_square_token_count_is_an_error():
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(jnp.zeros((1, 10, 4)))


def test_two_layer_projector_matches_torch_mlp1():
    cfg = C.ProjectorConfig(input_size=32, hidden_size=48, output_size=16, num_layers=2)
    torch_proj = ref.TorchProjector(cfg, seed=2)
    tensors = ref.state_numpy(torch_proj)
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    shapes = {"projector": {"norm": {"scale": sd(32), "bias": sd(32)}, "fc1": {"kernel": sd(32, 48)},
                            "fc2": {"kernel": sd(48, 16)}}}
    params = params_from_tensors(tensors, C.tiny("D"), "nvlm", shapes, subtree=("projector",))
    x = np.random.default_rng(1).standard_normal((3, 5, 32)).astype(np.float32)
    with torch.no_grad():
        want = torch_proj.mlp1(torch.from_numpy(x)).numpy()
    got = Projector(cfg).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_one_layer_projector_is_a_single_linear():
    cfg = C.ProjectorConfig(input_size=32, hidden_size=48, output_size=16, num_layers=1)
    params = Projector(cfg).init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
    assert set(params) == {"fc"} and params["fc"]["kernel"].value.shape == (32, 16)
