"""Continuous batching: requests that join while others decode answer exactly as `generate`
does (NVLM-X and H here, D in test_app.py), and X/H through the real `openai` client."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import linen as nn

import nvlm_jax
from nvlm_jax import config
from nvlm_jax.data.pipeline import config_for_tokenizer
from nvlm_jax.generate import cut_at_stop
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.processing import get_special_tokens, load_tokenizer, make_tiny_tokenizer
from nvlm_jax.serve.engine import Engine
from nvlm_jax.serve.image_cache import content_key
from nvlm_jax.serve.protocol import Delta, EngineRequest, Finished, ImageInput, RequestSampling
from nvlm_jax.sharding import make_mesh, tree_shardings
from tests.serve.server import data_url, image, image_part, serving

STEPS = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _random_model(arch, tokenizer, mesh=None, dtype="float32"):
    """A random tiny model, drawn on the host (compiling `init_params` costs ~15 s on CPU): norm
    scales 1, other weights N(0, 0.2), cross-attention gates 0.5 (so the images matter); placed
    on `mesh` by the logical-axis rules when given; params and compute in `dtype`."""
    cfg = config_for_tokenizer(config.tiny(arch), tokenizer).replace(dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("attn_gate", "ffn_gate"):
            return np.full(leaf.shape, 0.5, leaf.dtype)
        if name in ("scale", "q_norm", "k_norm"):
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0, 0.2, leaf.shape).astype(leaf.dtype)

    abstract = nvlm_model.abstract_params(cfg)
    params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))
    if mesh is None:
        return nvlm_jax.NVLMModel(cfg, jax.device_put(params), tokenizer)
    return nvlm_jax.NVLMModel(cfg, jax.device_put(params, tree_shardings(abstract, mesh)), tokenizer, mesh=mesh)


def _requests(model, prompts):
    """Engine requests of (images, question) prompts, and the answer tokens `generate` gives
    them (one batched call, cut at <|im_end|>)."""
    special = get_special_tokens(model.tokenizer)
    inputs = [model.prepare_chat(images, question) for images, question in prompts]
    wants = model.generate(inputs, max_new_tokens=STEPS)
    cases = []
    for row, want in zip(inputs, wants, strict=True):
        pixels, parts = row.pixel_values, []
        for count in row.prompt.num_tiles:
            tiles, pixels = pixels[:count], pixels[count:]
            parts.append(ImageInput(content_key(tiles.tobytes()), tiles))
        cross = row.cross_ids
        ids = {} if cross is None else dict(token_image=cross.token_image, token_tile=cross.token_tile,
                                            tile_image=cross.tile_image)
        request = EngineRequest(row.input_ids, tuple(parts), max_tokens=STEPS, stop_token_ids=(special.im_end,), **ids)
        cases.append((request, cut_at_stop(want, (special.im_end,))[0]))
    return cases


@pytest.mark.parametrize("arch", ["X", "H"])  # D: tests/serve/test_app.py
def test_requests_joining_busy_slots_answer_as_generate_alone(arch, tokenizer):
    model = _random_model(arch, tokenizer)
    a, b = image(60, 30, seed=1), image(60, 30, seed=2)
    cases = _requests(model, [([a, b], "Compare them."), (None, "Hello there."), (a, "What is it?")])
    engine = Engine(model, max_batch=2, max_len=256, max_images=2).start()
    try:
        # Two slots, three requests: the third joins when one of the first two leaves.
        handles = [engine.submit(request) for request, _ in cases]
        for handle, (_, want) in zip(handles, cases, strict=True):
            events = list(handle)
            done = events[-1]
            assert isinstance(done, Finished), done
            np.testing.assert_array_equal(done.token_ids, want)
            assert "".join(e.text for e in events if isinstance(e, Delta)) == done.text
        assert engine.metrics()["running"] == 0
        assert engine.metrics()["images_encoded"] == 2  # `a` once for two requests
        # The same engine behind the HTTP server, asked with the real client.
        with serving(engine) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
            content = [image_part(data_url(a)), image_part(data_url(b)), {"type": "text", "text": "Compare them."}]
            ask = dict(model="nvlm", messages=[{"role": "user", "content": content}], max_tokens=STEPS, temperature=0)
            out = client.chat.completions.create(**ask)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask,
                                                                                                       stream=True))
    finally:
        engine.stop()
    want = cases[0][1]
    # `model.chat` returns exactly this decoding of `generate`'s tokens, stripped.
    assert out.choices[0].message.content == model.tokenizer.decode(want.tolist(), skip_special_tokens=True)
    assert out.usage.completion_tokens == want.size and streamed == out.choices[0].message.content


def test_request_sampling_checks_its_ranges():
    with pytest.raises(ValueError, match="top_p must be in"):
        RequestSampling(top_p=0)
    with pytest.raises(ValueError, match="frequency_penalty must be in"):
        RequestSampling(frequency_penalty=3)


@pytest.mark.parametrize("arch", ["D", "H"])
def test_requests_arriving_together_prefill_together_and_answer_as_generate(arch, tokenizer):
    model = _random_model(arch, tokenizer)
    a, b = image(60, 30, seed=1), image(40, 40, seed=3)
    prompts = [(a, "What is it?"), (None, "Hello there."), (b, "And this one?"), ([a, b], "Compare them.")]
    cases = _requests(model, prompts)
    engine = Engine(model, max_batch=4, max_len=256, max_images=2)
    handles = [engine.submit(request) for request, _ in cases]  # all waiting before the engine runs
    engine.start()
    try:
        for handle, (_, want) in zip(handles, cases, strict=True):
            done = list(handle)[-1]
            assert isinstance(done, Finished), done
            np.testing.assert_array_equal(done.token_ids, want)
        buckets = {max(64, 1 << (int(np.asarray(r.input_ids).size) - 1).bit_length()) for r, _ in cases}
        # one prefill program call per prompt bucket, not per request (three rows padded to four)
        assert engine.metrics()["prefill_calls"] == len(buckets) < len(cases)
    finally:
        engine.stop()


def test_warmup_compiles_what_the_first_requests_need_and_leaves_a_clean_state(tokenizer):
    from nvlm_jax.serve import engine as engine_lib

    model = _random_model("X", tokenizer)
    cases = _requests(model, [(None, "Hello there."), (None, "Hi.")])
    engine = Engine(model, max_batch=3, max_len=128, max_images=1)
    fresh = jax.tree_util.tree_map(np.asarray, engine._state)
    engine.warmup()
    jax.tree_util.tree_map(np.testing.assert_array_equal, fresh, jax.tree_util.tree_map(np.asarray, engine._state))
    compiled = engine_lib._prefill._cache_size(), engine_lib._decode._cache_size()
    handles = [engine.submit(request) for request, _ in cases]  # a group of two short prompts
    engine.start()
    try:
        for handle, (_, want) in zip(handles, cases, strict=True):
            np.testing.assert_array_equal(list(handle)[-1].token_ids, want)
    finally:
        engine.stop()
    assert engine.metrics()["prefill_calls"] == 1
    assert (engine_lib._prefill._cache_size(), engine_lib._decode._cache_size()) == compiled  # nothing new


def test_a_bfloat16_engine_answers_as_bfloat16_generate(tokenizer):
    # A bf16 cache's slot rows, windows and per-row writes go through their raw bits
    # (`models/llm.py` as_bits): the same values as `generate`'s, which writes one start for all.
    model = _random_model("D", tokenizer, dtype="bfloat16")
    cases = _requests(model, [(None, "Hello there."), (image(60, 30, seed=1), "What is it?"), (None, "Hi.")])
    engine = Engine(model, max_batch=2, max_len=256, max_images=1).start()
    try:
        handles = [engine.submit(request) for request, _ in cases]  # two slots: the third joins later
        for handle, (_, want) in zip(handles, cases, strict=True):
            np.testing.assert_array_equal(list(handle)[-1].token_ids, want)
    finally:
        engine.stop()
    assert engine._state["cache"]["k"].dtype == jnp.uint16  # the bf16 cache's raw bits (`init_cache`)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_step_reads_its_view_of_the_cache_in_place(dtype, tokenizer):
    # Each layer reads the running slots' first `view` columns straight out of the whole cache and
    # writes one column per slot. Before, the step cut a [layers, slots, view, ...] window out of
    # the k/v stacks and wrote it back: two passes over it per step, the 126M model's step at
    # view 256 took twice its step at 128 (BUILD_NOTES).
    from nvlm_jax.serve import engine as engine_lib
    from tests.models.cache_hlo import whole_cache_copies

    model = _random_model("D", tokenizer, dtype=dtype)
    engine = Engine(model, max_batch=4, max_len=256)
    b, view = 4, 64
    zeros = np.zeros((b,), np.int32)
    hlo = engine_lib._decode.lower(model.params, engine._state, zeros, zeros, np.ones((b,), bool),
                                   engine._rows([None] * b), cfg=model.config, view=view).compile().as_text()
    k = engine._state["cache"]["k"]
    assert not whole_cache_copies(hlo, k.shape, dtype)
    window = ",".join(map(str, (k.shape[0], b, view) + k.shape[3:]))
    assert not re.findall(rf"= \w+\[{window}\]", hlo), window


@pytest.mark.parametrize("arch", ["D", "X"])
def test_a_tensor_parallel_engine_splits_its_cache_by_kv_head_and_compiles_each_program_once(arch, tokenizer):
    from nvlm_jax.serve import engine as engine_lib

    mesh = make_mesh(1, -1, 2)  # fsdp 4 x tensor 2 over the 8 simulated devices
    model = _random_model(arch, tokenizer, mesh)
    # Three text prompts (the warmed-up bucket) for two slots: the third joins when one leaves.
    cases = _requests(model, [(None, "Hello there."), (None, "Hi."), (None, "What is it?")])
    engine = Engine(model, max_batch=2, max_len=128, max_images=1)
    kv = jax.sharding.PartitionSpec(None, None, None, "tensor")
    split = ("k", "v") + (("memory_k", "memory_v") if arch == "X" else ())

    def check_layout():
        for name in split:
            x = engine._state["cache"][name] if name in ("k", "v") else engine._state[name]
            assert x.sharding.spec == kv, (name, x.sharding)
            assert x.addressable_shards[0].data.shape[3] == x.shape[3] // 2, name  # half the kv heads each
        assert engine._state["counts"].sharding.is_fully_replicated

    check_layout()
    engine.warmup()
    compiled = engine_lib._prefill._cache_size(), engine_lib._decode._cache_size()
    engine.start()
    try:
        handles = [engine.submit(request) for request, _ in cases]
        for handle, (_, want) in zip(handles, cases, strict=True):
            np.testing.assert_array_equal(list(handle)[-1].token_ids, want)
    finally:
        engine.stop()
    check_layout()  # the programs hand the state back as it came in: nothing compiled twice
    assert (engine_lib._prefill._cache_size(), engine_lib._decode._cache_size()) == compiled
