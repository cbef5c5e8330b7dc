"""KV-cached generation: batching, sampling, stopping, cache parity and sharding."""

import jax
import numpy as np
import pytest

from nvlm_jax import convert
from nvlm_jax.generate import SamplingParams, apply_penalties, generate, pad_prompts, sample_logits, tile_bucket
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.sharding import make_mesh
from tests import hf_checkpoint as hc


@pytest.fixture(scope="module")
def model():
    out = hc.tiny_converted()
    cfg = convert.read_our_config(out)
    return cfg, convert.load_our_params(out, cfg)


def _prompts(cfg):
    rng = np.random.default_rng(3)
    a = hc.prompt_ids(cfg, [2], seed=1)  # 2 tiles
    b = rng.integers(1, 900, 7).astype(np.int32)  # text only, short
    c = hc.prompt_ids(cfg, [1, 1], seed=2, text=12)  # two images, longest
    pixels = rng.standard_normal((4, 28, 28, 3)).astype(np.float32)
    return [a, b, c], [pixels[:2], None, pixels[2:]]


def test_batched_prompts_of_different_lengths_equal_unbatched(model):
    cfg, params = model
    prompts, pixels = _prompts(cfg)
    batched = generate(params, cfg, prompts, np.concatenate([p for p in pixels if p is not None]),
                       max_new_tokens=12, return_logits=True)
    assert batched.tokens.shape == (3, 12)
    for i, (ids, px) in enumerate(zip(prompts, pixels, strict=True)):
        alone = generate(params, cfg, [ids], px, max_new_tokens=12, return_logits=True)
        np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(batched.logits[i], alone.logits[0], atol=2e-5, rtol=0)


def test_attention_mask_input_equals_list_input(model):
    cfg, params = model
    a, b = np.arange(1, 11, dtype=np.int32), np.arange(20, 25, dtype=np.int32)
    ids = np.zeros((2, 10), np.int32)
    mask = np.zeros((2, 10), np.int32)
    ids[0], mask[0] = a, 1
    ids[1, :5], mask[1, :5] = b, 1  # right-padded row
    from_mask = generate(params, cfg, ids, attention_mask=mask, max_new_tokens=5).tokens
    from_list = generate(params, cfg, [a, b], max_new_tokens=5).tokens
    np.testing.assert_array_equal(from_mask, from_list)


def test_cached_decode_logits_equal_full_recomputation(model):
    cfg, params = model
    prompts, pixels = _prompts(cfg)
    ids, px = prompts[0], pixels[0]
    out = generate(params, cfg, [ids], px, max_new_tokens=12, return_logits=True)
    full_ids = np.concatenate([ids, out.tokens[0, :-1]])[None]
    full, _ = nvlm_model.NVLM(cfg).apply({"params": params}, full_ids, px)
    want = np.asarray(full)[0, len(ids) - 1 :]
    np.testing.assert_allclose(out.logits[0], want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.tokens[0], np.argmax(want, axis=-1))


def test_sampling_is_deterministic_per_seed(model):
    cfg, params = model
    ids = [np.arange(1, 9, dtype=np.int32), np.arange(30, 36, dtype=np.int32)]
    hot = SamplingParams(do_sample=True, temperature=1.5)
    a = generate(params, cfg, ids, max_new_tokens=16, sampling=hot, seed=4).tokens
    b = generate(params, cfg, ids, max_new_tokens=16, sampling=hot, seed=4).tokens
    c = generate(params, cfg, ids, max_new_tokens=16, sampling=hot, seed=5).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_one_equals_greedy(model):
    cfg, params = model
    ids = [np.arange(1, 9, dtype=np.int32), np.arange(30, 36, dtype=np.int32)]
    greedy = generate(params, cfg, ids, max_new_tokens=16).tokens
    top1 = generate(params, cfg, ids, max_new_tokens=16, seed=9,
                    sampling=SamplingParams(do_sample=True, temperature=0.7, top_k=1)).tokens
    np.testing.assert_array_equal(top1, greedy)


