"""Tool calls through the server on the tiny fixture, spoken to with the official ``openai`` and ``ollama`` clients:
``tool_choice`` required, named, auto and none; calls whole and streamed in OpenAI's delta shape; a conversation
with a call and its result fed back; bad tools and tool choices answered 400 before anything is generated. Each
call's arguments validate (``jsonschema``) against the function's parameters."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from served import serve
from test_server import AUTH, KEY

from mlx_gemma_qat.generate import generate
from mlx_gemma_qat.tools import ToolChoice, parse_reply, parse_tools, render_messages, tool_constraint

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(tiny_folder, tmp_path_factory):
    """The tiny text fixture with a 2,048-token context (the declarations alone are ~700 tokens; RoPE takes any
    position, so only the config changes), served with an API key."""
    import shutil

    from mlx_gemma_qat import load
    from mlx_gemma_qat.server.app import ServerOptions

    folder = tmp_path_factory.mktemp("tools") / "tiny-gemma"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(config))
    s = serve(folder, *load(folder), options=ServerOptions(api_keys=(KEY,)))
    yield s
    s.close()


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


def _valid(name, arguments):
    jsonschema.validate(arguments, SCHEMAS[name])


def _want(srv, messages, choice, parallel=True):
    """What generate gives for the same conversation, tools and choice (greedy), read for calls."""
    tools = parse_tools(TOOLS)
    text = generate(srv.model, srv.tok, render_messages(messages, tools, choice), 120,
                    constraint=tool_constraint(tools, choice, parallel))
    return parse_reply(text, tools)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_openai_required_and_named(client, srv, choice):
    mode = ToolChoice("required") if choice == "required" else ToolChoice("function", "get_time")
    want = _want(srv, ASK, mode, parallel=False)
    r = client.chat.completions.create(model="tiny-gemma", messages=ASK, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=False, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", (c, want)
    assert c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (want.calls[0].name, want.calls[0].arguments)
    _valid(call.function.name, json.loads(call.function.arguments))
    if choice != "required":
        assert call.function.name == "get_time"


def test_openai_streamed_calls_in_the_delta_shape(client, srv):
    whole = client.chat.completions.create(model="tiny-gemma", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, parallel_tool_calls=False)
    chunks = list(client.chat.completions.create(model="tiny-gemma", messages=ASK, tools=TOOLS, stream=True,
                                                 tool_choice="required", max_tokens=120, parallel_tool_calls=False))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(whole.choices[0].message.tool_calls)))
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.choices[0].message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_openai_auto_and_none(client, srv):
    r = client.chat.completions.create(model="tiny-gemma", messages=ASK, tools=TOOLS, max_tokens=60)
    want = _want(srv, ASK, ToolChoice("auto"))
    c = r.choices[0]
    got = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]
    assert got == [(x.name, x.arguments) for x in want.calls] and (c.message.content or None) == (want.content or None)
    # "none": the tools are not shown and nothing is constrained: exactly the reply without tools
    r = client.chat.completions.create(model="tiny-gemma", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert r.choices[0].message.content == generate(srv.model, srv.tok, ASK, 12) and not r.choices[0].message.tool_calls


def test_openai_multi_turn_with_a_tool_result(client, srv):
    first = client.chat.completions.create(model="tiny-gemma", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    r = client.chat.completions.create(model="tiny-gemma", messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=12)
    tools = parse_tools(TOOLS)
    rendered = render_messages(history, tools, ToolChoice("none"))
    assert r.choices[0].message.content == generate(srv.model, srv.tok, rendered, 12)
    text = "".join(m["content"] if isinstance(m["content"], str) else "" for m in rendered)
    assert f"Function {call.function.name} returned:" in text and '{"temperature": 21}' in text
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    # the call, as the history gives it back, is in the prompt in the call syntax
    assert json.dumps({"name": call.function.name, "parameters": json.loads(call.function.arguments)},
                      ensure_ascii=False) in text


def test_ollama_client_tools(srv):
    import ollama

    c = ollama.Client(host=srv.url, headers=AUTH)
    want = _want(srv, ASK, ToolChoice("auto"))
    r = c.chat(model="tiny-gemma", messages=ASK, tools=TOOLS, options={"num_predict": 60})
    got = [(t.function.name, dict(t.function.arguments)) for t in r.message.tool_calls or []]
    assert got == [(x.name, x.arguments) for x in want.calls]
    for name, args in got:
        _valid(name, args)
    parts = list(c.chat(model="tiny-gemma", messages=ASK, tools=TOOLS, options={"num_predict": 60}, stream=True))
    streamed = [(t.function.name, dict(t.function.arguments)) for p in parts for t in p.message.tool_calls or []]
    assert streamed == got and parts[-1].done
    # a result fed back in Ollama's shapes
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
        {"role": "tool", "content": "21 degrees", "tool_name": "get_weather"}]
    r = c.chat(model="tiny-gemma", messages=history, options={"num_predict": 8})
    rendered = render_messages(history, [], ToolChoice("none"))
    assert r.message.content == generate(srv.model, srv.tok, rendered, 8)


def test_ollama_required_tools_on_a_real_shape_reply(srv):
    """Ollama has no tool_choice: with tools, the reply may call them ("auto"); the answer's calls validate."""
    r = httpx.post(srv.url + "/api/chat", headers=AUTH, timeout=120, json={
        "messages": ASK, "tools": TOOLS[:1], "stream": False, "options": {"num_predict": 60, "temperature": 0.9,
                                                                         "seed": 5}}).json()
    for call in r["message"].get("tool_calls", []):
        _valid(call["function"]["name"], call["function"]["arguments"])


BAD = [
    ("tools not a list", {"tools": {"x": 1}}, "tools"),
    ("a tool without a name", {"tools": [{"type": "function", "function": {"parameters": WEATHER}}]}, None),
    ("parameters not an object schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]}, None),
    ("tool_choice naming an unknown function", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ("tool_choice not a choice", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tools and a response format", {"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ("tools and stop strings", {"tools": TOOLS, "stop": ["\n"]}, "stop"),
]


@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tools_are_a_400_before_generating(srv, monkeypatch, name, extra, param):
    def never(*a, **k):
        raise AssertionError("nothing may be generated")

    monkeypatch.setattr(srv.engine, "submit", never)
    r = httpx.post(srv.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={"messages": ASK, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param
    r = httpx.post(srv.url + "/api/chat", headers=AUTH, timeout=60, json={"messages": ASK, **extra})
    if "tool_choice" not in extra and "response_format" not in extra and "stop" not in extra:
        assert r.status_code == 400 and isinstance(r.json()["error"], str)
