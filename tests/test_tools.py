"""Gemma 3 tool calls (tools.py): declarations and tool_choice read and checked, chats with calls and results
rendered for the template, the calls grammar run on the tiny model, replies parsed whole and streamed."""

import json
import random
import re
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest

from mlx_gemma_qat import load, stream_generate
from mlx_gemma_qat.constrain import ConstraintError
from mlx_gemma_qat.generate import encode_prompt
from mlx_gemma_qat.tools import (
    CallStream,
    StreamItem,
    Tool,
    ToolCall,
    ToolChoice,
    ToolError,
    parse_reply,
    parse_tool_choice,
    parse_tools,
    render_messages,
    tool_constraint,
    tools_prompt,
)

# Schemas with bounded sizes, so that the tiny model's random weights close every call within ~60 tokens.
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
NOTE = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 6}}, "required": ["text"],
        "additionalProperties": False}
TOOLS_JSON = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "note", "parameters": NOTE}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: no arguments
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny fixture model (random weights; its tokenizer spells most text a character a token)."""
    from mlx_gemma_qat.convert import convert

    folder = convert(Path(__file__).parent / "fixtures" / "tiny_gemma3", tmp_path_factory.mktemp("t") / "m",
                     mode="none", progress=False)
    return load(folder)


@pytest.fixture(scope="module")
def tools():
    return parse_tools(TOOLS_JSON)


# -- declarations and tool_choice ---------------------------------------------------------------------------

def test_parse_tools_reads_the_openai_shape(tools):
    assert [t.name for t in tools] == ["get_weather", "note", "now"]
    assert tools[0] == Tool("get_weather", "The weather", WEATHER)
    assert tools[1].description is None
    assert tools[2].parameters == {"type": "object", "properties": {}, "additionalProperties": False}
    # "type" may be left out (some Ollama clients), and so may the schema's own "type"
    (t,) = parse_tools([{"function": {"name": "a-b_1", "parameters": {"properties": {"x": {"type": "string"}}}}}])
    assert t.parameters == {"type": "object", "properties": {"x": {"type": "string"}}}
    assert parse_tools(None) == [] and parse_tools([]) == []
    assert t.declaration() == {"name": "a-b_1", "parameters": t.parameters}
    assert tools[0].declaration() == {"name": "get_weather", "description": "The weather", "parameters": WEATHER}


def fn(**function):
    return {"type": "function", "function": function}


@pytest.mark.parametrize("bad, message, param", [
    ({"type": "function"}, "must be a list", "tools"),
    ("get_weather", "must be a list", "tools"),
    (["get_weather"], "must be an object", "tools[0]"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "only \"function\" tools", "tools[0].type"),
    ([{"type": "function"}], "'tools[0].function' must be an object", "tools[0].function"),
    ([fn(description="no name")], "'tools[0].function.name' is missing", "tools[0].function.name"),
    ([fn(name="")], "not a valid function name", "tools[0].function.name"),
    ([fn(name="get weather")], "not a valid function name", "tools[0].function.name"),
    ([fn(name="x" * 65)], "not a valid function name", "tools[0].function.name"),
    ([fn(name="f.g")], "not a valid function name", "tools[0].function.name"),
    ([fn(name=7)], "not a valid function name", "tools[0].function.name"),
    ([fn(name="f", description=3)], "description' must be a string", "tools[0].function.description"),
    ([fn(name="f", parameters=[])], "must be a JSON schema object", "tools[0].function.parameters"),
    ([fn(name="f", parameters="{}")], "must be a JSON schema object", "tools[0].function.parameters"),
    ([fn(name="f", parameters={"type": "string"})], "must describe an object", "tools[0].function.parameters"),
    ([fn(name="f"), fn(name="g"), fn(name="f")], "declared twice", "tools[2].function.name"),
    ([fn(name="f", parameters={"type": "object", "properties": {"x": {"type": "strin"}}})], "invalid JSON schema",
     "tools[0].function.parameters"),
    ([fn(name="f", parameters={"type": "object", "properties": {"x": {"$ref": "#/$defs/nowhere"}}})],
     "invalid JSON schema", "tools[0].function.parameters"),
    ([fn(name="f", parameters={"type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)"}}})],
     "invalid JSON schema", "tools[0].function.parameters"),
])
def test_parse_tools_refuses(bad, message, param):
    with pytest.raises(ToolError, match=re.escape(message)) as e:
        parse_tools(bad)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)


def test_parse_tool_choice(tools):
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice("auto", tools) == ToolChoice("auto")
    assert parse_tool_choice("none", tools) == ToolChoice("none")
    assert parse_tool_choice("required", tools) == ToolChoice("required")
    named = parse_tool_choice({"type": "function", "function": {"name": "note"}}, tools)
    assert named == ToolChoice("function", "note") and named.calls_allowed
    assert not parse_tool_choice("none", tools).calls_allowed
    # without tools, "auto" (or nothing) calls nothing
    assert parse_tool_choice(None, []) == ToolChoice("none") == parse_tool_choice("auto", [])


@pytest.mark.parametrize("bad, message", [
    ("sometimes", "is not one of"),
    ("", "is not one of"),
    (1, "must be a string or an object"),
    (["auto"], "must be a string or an object"),
    ({"type": "tool", "function": {"name": "note"}}, "must be \"function\""),
    ({"type": "function"}, "name' is missing"),
    ({"type": "function", "function": "note"}, "name' is missing"),
    ({"type": "function", "function": {"name": 3}}, "name' is missing"),
    ({"type": "function", "function": {"name": "gone"}}, "'gone', which is not in 'tools'"),
])
def test_parse_tool_choice_refuses(tools, bad, message):
    with pytest.raises(ToolError, match=re.escape(message)) as e:
        parse_tool_choice(bad, tools)
    assert e.value.param.startswith("tool_choice")


def test_required_or_named_without_tools_is_refused():
    with pytest.raises(ToolError, match="no tools"):
        parse_tool_choice("required", [])
    with pytest.raises(ToolError, match="not in 'tools'"):
        parse_tool_choice({"type": "function", "function": {"name": "f"}}, [])


# -- rendering a chat -----------------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [  # OpenAI: arguments as JSON text
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Oslo","days":2}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "3 C"}]},
    {"role": "assistant", "content": "Paris 21 C, Oslo 3 C."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Note this picture."}]},
    {"role": "assistant", "content": "Noting.", "tool_calls": [  # Ollama: arguments as an object, no id
        {"function": {"name": "note", "arguments": {"text": "pic"}}}]},
    {"role": "tool", "tool_name": "note", "content": "saved"},
    {"role": "user", "content": "Thanks. What time is it?"},
]


def test_render_messages_alternates_and_renders(tiny, tools):
    _, tok = tiny
    out = render_messages(CHAT, tools, ToolChoice("auto"))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert all(set(m) == {"role", "content"} for m in out)
    system = out[0]["content"]
    assert system.startswith(tools_prompt(tools)) and system.endswith("\n\nBe brief.")
    assert system.startswith("You have access to functions. If you decide to invoke any of the function(s), you MUST "
                             "put it in the format of\n{\"name\": function name, \"parameters\": dictionary of "
                             "argument name and its value}\n")
    assert "You SHOULD NOT include any other text in the response if you call a function\n[\n" in system
    for t in tools:
        assert json.dumps(t.declaration()) in system
    # calls in the call syntax, one per line, compact JSON with ", " and ": "
    assert out[2]["content"] == ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}\n'
                                 '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}')
    # both results in one user turn, named by their call ids
    assert out[3]["content"] == ("Function get_weather returned:\n```tool_output\n21 C\n```\n\n"
                                 "Function get_weather returned:\n```tool_output\n3 C\n```")
    assert out[5]["content"] == [{"type": "image"}, {"type": "text", "text": "Note this picture."}]  # untouched
    assert out[6]["content"] == 'Noting.\n{"name": "note", "parameters": {"text": "pic"}}'
    # the result and the user message after it share a turn
    assert out[7]["content"] == ("Function note returned:\n```tool_output\nsaved\n```\n\nThanks. What time is it?")
    text = tok.decode(encode_prompt(tok, out, chat=True))
    assert text.count("<start_of_turn>user") == 4 and text.count("<start_of_turn>model") == 4  # 3 + the prompt
    assert "<start_of_turn>model\n{\"name\": \"get_weather\"" in text
    assert CHAT[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris", "days": 1}'  # input unchanged


def test_render_messages_without_a_system_message_or_with_none(tiny, tools):
    _, tok = tiny
    chat = [{"role": "user", "content": "hi"}]
    out = render_messages(chat, tools, ToolChoice("required"))
    assert out == [{"role": "system", "content": tools_prompt(tools)}, {"role": "user", "content": "hi"}]
    text = tok.decode(encode_prompt(tok, out, chat=True))
    assert text.startswith("<bos><start_of_turn>user\nYou have access to functions.")
    assert text.endswith("hi<end_of_turn>\n<start_of_turn>model\n")
    # "none": no declarations, but the history's calls and results are still rendered
    out = render_messages(CHAT, tools, ToolChoice("none"))
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[3]["content"].startswith("Function get_weather returned:")
    assert render_messages(chat, [], ToolChoice("none")) == chat
    # a tool result whose function cannot be named, and text items merged as the template joins them unspaced
    out = render_messages([{"role": "user", "content": [{"type": "text", "text": "a"}]},
                           {"role": "assistant", "content": "b"},
                           {"role": "tool", "content": "c"},
                           {"role": "user", "content": [{"type": "text", "text": "d"}, {"type": "image"}]}],
                          tools, ToolChoice("none"))
    assert out[2]["content"] == [{"type": "text", "text": "Function returned:\n```tool_output\nc\n```\n\nd"},
                                 {"type": "image"}]
    encode_prompt(tok, out, chat=True)


@pytest.mark.parametrize("call, message", [
    ({"id": "c", "type": "function", "function": {"name": "note", "arguments": "{not json"}}, "is not JSON"),
    ({"function": {"name": "note", "arguments": "[1]"}}, "must be a JSON object"),
    ({"function": {"arguments": {}}}, "function.name' must be"),
    ({"name": "note"}, "must be an object with a \"function\""),
])
def test_render_messages_refuses_malformed_calls(tools, call, message):
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(ToolError, match=re.escape(message)) as e:
        render_messages(chat, tools, ToolChoice("auto"))
    assert e.value.param.startswith("messages[1].tool_calls[0]")


# -- the grammar ------------------------------------------------------------------------------------------------

def accepts(constraint, tok, text: str) -> bool:
    """Whether ``text`` is a complete output under ``constraint`` (False if it is refused on the way)."""
    m = constraint.matcher(tok, 512)
    try:
        for t in tok.encode(text, add_special_tokens=False):
            m.consume(t)
    except ConstraintError:
        return False
    return m.accepting


def test_grammar_accepts_calls_and_refuses_the_rest(tiny, tools):
    _, tok = tiny
    w1 = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
    n1 = '{"name": "note", "parameters": {"text": "hi"}}'
    now = '{"name": "now", "parameters": {}}'
    bad = ['{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}',  # not in the enum
           '{"name": "get_weather", "parameters": {"city": "Paris", "days": 9}}',  # past the maximum
           '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # a required argument missing
           '{"name":"note","parameters":{"text":"hi"}}',  # not the compact form's separators
           '{"parameters": {"text": "hi"}, "name": "note"}',  # "name" first
           '{"name": "note", "parameters": {"text": "hi"}, "id": 1}',  # no other keys
           '{"name": "other", "parameters": {}}',
           '{"name": "now", "parameters": {"x": 1}}',  # a function without parameters takes none
           w1 + "\n",
           " " + w1]
    required = tool_constraint(tools, ToolChoice("required"), parallel=False)
    assert required.kind == "tools"
    assert all(accepts(required, tok, s) for s in (w1, n1, now))
    assert not any(accepts(required, tok, s) for s in bad + [w1 + "\n" + n1, "hello", ""])
    parallel = tool_constraint(tools, ToolChoice("required"), parallel=True)
    assert accepts(parallel, tok, w1 + "\n" + n1 + "\n" + now) and accepts(parallel, tok, n1)
    assert not accepts(parallel, tok, w1 + "\n\n" + n1) and not accepts(parallel, tok, w1 + " " + n1)
    named = tool_constraint(tools, ToolChoice("function", "note"), parallel=True)
    assert accepts(named, tok, n1) and accepts(named, tok, n1 + "\n" + n1)
    assert not accepts(named, tok, w1) and not accepts(named, tok, n1 + "\n" + w1)
    auto = tool_constraint(tools, ToolChoice("auto"), parallel=False)
    assert all(accepts(auto, tok, s) for s in (w1, now, "", "It is sunny.", " " + w1, "x{\n}"))
    assert not any(accepts(auto, tok, s) for s in bad[:-1] + [w1 + "\n" + n1, "{}", "{ hello"])
    assert tool_constraint(tools, ToolChoice("none"), parallel=True) is None
    assert tool_constraint([], ToolChoice("auto"), parallel=True) is None
    assert tool_constraint(tools, ToolChoice("required"), parallel=True) is parallel  # compiled once


def test_grammar_keeps_references_of_each_schema(tiny):
    _, tok = tiny
    defs = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
            "additionalProperties": False,
            "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 5},
                                                              "next": {"$ref": "#/$defs/P"}},
                            "required": ["x"], "additionalProperties": False}},
            "$schema": "https://json-schema.org/draft/2020-12/schema"}
    enum_named = {"type": "object", "properties": {"enum": {"enum": ["a"]}, "$ref": {"type": "integer"}},
                  "required": ["enum"], "additionalProperties": False}
    tools = parse_tools([fn(name="f", parameters=enum_named), fn(name="g", parameters=defs)])
    c = tool_constraint(tools, ToolChoice("required"), parallel=False)
    assert accepts(c, tok, '{"name": "g", "parameters": {"p": {"x": 1, "next": {"x": 5}}}}')
    assert not accepts(c, tok, '{"name": "g", "parameters": {"p": {"x": 1, "next": {"x": 6}}}}')
    assert accepts(c, tok, '{"name": "f", "parameters": {"enum": "a", "$ref": 2}}')


# -- generating calls -------------------------------------------------------------------------------------------

def chunked(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(0, 7)
        out.append(text[i:i + n])
        i += n
    return out


def streamed(text: str, tools, seed: int) -> tuple[str | None, list[tuple[str, dict]], list[StreamItem]]:
    """``text`` read by a CallStream in random-size chunks: (its text or None, its calls, all items)."""
    stream = CallStream(tools)
    items = []
    for piece in chunked(text, random.Random(seed)):
        items += stream.feed(piece)
    items += stream.finish()
    texts = [i.text for i in items if i.text is not None]
    calls = [(i.call.name, i.call.arguments) for i in items if i.call is not None]
    assert [i.index for i in items if i.call is not None] == list(range(len(calls)))
    assert all((i.text is None) != (i.call is None) for i in items)
    return ("".join(texts) if texts else None), calls, items


def check_reply(text: str, tools, finish: str):
    """parse_reply's reading of ``text``, checked against the schemas and against a CallStream's."""
    reply = parse_reply(text, tools)
    schemas = {t.name: t.parameters for t in tools}
    for call in reply.calls:
        jsonschema.validate(call.arguments, schemas[call.name])
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        assert json.loads(call.arguments_json) == call.arguments
    if reply.calls and finish == "stop":
        assert reply.content is None  # the grammar allows nothing but calls once a call starts
    for seed in range(3):
        content, calls, _ = streamed(text, tools, seed)
        assert calls == [(c.name, c.arguments) for c in reply.calls]
        assert content == (reply.content or None)
    return reply


def generate_text(tiny, constraint, temp: float, seed: int | None, sampler=None, max_tokens: int = 200):
    model, tok = tiny
    rs = list(stream_generate(model, tok, "Call:", max_tokens, chat=False, constraint=constraint, temp=temp,
                              seed=seed, sampler=sampler))
    return "".join(r.text for r in rs), rs[-1].finish_reason


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "note"),
                                    ToolChoice("function", "get_weather")], ids=lambda c: c.name or c.mode)
@pytest.mark.parametrize("temp, seed", [(0.0, None), (1.0, 3)], ids=["greedy", "sampled"])
def test_one_call_when_parallel_calls_are_off(tiny, tools, choice, temp, seed):
    text, finish = generate_text(tiny, tool_constraint(tools, choice, parallel=False), temp, seed)
    assert finish == "stop", text  # the grammar closes the call and allows only the end after it
    reply = check_reply(text, tools, finish)
    assert len(reply.calls) == 1 and reply.content is None
    assert choice.name in (None, reply.calls[0].name)


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "note")],
                         ids=lambda c: c.name or c.mode)
@pytest.mark.parametrize("temp, seed", [(0.0, None), (1.0, 2), (1.0, 5)], ids=["greedy", "sampled2", "sampled5"])
def test_parallel_calls(tiny, tools, choice, temp, seed):
    text, finish = generate_text(tiny, tool_constraint(tools, choice, parallel=True), temp, seed)
    reply = check_reply(text, tools, finish)
    assert reply.calls  # a run cut by max_tokens may end in a call's first part, which is then text
    assert all(c.name == choice.name for c in reply.calls) if choice.name else True
    if finish == "length" and reply.content is not None:
        assert text.endswith(reply.content) and reply.content.startswith("{")


@pytest.mark.parametrize("temp, seed", [(0.0, None), (1.0, 1), (1.0, 2)], ids=["greedy", "sampled1", "sampled2"])
def test_auto_answers_text_or_calls(tiny, tools, temp, seed):
    _, tok = tiny
    auto = tool_constraint(tools, ToolChoice("auto"), parallel=True)
    text, finish = generate_text(tiny, auto, temp, seed, max_tokens=60)
    reply = check_reply(text, tools, finish)
    if not text.startswith("{"):
        assert reply == parse_reply(text, tools) and reply.calls == [] and reply.content == text
    brace = tok.encode("{", add_special_tokens=False)[0]

    def opens_calls(logprobs):  # "{" where it is allowed (the first token), else the best allowed token
        best = mx.argmax(logprobs, axis=-1)
        return mx.where(logprobs[:, brace] > -mx.inf, brace, best)

    def never_opens(logprobs):
        return mx.argmax(logprobs.at[:, brace].add(-mx.inf), axis=-1)

    text, finish = generate_text(tiny, auto, 0.0, None, sampler=opens_calls)
    reply = check_reply(text, tools, finish)
    assert text.startswith("{") and reply.calls
    text, finish = generate_text(tiny, tool_constraint(tools, ToolChoice("auto"), parallel=False), 0.0, None,
                                 sampler=opens_calls)
    reply = check_reply(text, tools, finish)
    assert finish == "stop" and len(reply.calls) == 1 and reply.content is None
    text, finish = generate_text(tiny, auto, 0.0, None, sampler=never_opens, max_tokens=40)
    assert parse_reply(text, tools).content == text and not text.startswith("{")


# -- reading replies ----------------------------------------------------------------------------------------------

W = '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}'
N = '{"name": "note", "parameters": {"text": "a}\\"{[b"}}'  # braces and an escaped quote inside a string


def test_parse_reply(tools):
    r = parse_reply(W + "\n" + N, tools)
    assert r.content is None
    assert [(c.name, c.arguments) for c in r.calls] == [("get_weather", {"city": "Oslo", "days": 2}),
                                                        ("note", {"text": 'a}"{[b'})]
    assert r.calls[0].id != r.calls[1].id
    assert parse_reply("It is sunny.", tools).content == "It is sunny." and not parse_reply("x", tools).calls
    assert parse_reply("", tools).content == ""
    assert parse_reply(" " + W, tools).calls == []  # a call reply starts with "{"
    assert parse_reply(W + "\n\n " + N + "\n", tools).content is None  # whitespace between calls is skipped
    for text in ('{"name": "other", "parameters": {}}', '{"name": "note"}', '{"name": "note", "parameters": 1}',
                 '{"name": "note", "parameters": {}, "x": 1}', "{not json}", "{", '{"a": [1, 2}'):
        r = parse_reply(text, tools)
        assert r.calls == [] and r.content == text, text
    r = parse_reply(W + '\n{"name": "note", "parameters": {"te', tools)  # cut by max_tokens
    assert len(r.calls) == 1 and r.content == '{"name": "note", "parameters": {"te'
    r = parse_reply(W + "\nDone.", tools)
    assert len(r.calls) == 1 and r.content == "Done."


def test_call_stream_emits_text_at_once_and_calls_when_they_close(tools):
    s = CallStream(tools)
    assert s.feed("") == []
    assert s.feed("Hel") == [StreamItem(text="Hel")] and not s.is_calls
    assert s.feed("lo {") == [StreamItem(text="lo {")]
    assert s.finish() == []

    s = CallStream(tools)
    assert s.feed(W[:-1]) == [] and s.is_calls
    (item,) = s.feed(W[-1] + "\n" + N[:20])
    assert item.index == 0 and item.call.name == "get_weather" and item.text is None
    assert s.feed(N[20:-2]) == []  # the braces inside the string close nothing
    (item,) = s.feed(N[-2:] + "\n")
    assert item.index == 1 and item.call.arguments == {"text": 'a}"{[b'}
    assert s.finish() == [] and [c.name for c in s.calls] == ["get_weather", "note"]

    s = CallStream(tools)
    assert [i.call.name for i in s.feed(W + "\n")] == ["get_weather"]
    assert s.feed("  Then") == [StreamItem(text="Then")]  # not a call: the rest is text
    assert s.feed(' {"x"') == [StreamItem(text=' {"x"')]

    s = CallStream(tools)
    s.feed(W + "\n")
    assert s.feed('{"name": "no') == []
    assert s.finish() == [StreamItem(text='{"name": "no')]  # a call cut short


def test_tool_call_shapes():
    call = ToolCall("get_weather", {"city": "Zürich", "days": 1}, id="call_0")
    assert call.arguments_json == '{"city": "Zürich", "days": 1}'
    assert call.openai() == {"id": "call_0", "type": "function",
                             "function": {"name": "get_weather", "arguments": call.arguments_json}}
    assert call.openai(index=2) == {"index": 2, **call.openai()}
    assert call.ollama() == {"function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 1}}}
    assert ToolCall("f", {}).id != ToolCall("f", {}).id


def test_render_messages_refuses_tool_calls_that_are_not_a_list(tools):
    chat = [{"role": "user", "content": None}, {"role": "assistant", "tool_calls": {"function": {"name": "now"}}}]
    with pytest.raises(ToolError, match="must be a list") as e:
        render_messages(chat, tools, ToolChoice("auto"))
    assert e.value.param == "messages[1].tool_calls"
    assert render_messages(chat[:1], tools, ToolChoice("none")) == [{"role": "user", "content": ""}]