def test_top_k_beyond_the_vocabulary_is_a_named_error(model):
    cfg, params = model
    too_many = SamplingParams(do_sample=True, top_k=cfg.llm.vocab_size + 1)
    with pytest.raises(ValueError, match=f"top_k {cfg.llm.vocab_size + 1} is larger than the vocabulary"):
        generate(params, cfg, [np.arange(1, 5, dtype=np.int32)], max_new_tokens=2, sampling=too_many)


def test_stop_tokens_end_each_row_and_the_loop(model):
    cfg, params = model
    ids = [np.arange(1, 9, dtype=np.int32), np.arange(30, 36, dtype=np.int32)]
    free = generate(params, cfg, ids, max_new_tokens=16).tokens
    stop = int(free[0, 2])
    first = [int(np.flatnonzero(row == stop)[0]) if np.any(row == stop) else None for row in free]
    out = generate(params, cfg, ids, max_new_tokens=16, stop_token_ids=[stop], pad_token_id=999).tokens
    for row, f, o in zip(free, first, out, strict=True):
        if f is None:
            np.testing.assert_array_equal(o, row[: o.size])
        else:
            np.testing.assert_array_equal(o[: f + 1], row[: f + 1])  # the stop token is kept
            assert np.all(o[f + 1 :] == 999)
    if all(f is not None for f in first):
        assert out.shape[1] == max(first) + 1  # the loop ended when every row had stopped


def test_suppressed_tokens_are_never_chosen(model):
    cfg, params = model
    ids = [np.arange(1, 9, dtype=np.int32)]
    free = generate(params, cfg, ids, max_new_tokens=6, return_logits=True)
    banned = sorted(set(free.tokens[0].tolist()))
    out = generate(params, cfg, ids, max_new_tokens=6, suppress_token_ids=banned, return_logits=True)
    assert not np.isin(out.tokens, banned).any()
    first = free.logits[0, 0].copy()
    first[banned] = -np.inf
    assert out.tokens[0, 0] == first.argmax()
    np.testing.assert_array_equal(out.logits[0, 0], first)


def test_d_per_row_tiles_equal_tiles_in_order(model):
    cfg, params = model
    prompts, pixels = _prompts(cfg)
    flat = generate(params, cfg, prompts, np.concatenate([p for p in pixels if p is not None]),
                    max_new_tokens=6, return_logits=True)
    rows = np.zeros((3, 3, 28, 28, 3), np.float32)  # 3 slots: one left unused by every row
    valid = np.zeros((3, 3), bool)
    for i, px in enumerate(pixels):
        if px is not None:
            rows[i, : len(px)], valid[i, : len(px)] = px, True
    per_row = generate(params, cfg, prompts, rows, tile_valid=valid, max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(per_row.tokens, flat.tokens)
    np.testing.assert_allclose(per_row.logits, flat.logits, atol=2e-5, rtol=0)


def test_sample_logits_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 64, np.float32))
    keys = jax.random.key(0)
    nucleus = sample_logits(logits, keys, do_sample=True, top_k=0, top_p=0.5)
    assert set(np.asarray(nucleus).tolist()) == {0}
    nucleus = sample_logits(logits, keys, do_sample=True, top_k=0, top_p=0.75)
    assert set(np.asarray(nucleus).tolist()) == {0, 1}
    topk = sample_logits(logits, keys, do_sample=True, top_k=3)
    assert set(np.asarray(topk).tolist()) == {0, 1, 2}
    greedy = sample_logits(logits, keys, do_sample=False)
    assert set(np.asarray(greedy).tolist()) == {0}


