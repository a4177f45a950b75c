"""``mlx-gemma serve`` over real HTTP: the server runs in this process (uvicorn on a free port, the real engine,
the tiny fixtures) and is spoken to with the official ``openai`` client and plain ``httpx``. Answers are
checked against ``generate`` on the same model (greedy), in both APIs' shapes; bad requests get their 4xx and
the server goes on; concurrent clients get what each gets alone; a client that goes away cancels its request.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from served import serve

from mlx_gemma_qat.generate import generate
from mlx_gemma_qat.server.app import ServerOptions, default_model_id

FIX = Path(__file__).parent / "fixtures"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
HI = [{"role": "user", "content": "Hello there"}]


def _serve(folder, model, tokenizer, api_key=None):
    return serve(folder, model, tokenizer, options=ServerOptions(api_keys=(api_key,) if api_key else ()))


@pytest.fixture(scope="session")
def srv(tiny_folder):
    """The text fixture served with an API key."""
    from mlx_gemma_qat import load

    s = _serve(tiny_folder, *load(tiny_folder), api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="session")
def vsrv(vlm):
    """The vision fixture served without an API key."""
    s = _serve(*vlm)
    yield s
    s.close()


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


def post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, headers=AUTH, timeout=60, **kw)


# -- OpenAI API ---------------------------------------------------------------------------------------------


def test_models(client, srv):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("tiny-gemma", "model", "mlx-gemma-qat")]
    assert models[0].created > 0
    assert client.models.retrieve("tiny-gemma").id == "tiny-gemma"


def test_chat_whole_and_streamed_equal_generate(client, srv):
    want = generate(srv.model, srv.tok, HI, 12)
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny-gemma"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its KV cache kept


def test_system_and_developer_prompts(client, srv):
    msgs = [{"role": "developer", "content": "Be brief."}, *HI]
    want = generate(srv.model, srv.tok, HI, 8, system="Be brief.")
    r = client.chat.completions.create(model="tiny-gemma", messages=msgs, max_tokens=8)
    assert r.choices[0].message.content == want
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert client.chat.completions.create(model="tiny-gemma", messages=parts, max_tokens=8).choices[0].message.content == want


def test_reuse_past_the_window_equals_fresh(client, srv):
    """A prompt that extends an earlier one, far past the fixture's 16-token sliding window, is answered from the
    kept cache (stepped back over the earlier reply, within the slack) exactly as a fresh prompt is."""
    base = "the sea and the ships on it sailed far away, over the waves and under the stars " * 2
    ids = srv.tok.encode(base, add_special_tokens=False)
    assert len(ids) > 3 * srv.model.cfg.sliding_window
    first = client.completions.create(model="tiny-gemma", prompt=base, max_tokens=8)
    assert first.usage.prompt_tokens_details.cached_tokens <= 1  # at most the BOS another request began with
    longer = base + "and then"
    r = client.completions.create(model="tiny-gemma", prompt=longer, max_tokens=8)
    assert r.choices[0].text == generate(srv.model, srv.tok, longer, 8, chat=False)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(ids) - 1


def test_completions(client, srv):
    want = generate(srv.model, srv.tok, "The cat", 10, chat=False)
    r = client.completions.create(model="tiny-gemma", prompt="The cat", max_tokens=10)
    assert r.choices[0].text == want and r.object == "text_completion" and r.id.startswith("cmpl-")
    assert client.completions.create(model="tiny-gemma", prompt=["The cat"], max_tokens=10).choices[0].text == want
    streamed = list(client.completions.create(model="tiny-gemma", prompt="The cat", max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_defaults_apply_when_a_request_gives_none(srv):
    r = post(srv, "/v1/completions", {"prompt": "abc"}).json()  # server default: 16 tokens
    assert r["choices"][0]["text"] == generate(srv.model, srv.tok, "abc", 16, chat=False)
    assert r["model"] == "tiny-gemma"
    r = post(srv, "/v1/chat/completions", {"messages": HI, "max_completion_tokens": 3, "max_tokens": 9}).json()
    assert r["usage"]["completion_tokens"] <= 3 and r["choices"][0]["message"]["content"] == generate(
        srv.model, srv.tok, HI, 3)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert c.logprob == pytest.approx(tops[0]) and c.token == c.top_logprobs[0].token  # greedy
        assert bytes(c.bytes).decode() == c.token
    streamed = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=6, logprobs=True,
                                              top_logprobs=3, stream=True)
    again = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in again] == [e.token for e in content]
    assert [e.logprob for e in again] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(model="tiny-gemma", prompt="The cat", max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(x) for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_seed_reproducible(client):
    def run(seed):
        return client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=16, temperature=1.0,
                                              seed=seed).choices[0].message.content

    a = run(7)
    assert run(7) == a
    assert len({a, run(8), run(9)}) > 1


def test_stop_strings(client, srv):
    full = generate(srv.model, srv.tok, HI, 16)
    stop = full[4:6]
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=16, stop=stop)
    assert r.choices[0].message.content == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-gemma", messages=HI, max_tokens=16, stop=["\x00never", stop])
    assert r.choices[0].message.content == full[: full.find(stop)]


def test_image_data_url_equals_generate(vsrv):
    model, tok = vsrv.model, vsrv.tok
    path = FIX / "images" / "a.png"
    want = generate(model, tok, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                             {"type": "text", "text": "What is this?"}]}], 10)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    c = openai.OpenAI(base_url=f"{vsrv.url}/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model="m", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}])
    assert r.choices[0].message.content == want
    # Ollama: the same image as bare base64, placed before the message's text
    o = httpx.post(f"{vsrv.url}/api/chat", json={"model": "m", "stream": False, "options": {"num_predict": 10},
                                                 "messages": [{"role": "user", "content": "What is this?",
                                                               "images": [url.split(",", 1)[1]]}]}).json()
    assert o["message"]["content"] == want
    show = httpx.post(f"{vsrv.url}/api/show", json={"model": "m:latest"}).json()
    assert show["capabilities"] == ["completion", "vision"]


# -- Ollama API ---------------------------------------------------------------------------------------------


def ndjson(response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


def test_ollama_chat_streamed_and_whole(srv):
    want = generate(srv.model, srv.tok, HI, 10)
    body = {"model": "tiny-gemma:latest", "messages": HI, "options": {"num_predict": 10, "temperature": 0}}
    with httpx.stream("POST", srv.url + "/api/chat", json=body, headers=AUTH, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(r)
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert "".join(x["message"]["content"] for x in lines) == want
    assert all(x["model"] == "tiny-gemma:latest" and x["message"]["role"] == "assistant" for x in lines)
    last = lines[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] <= 10 and last["prompt_eval_count"] > 0
    for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[k], int) and last[k] >= 0
    assert last["total_duration"] >= last["eval_duration"] > 0

    whole = post(srv, "/api/chat", {**body, "model": "tiny-gemma", "stream": False}).json()
    assert whole["message"] == {"role": "assistant", "content": want} and whole["done"] is True
    assert whole["eval_count"] == last["eval_count"]


def test_ollama_generate(srv):
    want = generate(srv.model, srv.tok, "The cat", 8, chat=None)  # the model's template, as Ollama applies it
    whole = post(srv, "/api/generate", {"model": "tiny-gemma", "prompt": "The cat", "stream": False,
                                        "options": {"num_predict": 8}}).json()
    assert whole["response"] == want and whole["done"] and whole["eval_count"] <= 8
    raw = generate(srv.model, srv.tok, "The cat", 8, chat=False)
    with httpx.stream("POST", srv.url + "/api/generate", headers=AUTH, timeout=60,
                      json={"model": "tiny-gemma", "prompt": "The cat", "raw": True, "options": {"num_predict": 8}}) as r:
        lines = ndjson(r)
    assert "".join(x["response"] for x in lines) == raw and lines[-1]["done"]
    sys_want = generate(srv.model, srv.tok, "The cat", 8, chat=None, system="Be brief.")
    assert post(srv, "/api/generate", {"prompt": "The cat", "system": "Be brief.", "stream": False,
                                       "options": {"num_predict": 8}}).json()["response"] == sys_want
    loaded = post(srv, "/api/generate", {"model": "tiny-gemma"}).json()
    assert loaded["done"] and loaded["done_reason"] == "load" and loaded["response"] == ""
    assert post(srv, "/api/chat", {"model": "tiny-gemma", "messages": []}).json()["done_reason"] == "load"


def test_ollama_seed_and_stop(srv):
    def run(**opts):
        return post(srv, "/api/chat", {"messages": HI, "stream": False,
                                       "options": {"num_predict": 16, **opts}}).json()["message"]["content"]

    a = run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) == a
    full = run()
    assert run(stop=[full[3:5]]) == full[: full.find(full[3:5])]


def test_official_ollama_client(srv, vsrv):
    """Ollama's own Python client, unchanged, against both servers: list, show, chat and generate (streamed and
    whole), and an image passed as the client sends it (a file it base64-encodes)."""
    import ollama

    c = ollama.Client(host=srv.url, headers=AUTH)
    assert [m.model for m in c.list().models] == ["tiny-gemma:latest"]
    assert c.show("tiny-gemma").capabilities == ["completion"]
    want = generate(srv.model, srv.tok, HI, 10)
    r = c.chat(model="tiny-gemma", messages=HI, options={"num_predict": 10})
    assert r.message.content == want and r.done and r.eval_count <= 10
    parts = list(c.chat(model="tiny-gemma", messages=HI, options={"num_predict": 10}, stream=True))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done
    raw = generate(srv.model, srv.tok, "The cat", 8, chat=False)
    assert c.generate(model="tiny-gemma", prompt="The cat", raw=True, options={"num_predict": 8}).response == raw
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="other", messages=HI)
    assert e.value.status_code == 404
    path = FIX / "images" / "a.png"
    v = ollama.Client(host=vsrv.url)
    want = generate(vsrv.model, vsrv.tok, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                                       {"type": "text", "text": "What is this?"}]}], 10)
    r = v.chat(model="m", messages=[{"role": "user", "content": "What is this?", "images": [path]}],
               options={"num_predict": 10})
    assert r.message.content == want


def test_ollama_tags_show_version(srv):
    tags = httpx.get(srv.url + "/api/tags", headers=AUTH).json()["models"]
    assert len(tags) == 1
    t = tags[0]
    assert t["name"] == t["model"] == "tiny-gemma:latest"
    assert t["size"] > 0 and t["digest"] and t["modified_at"].endswith("Z")
    d = t["details"]
    assert d["family"] == "gemma3" and d["families"] == ["gemma3"] and d["parameter_size"].endswith("M")
    assert d["quantization_level"] == "BF16"
    show = post(srv, "/api/show", {"model": "tiny-gemma"}).json()
    assert show["capabilities"] == ["completion"] and show["model_info"]["gemma3.context_length"] == 256
    assert show["details"] == d and "<start_of_turn>" in show["template"]
    assert post(srv, "/api/show", {"name": "tiny-gemma:latest"}).status_code == 200
    assert httpx.get(srv.url + "/api/version", headers=AUTH).json()["version"]
    root = httpx.get(srv.url + "/", headers=AUTH)
    assert root.status_code == 200 and "Ollama is running" in root.text
    assert httpx.head(srv.url + "/", headers=AUTH).status_code == 200


def test_tags_size_is_the_weight_files(tiny_folder, srv):
    tags = httpx.get(srv.url + "/api/tags", headers=AUTH).json()["models"]
    assert tags[0]["size"] == sum(f.stat().st_size for f in Path(tiny_folder).glob("*.safetensors"))


# -- auth, bad requests, failures ---------------------------------------------------------------------------


def test_api_key(srv):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(srv.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(srv.url + "/api/chat", headers=headers, json={"messages": HI})
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(srv.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


PNG = base64.b64encode((FIX / "images" / "a.png").read_bytes()).decode()
LONG = "word " * 60  # about 300 tokens: past the tiny models' 256-token context
OPENAI_BAD = [
    ("response_format of an unknown type", "/v1/chat/completions",
     {"messages": HI, "response_format": {"type": "grammar"}}, 400, "response_format.type"),
    ("json_schema without a name", "/v1/chat/completions",
     {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ("an invalid schema", "/v1/completions", {"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {"a": {"type": 3}}}}}},
     400, "response_format.json_schema.schema"),
    ("a schema no JSON satisfies", "/v1/chat/completions", {"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}},
     400, "response_format.json_schema.schema"),
    ("json_object with stop strings", "/v1/chat/completions",
     {"messages": HI, "stop": ["}"], "response_format": {"type": "json_object"}}, 400, "stop"),
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("body not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "tiny-gemma"}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "narrator", "content": "x"}]}, 400, "messages[0].role"),
    ("roles out of order", "/v1/chat/completions", {"messages": HI + HI}, 400, "messages"),
    ("late system message", "/v1/chat/completions", {"messages": HI + [{"role": "system", "content": "x"}]}, 400, "messages"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4", "messages": HI}, 404, "model"),
    ("temperature a string", "/v1/chat/completions", {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("negative temperature", "/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, None),
    ("zero max_tokens", "/v1/chat/completions", {"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ("zero max_completion_tokens", "/v1/chat/completions", {"messages": HI, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    ("top_logprobs > 20", "/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logprobs > 20", "/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("n > 1", "/v1/chat/completions", {"messages": HI, "n": 2}, 400, "n"),
    ("stop a number", "/v1/chat/completions", {"messages": HI, "stop": 5}, 400, "stop"),
    ("prompt past the context", "/v1/completions", {"prompt": LONG}, 400, None),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("echo", "/v1/completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("image on a text model", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]}, 400, None),
    ("file path image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "messages[0].content[0].image_url.url"),
    ("file URL image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400, "messages[0].content[0].image_url.url"),
    ("unknown part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]}, 400, "messages[0].content[0].type"),
]
OLLAMA_BAD = [
    ("malformed JSON", "/api/chat", b"{nope", 400),
    ("messages not a list", "/api/chat", {"messages": {"role": "user"}}, 400),
    ("content a list", "/api/chat", {"messages": [{"role": "user", "content": [1]}]}, 400),
    ("unknown model", "/api/chat", {"model": "llama3", "messages": HI}, 404),
    ("unknown model (generate)", "/api/generate", {"model": "llama3:8b", "prompt": "x"}, 404),
    ("unknown model (show)", "/api/show", {"model": "llama3"}, 404),
    ("options not an object", "/api/chat", {"messages": HI, "options": [1]}, 400),
    ("num_predict 0", "/api/chat", {"messages": HI, "options": {"num_predict": 0}}, 400),
    ("temperature a string", "/api/generate", {"prompt": "x", "options": {"temperature": "x"}}, 400),
    ("prompt past the context", "/api/generate", {"prompt": LONG, "raw": True}, 400),
    ("undecodable base64", "/api/generate", {"prompt": "x", "images": ["%%%not base64%%%"]}, 400),
    ("file path image", "/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["/etc/passwd"]}]}, 400),
    ("format not json or a schema", "/api/chat", {"messages": HI, "format": "xml"}, 400),
    ("format an invalid schema", "/api/generate", {"prompt": "x", "format": {"type": "nonsense"}}, 400),
    ("format with stop strings", "/api/chat", {"messages": HI, "format": "json", "options": {"stop": ["}"]}}, 400),
]


@pytest.mark.parametrize("name,path,body,status,param", OPENAI_BAD, ids=[c[0] for c in OPENAI_BAD])
def test_openai_bad_requests(srv, name, path, body, status, param):
    kw = {"content": body, "headers": {**AUTH, **JSON}} if isinstance(body, bytes) else {"json": body, "headers": AUTH}
    r = httpx.post(srv.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"
    if name == "prompt past the context":
        assert err["code"] == "context_length_exceeded"
    assert post(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("name,path,body,status", OLLAMA_BAD, ids=[c[0] for c in OLLAMA_BAD])
def test_ollama_bad_requests(srv, name, path, body, status):
    kw = {"content": body, "headers": {**AUTH, **JSON}} if isinstance(body, bytes) else {"json": body, "headers": AUTH}
    r = httpx.post(srv.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = post(srv, "/api/generate", {"prompt": "ok", "stream": False, "options": {"num_predict": 2}})
    assert ok.status_code == 200 and ok.json()["done"]


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_bad_images_on_a_vision_model(vsrv, api):
    for bad in (base64.b64encode(b"not an image at all").decode(), "AAAA"):
        if api == "openai":
            r = httpx.post(f"{vsrv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + bad}}]}]})
            assert r.status_code == 400 and r.json()["error"]["message"]
        else:
            r = httpx.post(f"{vsrv.url}/api/chat", json={"messages": [{"role": "user", "content": "x", "images": [bad]}]})
            assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(f"{vsrv.url}/api/generate", json={"prompt": "x", "stream": False, "options": {"num_predict": 2}})
    assert r.status_code == 200


def test_unknown_route_and_method(srv):
    r = httpx.get(srv.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(srv.url + "/api/chat", headers=AUTH)
    assert r.status_code == 405 and isinstance(r.json()["error"], str)


class _FailingHandle:
    """Gives one event, then fails as an engine error would."""

    prompt_tokens = 1
    cancelled = False

    def cancel(self):
        self.cancelled = True

    async def events(self):
        from mlx_gemma_qat.server.engine import Event

        yield Event("x", 5)
        raise RuntimeError("engine exploded")


def test_engine_failure_is_a_500_or_an_error_chunk(srv, monkeypatch, caplog):
    """An unexpected failure answers 500 (or ends the stream with an error) in each API's shape; what failed is
    in the server's log, never in the answer."""
    handles = []

    def submit(ids, params, pixels=None, **kw):
        handles.append(_FailingHandle())
        return handles[-1]

    monkeypatch.setattr(srv.engine, "submit", submit)
    caplog.set_level("ERROR")
    r = post(srv, "/v1/chat/completions", {"messages": HI})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "engine exploded" not in r.text and "RuntimeError" not in r.text
    r = post(srv, "/api/chat", {"messages": HI, "stream": False})
    assert r.status_code == 500 and isinstance(r.json()["error"], str) and "exploded" not in r.text
    with pytest.raises(openai.APIError, match="generation failed"):
        list(openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="tiny-gemma", messages=HI, stream=True))
    with httpx.stream("POST", srv.url + "/api/chat", json={"messages": HI}, headers=AUTH, timeout=60) as r:
        lines = ndjson(r)
    assert lines[0]["message"]["content"] == "x" and "generation failed" in lines[-1]["error"]
    assert "exploded" not in json.dumps(lines)
    assert all(h.cancelled for h in handles)
    def logged():  # uvicorn logs a handler's failure after its 500 is sent: it may come a moment later
        return [rec for rec in caplog.records if rec.exc_info and "engine exploded" in str(rec.exc_info[1])]

    deadline = time.monotonic() + 10
    while len(logged()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(logged()) == 4  # each failure, with its traceback, in the log
    monkeypatch.undo()
    assert post(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


# -- concurrency and cancellation ---------------------------------------------------------------------------


def test_concurrent_clients_get_what_each_gets_alone(srv, client):
    prompts = ["one", "two two", "three is a number", "four", "five five five", "six?", "seven.", "eight, nine"]
    want = [generate(srv.model, srv.tok, [{"role": "user", "content": p}], 12) for p in prompts]
    got = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait()
        if i % 2:  # half stream, half do not
            chunks = client.chat.completions.create(model="tiny-gemma", messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=12, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            got[i] = client.chat.completions.create(model="tiny-gemma", messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


class _Spy:
    """The engine's handle, noting whether it was cancelled before its last event was read."""

    def __init__(self, handle):
        self.handle, self.finished, self.cancelled_early = handle, False, False
        self.prompt_tokens = handle.prompt_tokens

    def cancel(self):
        self.cancelled_early |= not self.finished
        self.handle.cancel()

    async def events(self):
        async for e in self.handle.events():
            self.finished = e.finish_reason is not None
            yield e


def _spy_on_submit(engine, monkeypatch) -> list:
    spies, real = [], engine.submit

    def submit(*args, **kw):
        spies.append(_Spy(real(*args, **kw)))
        return spies[-1]

    monkeypatch.setattr(engine, "submit", submit)
    return spies


def _until_idle(engine, seconds=10):
    deadline = time.monotonic() + seconds
    while engine.active_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.active_count()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HI, "stream": True, "max_tokens": 230}),
    ("/api/generate", {"prompt": "go on", "raw": True, "options": {"num_predict": 240}}),
])
def test_client_gone_mid_stream_cancels(srv, monkeypatch, path, body):
    spies = _spy_on_submit(srv.engine, monkeypatch)
    with httpx.Client(headers=AUTH, timeout=60) as c:
        with c.stream("POST", srv.url + path, json=body) as r:
            lines = (line for line in r.iter_lines() if line)  # SSE events are separated by blank lines
            got = [next(lines) for _ in range(2)]
    assert len(got) == 2 and not any("[DONE]" in line or '"done": true' in line for line in got)
    assert _until_idle(srv.engine) == 0
    assert len(spies) == 1 and spies[0].cancelled_early
    monkeypatch.undo()
    assert post(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_client_gone_while_waiting_cancels(srv, monkeypatch):
    spies = _spy_on_submit(srv.engine, monkeypatch)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={"prompt": "go on", "max_tokens": 240}, headers=AUTH, timeout=0.3)
    assert _until_idle(srv.engine) == 0
    assert len(spies) == 1 and spies[0].cancelled_early
    monkeypatch.undo()
    assert post(srv, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


# -- the command ----------------------------------------------------------------------------------------------


def test_default_model_id():
    assert default_model_id(None) == "gemma3-270m"
    assert default_model_id("/models/gemma-3-4b-it-q4_0.gguf") == "gemma-3-4b-it-q4_0"
    assert default_model_id("./my-folder/") == "my-folder"
    assert default_model_id("google/gemma-3-1b-it") == "gemma-3-1b-it"


def test_serve_command_builds_the_server(tiny_folder, monkeypatch):
    from click.testing import CliRunner

    from mlx_gemma_qat import cli
    from mlx_gemma_qat.server import app as app_module

    ran = {}
    monkeypatch.setattr(app_module, "run", lambda app, host, port: ran.update(app=app, host=host, port=port))
    args = ["serve", "-m", str(tiny_folder), "--port", "9999", "--api-key", "k", "--temp", "0.5", "--top-k", "5",
            "--max-tokens", "7", "--prompt-cache-size", "3", "--prompt-cache-bytes", "2MiB", "--reuse-slack", "8",
            "--decode-batch", "2", "--prefill-step", "32", "--parallel", "3", "--max-queue", "5", "--max-body", "1MB",
            "--max-images", "2", "--allowed-hosts", "a.example,b.example", "--allowed-hosts", "c.example",
            "--cors-origin", "http://localhost:3000", "--no-cross-client-reuse"]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    assert "serving tiny-gemma on http://127.0.0.1:9999" in res.output
    state = ran["app"].state.server
    assert (ran["host"], ran["port"], state.card.id) == ("127.0.0.1", 9999, "tiny-gemma")
    assert ran["app"].user_middleware[-1].kwargs == {"keys": ("k",)}
    o = state.options
    assert (o.api_keys, o.max_body, o.max_images, o.allowed_hosts, o.cors_origins) == (
        ("k",), 10**6, 2, ("a.example", "b.example", "c.example"), ("http://localhost:3000",))
    assert o.fetch_policy is None and o.cross_client_reuse is False  # image URLs are off unless asked for
    assert (state.defaults.temperature, state.defaults.top_k, state.defaults.max_tokens) == (0.5, 5, 7)
    e = state.engine
    assert (e.pool.max_entries, e.pool.max_bytes, e.slack, e.decode_batch, e.prefill_step) == (3, 2 * 2**20, 8, 2, 32)
    assert (e.parallel, e.max_queue) == (3, 5)
    res = CliRunner().invoke(cli.main, ["serve", "-m", str(tiny_folder), "--model-name", "x", "--prompt-cache-bytes", "2XB"])
    assert res.exit_code != 0 and "not a size" in res.output
    res = CliRunner().invoke(cli.main, ["serve", "-m", str(tiny_folder), "--top-p", "3"])
    assert res.exit_code == 1 and "top_p" in res.output
