"""Structured output through the server: OpenAI's ``response_format`` and Ollama's ``format`` on the tiny fixtures,
spoken to with the official ``openai`` and ``ollama`` clients. What the server answers equals ``generate`` with the
same constraint (greedy), parses, and validates with the ``jsonschema`` package; constrained and free requests run
side by side; logprobs, images and streaming work under a constraint."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import openai
import pytest
from test_server import AUTH, FIX, HI, KEY, srv, vsrv  # noqa: F401 - fixtures

from mlx_gemma_qat.generate import generate

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture
def client(srv):  # noqa: F811
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


def test_openai_chat_json_schema_whole_and_streamed(client, srv):  # noqa: F811
    want = generate(srv.model, srv.tok, HI, 200, json_schema=SCHEMA)
    jsonschema.validate(json.loads(want), SCHEMA)
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=200, response_format=FORMAT)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    parts = list(client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=200,
                                                response_format=FORMAT, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    assert parts[-1].choices[0].finish_reason == "stop"
    # the same prompt again starts from a kept KV cache, and the constraint still holds from the first token
    again = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=200, response_format=FORMAT)
    assert again.usage.prompt_tokens_details.cached_tokens > 0 and again.choices[0].message.content == want


def test_openai_json_object_and_completions(client, srv):  # noqa: F811
    want = generate(srv.model, srv.tok, HI, 40, json=True)  # random weights: an object that may not close
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=40,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content == want and want.startswith("{")
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=200, temperature=0.9, seed=3,
                                       top_p=0.9, response_format=FORMAT, extra_body={"top_k": 50, "min_p": 0.05})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    want = generate(srv.model, srv.tok, "The cat", 200, chat=False, json_schema=SCHEMA)
    r = client.completions.create(model="tiny-gemma", prompt="The cat", max_tokens=200,
                                  extra_body={"response_format": FORMAT})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"


def test_openai_logprobs_are_those_of_the_constrained_distribution(client, srv):  # noqa: F811
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=200, response_format=FORMAT,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and r.choices[0].finish_reason == "stop"
    # masked tokens have no probability: every alternative offered is allowed, so its logprob is finite,
    # and at a forced step (one allowed token) the chosen token has probability 1
    for c in content:
        assert all(t.logprob > -1e30 for t in c.top_logprobs)
        assert c.logprob <= 1e-6
    assert any(abs(c.logprob) < 1e-5 for c in content)


def test_too_few_tokens_end_with_length_not_stop(client):
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=3, response_format=FORMAT)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_constrained_and_free_requests_side_by_side(srv):  # noqa: F811
    """Four constrained and four free requests at once each get what they get alone."""
    want_free = generate(srv.model, srv.tok, HI, 12)
    want_json = generate(srv.model, srv.tok, HI, 200, json_schema=SCHEMA)
    out = {}

    def ask(i):
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        kw = {"response_format": FORMAT, "max_tokens": 200} if i % 2 else {"max_tokens": 12}
        out[i] = c.chat.completions.create(model="tiny-gemma", messages=HI, **kw).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(8)] == [want_free, want_json] * 4


def test_ollama_format_json_and_schema(srv):  # noqa: F811
    import ollama

    c = ollama.Client(host=srv.url, headers=AUTH)
    want = generate(srv.model, srv.tok, HI, 200, json_schema=SCHEMA)
    r = c.chat(model="tiny-gemma", messages=HI, format=SCHEMA, options={"num_predict": 200})
    assert r.message.content == want and r.done_reason == "stop"
    parts = list(c.chat(model="tiny-gemma", messages=HI, format=SCHEMA, options={"num_predict": 200}, stream=True))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done_reason == "stop"
    r = c.generate(model="tiny-gemma", prompt="The cat", format="json", options={"num_predict": 200})
    assert isinstance(json.loads(r.response), dict) and r.done_reason == "stop"


def test_images_under_a_constraint(vsrv):  # noqa: F811
    import base64

    data = base64.b64encode((FIX / "images" / "a.png").read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(FIX / "images" / "a.png")},
                                         {"type": "text", "text": "Describe it"}]}]
    want = generate(vsrv.model, vsrv.tok, msgs, 200, json_schema=SCHEMA)
    jsonschema.validate(json.loads(want), SCHEMA)
    r = httpx.post(vsrv.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            {"type": "text", "text": "Describe it"}]}], "max_tokens": 200, "response_format": FORMAT})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