def test_sample_logits_takes_per_row_settings_at_run_time():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 1024, np.float32))
    keys = jax.random.split(jax.random.key(0), 1024)
    # Rows in groups of 256: greedy, top_k 2, top_p 0.75, unfiltered at temperature 2.
    group = np.repeat(np.arange(4), 256)
    settings = dict(do_sample=group > 0, top_k=np.where(group == 1, 2, 0), top_p=np.where(group == 2, 0.75, 1.0),
                    temperature=np.where(group == 3, 2.0, 1.0))
    run = jax.jit(lambda lg, k, s: sample_logits(lg, k, **s))
    out = np.asarray(run(logits, keys, settings))
    assert [set(out[group == g].tolist()) for g in range(4)] == [{0}, {0, 1}, {0, 1}, {0, 1, 2, 3}]
    greedy = dict(settings, do_sample=np.zeros(1024, bool), top_k=np.full(1024, 3))
    assert set(np.asarray(run(logits, keys, greedy)).tolist()) == {0}
    assert run._cache_size() == 1  # new settings, same program


def test_penalties_follow_vllm_and_openai():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], np.float32)
    counts = np.array([[0, 0, 2, 0]], np.int32)  # token 2 was generated twice
    seen = np.array([[True, True, False, False]])  # tokens 0, 1 are in the prompt
    out = apply_penalties(logits, counts, seen, np.array([2.0]), np.array([0.5]), np.array([0.25]))
    np.testing.assert_allclose(out, [[1.0, -4.0, 0.5 - 1.0 - 0.25, 0.5]])
    neutral = apply_penalties(logits, counts, seen, np.ones(1), np.zeros(1), np.zeros(1))
    np.testing.assert_array_equal(neutral, logits)


