"""The OpenAI-compatible server (NVLM-D), called with the real `openai` client on localhost."""

import concurrent.futures
import json
import time

import openai
import pytest

import nvlm_jax
from nvlm_jax.generate import cut_at_stop
from nvlm_jax.processing import get_special_tokens
from nvlm_jax.serve.engine import Engine
from nvlm_jax.serve.requests import Limits
from tests import hf_checkpoint as hc
from tests.serve.server import data_url, http, image, image_part, metrics, png_bytes, serving

MAX_LEN = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32")
    root = tmp_path_factory.mktemp("images")
    image(60, 30, seed=3).save(root / "local.png")  # PNG is lossless: the same pixels as image(seed=3)
    (root.parent / "outside.png").write_bytes(png_bytes(image(40, 40)))
    engine = Engine(model, max_batch=4, max_len=MAX_LEN).start()
    limits = Limits(max_image_pixels=100 * 100, limit_images_per_prompt=2, image_root=str(root))
    with serving(engine, limits) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        yield model, client, base, root, engine
    engine.stop()


def _ask(client, content, **options):
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model="nvlm", messages=[{"role": "user", "content": content}], **options)


def _greedy_tokens(model, images, question, max_new_tokens):
    """`model.chat`'s answer tokens (greedy, cut at <|im_end|>)."""
    special = get_special_tokens(model.tokenizer)
    tokens = model.generate(model.prepare_chat(images, question), max_new_tokens=max_new_tokens)[0]
    return cut_at_stop(tokens, (special.im_end,))[0]


def test_plain_chat_equals_model_chat_token_for_token(server):
    model, client, base, _, _ = server
    question = "What is this?"
    out = _ask(client, question, max_tokens=8)
    want = _greedy_tokens(model, None, question, 8)
    assert out.choices[0].message.content.strip() == model.chat(None, question, max_new_tokens=8)
    assert out.usage.completion_tokens == want.size
    assert out.usage.prompt_tokens == model.prepare_chat(None, question).input_ids.size
    assert out.choices[0].finish_reason == ("length" if want.size == 8 else "stop")
    assert [m.id for m in client.models.list().data] == ["nvlm"]
    assert http(f"{base}/health") == (200, '{"status":"ok"}')


def test_images_as_data_urls_and_files_equal_model_chat_and_are_encoded_once(server):
    model, client, base, _, _ = server
    a, b, c = image(60, 30, seed=1), image(60, 30, seed=2), image(60, 30, seed=3)
    prompts = [(a, "Describe it."), ([a, b], "Compare."), (c, "Describe it.")]
    # `model.chat`'s answers: its decoding of `generate`'s tokens (one batched call here).
    special = get_special_tokens(model.tokenizer)
    tokens = model.generate([model.prepare_chat(*p) for p in prompts], max_new_tokens=8)
    wants = [model.tokenizer.decode(cut_at_stop(t, (special.im_end,))[0].tolist(), skip_special_tokens=True)
             for t in tokens]
    one = _ask(client, [image_part(data_url(a)), {"type": "text", "text": "Describe it."}], max_tokens=8)
    assert one.choices[0].message.content == wants[0]
    before = metrics(base)
    two = _ask(client, [image_part(data_url(a)), image_part(data_url(b)), {"type": "text", "text": "Compare."}],
               max_tokens=8)
    assert two.choices[0].message.content == wants[1]
    after = metrics(base)
    # `a` again: a cache hit, only `b` is encoded.
    assert after["nvlm_images_encoded"] - before["nvlm_images_encoded"] == 1
    assert after["nvlm_image_cache_hits"] - before["nvlm_image_cache_hits"] == 1
    local = _ask(client, [image_part("local.png"), {"type": "text", "text": "Describe it."}], max_tokens=8)
    assert local.choices[0].message.content == wants[2]


