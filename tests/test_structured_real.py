"""Structured output and tool calls on the real Gemma 3 270M, a subset of ``scripts/check_structured_real.py`` (the
full check: all 22 schemas of ``fixtures/app_schemas.json``, greedy and sampled, through the API and the server;
about 25 minutes on a 2-core CPU, which decodes the 270M at ~3.5 tokens/s). Here: schemas covering every kind apps
send (nested objects, arrays with min/max items, enums, anyOf with null, bounded numbers, string patterns and
lengths, additionalProperties false), greedy through the Python API and sampled through the
server (the official ``openai`` and ``ollama`` clients): every output parses, validates with the ``jsonschema``
package and finishes with "stop". Tool calls under required, a named function and auto, and a conversation with a
result fed back, through both clients."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jsonschema
import openai
import pytest
from test_server import _serve

from mlx_gemma_qat import load, stream_generate

CASES = {c["name"]: c for c in json.loads((Path(__file__).parent / "fixtures" / "app_schemas.json").read_text())}
GREEDY = ["order", "optional_nickname"]  # nested, array min/max, patterns; anyOf null (enums, numbers: SAMPLED)
SAMPLED = ["nested_config", "email"]  # nested objects, enums, bounded integers; string pattern and lengths
MAX_TOKENS = 160  # ample: the longest greedy answer takes 79 tokens


@pytest.fixture(scope="module")
def real(real_270m):
    model, tok = load(real_270m)
    s = _serve(real_270m, model, tok)
    yield s
    s.close()


def _chat(case):
    return [{"role": "user", "content": case["prompt"]}]


@pytest.mark.real
def test_app_schemas_greedy_through_the_api(real):
    assert len(CASES) >= 20
    for case in (CASES[n] for n in GREEDY):
        rs = list(stream_generate(real.model, real.tok, _chat(case), MAX_TOKENS, json_schema=case["schema"]))
        text = "".join(r.text for r in rs)
        assert rs[-1].finish_reason == "stop", (case["name"], text)
        jsonschema.validate(json.loads(text), case["schema"])


@pytest.mark.real
def test_app_schemas_sampled_through_the_server(real):
    """Two schemas sampled (temperature 0.8, top-p 0.95, a seed each), two clients at once; one more through
    Ollama's client with ``format`` set to the schema."""
    out, errors = {}, []
    cases = [CASES[n] for n in SAMPLED]

    def ask(indices):
        client = openai.OpenAI(base_url=f"{real.url}/v1", api_key="unused", max_retries=0)
        for i in indices:
            case = cases[i]
            try:
                r = client.chat.completions.create(
                    model="gemma3-270m", messages=_chat(case), max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95,
                    seed=i, response_format={"type": "json_schema", "json_schema": {
                        "name": case["name"], "schema": case["schema"], "strict": True}})
                out[i] = r.choices[0]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((case["name"], e))

    threads = [threading.Thread(target=ask, args=([k],)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors and len(out) == len(cases)
    for i, choice in out.items():
        assert choice.finish_reason == "stop", (cases[i]["name"], choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), cases[i]["schema"])

    import ollama

    c = ollama.Client(host=real.url)
    for case in [CASES["rating"]]:
        r = c.chat(model="gemma3-270m", messages=_chat(case), format=case["schema"],
                   options={"num_predict": MAX_TOKENS, "temperature": 0.8, "seed": 7})
        assert r.done_reason == "stop"
        jsonschema.validate(json.loads(r.message.content), case["schema"])


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60},
                                           "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "web_search", "description": "Search the web",
                                           "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "web_search": SEARCH}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


def _calls_valid(calls):
    assert calls
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.real
def test_tool_calls_through_both_clients(real):
    """Required and a named function through OpenAI's client (one call each: a base model, the 270M repeats its call
    on the next line when it may make several); Ollama's client with tools (its only mode is auto: calls or text).
    The requests share the tools' prompt, so each after the first starts from the kept KV cache.
    (``scripts/check_structured_real.py`` also runs OpenAI's auto and a call's result fed back, which the tiny
    model's tests cover in both APIs' shapes.)"""
    client = openai.OpenAI(base_url=f"{real.url}/v1", api_key="unused", max_retries=0)
    replies = {}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for name, choice in (("required", "required"), ("named", named)):
        c = client.chat.completions.create(model="gemma3-270m", messages=ASK, tools=TOOLS, tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=40).choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        _calls_valid([(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls])
        replies[name] = c.message
    assert replies["named"].tool_calls[0].function.name == "get_weather"

    import ollama

    o = ollama.Client(host=real.url)
    r = o.chat(model="gemma3-270m", messages=ASK, tools=TOOLS, options={"num_predict": 24})
    if r.message.tool_calls:
        _calls_valid([(t.function.name, dict(t.function.arguments)) for t in r.message.tool_calls])
    else:  # text, which ends as text does
        assert r.message.content and r.message.content[0] != "{" and r.done_reason in ("stop", "length")