def test_pad_prompts_left_pads_with_segment_zero():
    batch = pad_prompts([np.array([5, 6, 7]), np.array([8])], pad_id=1, bucket=4)
    np.testing.assert_array_equal(batch.ids, [[1, 5, 6, 7], [1, 1, 1, 8]])
    np.testing.assert_array_equal(batch.segment_ids, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(batch.positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    assert [tile_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_invalid_requests_are_errors(model):
    cfg, params = model
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        generate(params, cfg, [np.arange(1, 10)], max_new_tokens=cfg.llm.max_position_embeddings)
    with pytest.raises(ValueError, match="hold 4 image context tokens"):
        generate(params, cfg, [hc.prompt_ids(cfg, [1])], np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(ValueError, match="is the image context token"):
        generate(params, cfg, [np.arange(1, 5)], pad_token_id=cfg.image_context_token_id)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(do_sample=True, temperature=0.0)


def test_sharded_generation_equals_single_device(model):
    cfg, params = model
    prompts, pixels = _prompts(cfg)
    ids = [prompts[1], prompts[0]]
    px = pixels[0]
    want = generate(params, cfg, ids, px, max_new_tokens=6).tokens
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = nvlm_model.shard_params(params, cfg, mesh)
    got = generate(sharded, cfg, ids, px, max_new_tokens=6, mesh=mesh).tokens
    np.testing.assert_array_equal(got, want)


# ---- NVLM-X/H: per-row tiles, cross-attention memory computed once per prompt ----


@pytest.fixture(scope="module")
def xh_models(tmp_path_factory):
    """Tiny X and H models (gates open, so the images matter) with the tiny tokenizer, and two
    chat prompts of different lengths and tile counts (1 tile; 1 + 3 tiles)."""
    from PIL import Image

    from nvlm_jax import NVLMModel, config
    from nvlm_jax.data.pipeline import config_for_tokenizer
    from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

    tok = load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    rng = np.random.default_rng(0)
    square, wide = (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((28, 28), (60, 30)))
    out = {}
    for arch in ("X", "H"):
        cfg = config_for_tokenizer(config.tiny(arch), tok)
        params = nvlm_model.init_params(cfg, jax.random.key(1))
        params["xattn"] = dict(params["xattn"], attn_gate=np.full_like(params["xattn"]["attn_gate"], 0.5),
                               ffn_gate=np.full_like(params["xattn"]["ffn_gate"], 0.5))
        model = NVLMModel(cfg, params, tok)
        prompts = [model.prepare_chat(square, "Colour?"), model.prepare_chat([square, wide], "Compare the two.")]
        out[arch] = model, prompts
    return out


def _xh_args(prompts):
    ids = [p.cross_ids for p in prompts]
    return dict(pixel_values=[p.pixel_values for p in prompts], token_image=[c.token_image for c in ids],
                token_tile=[c.token_tile for c in ids], tile_image=[c.tile_image for c in ids])


@pytest.mark.parametrize("arch", ["X", "H"])
def test_xh_cached_decode_equals_greedy_full_forwards(xh_models, arch):
    model, prompts = xh_models[arch]
    cfg, p = model.config, prompts[1]
    assert p.pixel_values.shape[0] == 4
    steps = 5
    out = generate(model.params, cfg, [p.input_ids], **_xh_args([p]), max_new_tokens=steps, return_logits=True)
    s, ids = p.input_ids.size, p.cross_ids
    pixels, tile_image = p.pixel_values[None], ids.tile_image[None]
    # One right-padded length for every step: causal attention keeps later slots out of earlier logits.
    width = s + steps
    token_image = np.concatenate([ids.token_image, np.full(steps, ids.token_image.max())])[None]
    token_tile = np.concatenate([ids.token_tile, np.full(steps, -1)])[None]
    full = jax.jit(lambda x: nvlm_model.NVLM(cfg).apply(
        {"params": model.params}, x, pixels, None, tile_image=tile_image, token_image=token_image,
        token_tile=token_tile)[0])
    seq = np.zeros((1, width), np.int32)
    seq[0, :s] = p.input_ids
    for k in range(steps):
        logits = np.asarray(full(seq))[0, s - 1 + k]
        np.testing.assert_allclose(out.logits[0, k], logits, atol=1e-4, rtol=0)
        seq[0, s + k] = np.argmax(logits)
    np.testing.assert_array_equal(out.tokens[0], seq[0, s:])


@pytest.mark.parametrize("arch", ["X", "H"])
def test_xh_batched_prompts_with_different_tiles_equal_unbatched(xh_models, arch):
    model, prompts = xh_models[arch]
    cfg = model.config
    assert prompts[0].input_ids.size != prompts[1].input_ids.size
    batched = generate(model.params, cfg, [p.input_ids for p in prompts], **_xh_args(prompts), max_new_tokens=5,
                       return_logits=True)
    for i, p in enumerate(prompts):
        alone = generate(model.params, cfg, [p.input_ids], **_xh_args([p]), max_new_tokens=5, return_logits=True)
        np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(batched.logits[i], alone.logits[0], atol=2e-5, rtol=0)


def test_xh_generation_input_errors(xh_models):
    model, prompts = xh_models["H"]
    cfg, p = model.config, prompts[1]
    args = _xh_args([p])
    with pytest.raises(ValueError, match="needs token_image and token_tile"):
        generate(model.params, cfg, [p.input_ids], args["pixel_values"], tile_image=args["tile_image"])
    with pytest.raises(ValueError, match="per-row tiles"):
        generate(model.params, cfg, [p.input_ids], p.pixel_values, **{k: v for k, v in args.items()
                                                                     if k != "pixel_values"})
    short = dict(args, pixel_values=[p.pixel_values[:1]], tile_image=[p.cross_ids.tile_image[:1]])
    with pytest.raises(ValueError, match="token_tile names tile 3 but the prompt has 1 valid tiles"):
        generate(model.params, cfg, [p.input_ids], **short)
    # One image of 4 tiles instead of 1 + 3: one thumbnail, but the prompt holds two thumbnails' tokens.
    merged = dict(args, tile_image=[np.zeros(4, np.int32)], token_image=[np.minimum(p.cross_ids.token_image, 0)])
    with pytest.raises(ValueError, match="prompt 0 .*hold 8 image context tokens"):
        generate(model.params, cfg, [p.input_ids], **merged)