def test_streaming_chunks_join_to_the_answer(server):
    _, client, _, _, _ = server
    content = [image_part(data_url(image(60, 30, seed=1))), {"type": "text", "text": "Describe it."}]
    full = _ask(client, content, max_tokens=8)
    chunks = list(_ask(client, content, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings_end_the_answer_before_them(server):
    _, client, _, _, _ = server
    full = _ask(client, "Tell me more.", max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    out = _ask(client, "Tell me more.", max_tokens=16, stop=[stop, "never appears"])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(client, "Tell me more.", max_tokens=16,
                                                                     stop=stop, stream=True))
    assert streamed == cut


def test_sampling_settings_are_runtime_values(server):
    model, client, _, _, _ = server
    from nvlm_jax.serve import engine as engine_lib

    hot = dict(temperature=1.5, top_p=0.9, max_tokens=8)
    a = _ask(client, "Hello.", seed=3, **hot).choices[0].message.content
    programs = engine_lib._decode._cache_size()
    assert _ask(client, "Hello.", seed=3, **hot).choices[0].message.content == a
    others = {_ask(client, "Hello.", seed=s, **hot).choices[0].message.content for s in (4, 5, 6)}
    assert others != {a}
    for extra in (dict(extra_body={"top_k": 5, "repetition_penalty": 1.3}), dict(frequency_penalty=1.0)):
        _ask(client, "Hello.", seed=1, **hot, **extra)
    assert engine_lib._decode._cache_size() == programs  # new settings, no new program


def _bad(base, body, **changes):
    request = {"model": "nvlm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **changes}
    return http(f"{base}/v1/chat/completions", body if body is not None else request)


def _image_request(*urls):
    return {"messages": [{"role": "user", "content": [image_part(u) for u in urls] + [{"type": "text",
                                                                                          "text": "Hi"}]}]}


@pytest.mark.parametrize("body, changes, status, reason", [
    (b"{not json", {}, 400, "not valid JSON"),
    (None, {"model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
    (None, _image_request("data:image/png;base64,@@@@"), 400, "bad base64"),
    (None, _image_request("data:image/png;base64,aGVsbG8gd29ybGQ="), 400, "image 1"),
    (None, _image_request(data_url(image(120, 100))), 400, "pixels"),
    (None, _image_request(*[data_url(image(20, 20, seed=i)) for i in range(3)]), 400, "too many images"),
    (None, {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "the context holds 512"),
    (None, {"max_tokens": -1}, 400, "max_tokens must be in"),
    (None, {"max_tokens": 10**6}, 400, "exceeds the context"),
    (None, {"n": 2}, 400, "n must be"),
    (None, {"temperature": "hot"}, 400, "temperature must be a number"),
    (None, {"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "end with a user turn"),
    (None, _image_request("http://example.com/cat.png"), 400, "remote image URLs are refused"),
    (None, _image_request("../outside.png"), 400, "outside the image root"),
    (None, {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be"),
])
def test_malformed_requests_get_a_4xx_with_one_line_reason(server, body, changes, status, reason):
    _, client, base, _, _ = server
    code, text = _bad(base, body, **changes)
    error = json.loads(text)["error"]
    assert code == status and reason in error["message"] and "\n" not in error["message"], (code, text)
    assert _ask(client, "Still there?", max_tokens=2).choices[0].message.content is not None


def test_the_openai_client_sees_refusals_as_its_errors(server):
    _, client, _, _, _ = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _ask(client, "Hi", max_tokens=0)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    _, client, base, _, _ = server
    before = metrics(base)
    stream = _ask(client, "Tell me a long story.", max_tokens=MAX_LEN - 64, stream=True)
    for _, chunk in zip(range(3), stream, strict=False):
        assert chunk.choices[0].finish_reason is None
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = metrics(base)
        if now["nvlm_running"] == 0 and now.get("nvlm_finished_cancelled", 0) > before.get(
                "nvlm_finished_cancelled", 0):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the slot was not freed: {now}")
    assert now["nvlm_generated_tokens"] - before["nvlm_generated_tokens"] < MAX_LEN - 64


def test_sixteen_concurrent_clients_finish_without_errors_or_leaked_slots(server):
    _, client, base, _, _ = server
    pictures = [data_url(image(60, 30, seed=10 + i)) for i in range(4)]
    alone = _ask(client, [image_part(pictures[0]), {"type": "text", "text": "What is it?"}], max_tokens=8)

    def one_client(i):
        answers = []
        for k in range(3):
            content = [image_part(pictures[(i + k) % 4]), {"type": "text", "text": "What is it?"}]
            if k == 1:
                chunks = _ask(client, content, max_tokens=8, stream=True)
                answers.append(("".join(c.choices[0].delta.content or "" for c in chunks), (i + k) % 4))
            else:
                out = _ask(client, content, max_tokens=8)
                answers.append((out.choices[0].message.content, (i + k) % 4))
        return answers

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [a for answers in pool.map(one_client, range(16)) for a in answers]
    assert len(results) == 48 and time.monotonic() - start < 60
    # Batching changes nothing: every answer about picture 0 is the one it got alone.
    assert {text for text, picture in results if picture == 0} == {alone.choices[0].message.content}
    now = metrics(base)
    assert now["nvlm_running"] == 0 and now["nvlm_waiting"] == 0


def test_stream_chat_streams_the_servers_answer_on_its_engine(server):
    model, client, _, _, engine = server
    picture = image(60, 30, seed=1)
    pieces = list(model.stream_chat(picture, "Describe it.", max_new_tokens=8, engine=engine))
    answer = "".join(pieces)
    served = _ask(client, [image_part(data_url(picture)), {"type": "text", "text": "Describe it."}], max_tokens=8)
    assert len(pieces) > 1 and answer == served.choices[0].message.content  # = model.chat's (tested above)
    stop = answer.strip()[2:4]
    cut = "".join(model.stream_chat(picture, "Describe it.", max_new_tokens=8, stop=[stop], engine=engine))
    assert cut == answer[: answer.find(stop)]
    hot = dict(do_sample=True, temperature=1.3, top_k=20, seed=5)
    sampled = "".join(model.stream_chat(None, "Hi", max_new_tokens=8, engine=engine, **hot))
    assert sampled == "".join(model.stream_chat(None, "Hi", max_new_tokens=8, engine=engine, **hot))
    # Without an engine the model starts its own (one slot): same seed, same answer.
    assert "".join(model.stream_chat(None, "Hi", max_new_tokens=8, **hot)) == sampled
