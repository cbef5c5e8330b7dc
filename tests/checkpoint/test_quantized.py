"""Quantized loading and conversion: HF folders quantized while streaming, converted folders
stored quantized (loaded without re-quantizing), unquantized Orbax params quantized on device."""

import jax
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax import convert
from nvlm_jax.checkpoint import quantized
from nvlm_jax.models import quantize
from tests import hf_checkpoint as hc

PIXELS = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)


def _ids(cfg):
    return hc.prompt_ids(cfg, [1])[None]


def _leaves(params):
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


@pytest.fixture(scope="module")
def float_model(release):
    return nvlm_jax.load_pretrained(release.folder, dtype="float32")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_hf_folder_loads_quantized_close_to_the_float_model(release, float_model, mode):
    model = nvlm_jax.load_pretrained(release.folder, dtype="float32", quantize=mode)
    assert model.config.quantize == mode
    leaves = _leaves(model.params)
    assert not any(k.endswith("/kernel") for k in leaves if "patch" not in k)
    assert leaves["llm/lm_head/kernel_q"].dtype == quantize.qdtype(mode)
    ids = _ids(model.config)
    ref = np.asarray(float_model.forward(ids, PIXELS))
    got = np.asarray(model.forward(ids, PIXELS))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < (0.05 if mode == "int8" else 0.6), err  # random weights: a sanity bound
    # Quantizing the float params on device gives the same model (up to rounding ties).
    _, on_device = quantized.quantize_params(jax.tree_util.tree_map(lambda x: x.copy(), float_model.params),
                                             float_model.config, mode)
    dev = _leaves(on_device)
    assert dev.keys() == leaves.keys()
    for k, v in leaves.items():
        if k.endswith("kernel_q"):
            assert np.abs(dev[k].astype(np.int32) - v.astype(np.int32)).max() <= 1
            # only rounding ties differ: at most the absmax value of each scale tile
            assert (dev[k] != v).sum() <= leaves[k.replace("kernel_q", "kernel_scale")].size, k
        else:
            np.testing.assert_allclose(dev[k], v, rtol=3e-7, err_msg=k)


def test_converted_quantized_folder_loads_without_requantizing(release, tmp_path):
    out = convert.convert(release.folder, tmp_path / "int8", dtype="float32", quantize="int8", progress=False)
    model = nvlm_jax.load_pretrained(out, dtype="float32")
    assert model.config.quantize == "int8"
    direct = nvlm_jax.load_pretrained(release.folder, dtype="float32", quantize="int8")
    a, b = _leaves(model.params), _leaves(direct.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert nvlm_jax.load_pretrained(out, dtype="float32", quantize="int8").config.quantize == "int8"
    with pytest.raises(ValueError, match="stored quantized as int8; they cannot be re-quantized to int4"):
        nvlm_jax.load_pretrained(out, quantize="int4")


def test_unquantized_orbax_folder_is_quantized_on_load(float_model):
    model = nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32", quantize="int4")
    assert model.config.quantize == "int4"
    ids = _ids(model.config)
    ref = np.asarray(float_model.forward(ids, PIXELS))
    got = np.asarray(model.forward(ids, PIXELS))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.6


def test_host_quantizer_in_chunks_equals_one_piece(monkeypatch):
    w = np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32)
    for mode, scale_shape in (("int8", (1, 96)), ("int4", (2, 96))):
        whole = quantized.quantize_host(w, scale_shape, mode)
        monkeypatch.setattr(quantized, "CHUNK_BYTES", 256 * 4 * 5)  # 5 columns of f32 per chunk
        chunked = quantized.quantize_host(w, scale_shape, mode)
        monkeypatch.undo()
        np.testing.assert_array_equal(whole[0].astype(np.int8), chunked[0].astype(np.int8))
        np.testing.assert_array_equal(whole[1], chunked[1])


def test_unknown_mode_is_an_error(release):
    with pytest.raises(ValueError, match="quantize must be one of"):
        nvlm_jax.load_pretrained(release.folder, quantize="fp8")


def test_an_in_major_kernel_q_is_refused_with_the_reason(tmp_path):
    import orbax.checkpoint as ocp

    from nvlm_jax.checkpoint.restore import restore_params

    with ocp.StandardCheckpointer() as ckptr:  # the layout `convert --quantize` wrote before out-major
        ckptr.save(tmp_path / "params", {"llm": {"lm_head": {"kernel_q": np.ones((16, 40), np.int8)}}})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"llm": {"lm_head": {"kernel_q": jax.ShapeDtypeStruct((40, 16), np.int8, sharding=device)}}}
    with pytest.raises(ValueError, match=r"kernel_q: checkpoint shape \(16, 40\) != expected \(40, 16\) "
                                         r"\(quantized weights stored in-major"):
        restore_params(tmp_path / "params", target)
