"""The whole structured-output proof on the real Gemma 3 270M (the embedded default, or ``--model``).

Every JSON schema of ``tests/fixtures/app_schemas.json`` (22 of the kinds apps send), greedy and sampled, through
the Python API and through the server (the official ``openai`` client, four clients at a time; ``--ollama`` also
Ollama's client with ``format``): each output must parse, validate with the ``jsonschema`` package and finish with
"stop". Then tool calls (required, a named function, auto, a result fed back) through both official clients. Prints
a Markdown table of every run (``--out`` writes it too) and exits 1 if any run failed.

The test suite runs a subset of this (``tests/test_structured_real.py``: the 2-core CPU decodes the 270M at about
3.5 tokens/s); this script is the full check: about 25 minutes there.

    python scripts/check_structured_real.py --out scripts/check_structured_real_results.md
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CASES = json.loads((ROOT / "tests" / "fixtures" / "app_schemas.json").read_text())
TEMPERATURE, TOP_P = 0.8, 0.95


def verdict(text: str, finish: str, schema: dict) -> str:
    if finish != "stop":
        return f"FAIL ({finish})"
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as e:
        return f"FAIL ({type(e).__name__})"
    return "valid"


def run_api(model, tok, max_tokens: int) -> list[dict]:
    from mlx_gemma_qat import stream_generate
    from mlx_gemma_qat.constrain import compile_constraint

    rows = []
    for i, case in enumerate(CASES):
        constraint = compile_constraint(json_schema=case["schema"])
        for mode in ("greedy", "sampled"):
            kw = {"temp": TEMPERATURE, "top_p": TOP_P, "seed": i} if mode == "sampled" else {}
            rs = list(stream_generate(model, tok, [{"role": "user", "content": case["prompt"]}], max_tokens,
                                      constraint=constraint, **kw))
            text = "".join(r.text for r in rs)
            rows.append({"path": "API", "mode": mode, "name": case["name"], "tokens": rs[-1].generation_tokens,
                         "finish": rs[-1].finish_reason, "verdict": verdict(text, rs[-1].finish_reason, case["schema"]),
                         "text": text})
            print(f"API {mode:7s} {case['name']:18s} {rows[-1]['verdict']:6s} {text}", flush=True)
    return rows


def run_server(url: str, model_id: str, max_tokens: int, clients: int = 4) -> list[dict]:
    rows, lock = [], threading.Lock()
    jobs = [(i, mode) for i in range(len(CASES)) for mode in ("greedy", "sampled")]

    def work(mine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for i, mode in mine:
            case = CASES[i]
            kw = {"temperature": TEMPERATURE, "top_p": TOP_P, "seed": i} if mode == "sampled" else {"temperature": 0}
            r = client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": case["prompt"]}], max_tokens=max_tokens,
                response_format={"type": "json_schema", "json_schema": {"name": case["name"], "schema": case["schema"],
                                                                         "strict": True}}, **kw)
            c = r.choices[0]
            row = {"path": "server", "mode": mode, "name": case["name"], "tokens": r.usage.completion_tokens,
                   "finish": c.finish_reason, "verdict": verdict(c.message.content, c.finish_reason, case["schema"]),
                   "text": c.message.content}
            with lock:
                rows.append(row)
            print(f"server {mode:7s} {case['name']:18s} {row['verdict']:6s} {row['text']}", flush=True)

    threads = [threading.Thread(target=work, args=(jobs[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {(c["name"], m): k for k, (c, m) in enumerate((c, m) for c in CASES for m in ("greedy", "sampled"))}
    return sorted(rows, key=lambda r: order[(r["name"], r["mode"])])


def run_tools(url: str, model_id: str) -> list[dict]:
    import ollama
    from test_structured_real import ASK, SCHEMAS, TOOLS

    rows = []

    def record(path, what, finish, calls, content):
        ok = all(name in SCHEMAS and not list(jsonschema.Draft202012Validator(SCHEMAS[name]).iter_errors(args))
                 for name, args in calls)
        verdict_ = ("valid" if ok else "FAIL") if calls else ("text" if content else "FAIL")
        shown = "; ".join(f"{n}({json.dumps(a)})" for n, a in calls) or repr(content)[:80]
        rows.append({"path": path, "mode": what, "name": "tools", "tokens": "", "finish": finish, "verdict": verdict_,
                     "text": shown})
        print(f"{path} {what:12s} {verdict_:6s} {shown}", flush=True)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for what, choice in (("required", "required"), ("named", {"type": "function", "function": {"name": "web_search"}}),
                         ("auto", "auto")):
        c = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=80).choices[0]
        record("openai", what, c.finish_reason,
               [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []],
               c.message.content)
    first = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": first.tool_calls[0].id,
                                                           "content": '{"temperature": 18, "sky": "clear"}'}]
    c = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, max_tokens=40).choices[0]
    record("openai", "after result", c.finish_reason,
           [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []], c.message.content)
    o = ollama.Client(host=url)  # Ollama has no tool_choice and allows several calls
    r = o.chat(model=model_id, messages=ASK, tools=TOOLS, options={"num_predict": 80})
    calls = [(t.function.name, dict(t.function.arguments)) for t in r.message.tool_calls or []]
    record("ollama", "auto", "calls" if calls else r.done_reason, calls, r.message.content)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to load (default: the embedded 270M)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()

    from served import serve

    from mlx_gemma_qat import load
    from mlx_gemma_qat.models_cache import resolve_model

    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    model, tok = load(folder)
    rows = run_api(model, tok, args.max_tokens)
    s = serve(folder, model, tok, max_tokens=args.max_tokens)
    try:
        rows += run_server(s.url, s.card.id, args.max_tokens)
        rows += run_tools(s.url, s.card.id)
    finally:
        s.close()
    failed = [r for r in rows if r["verdict"].startswith("FAIL")]
    schema_rows = [r for r in rows if r["name"] != "tools"]
    lines = [
        "## Structured output on the real Gemma 3 270M", "",
        f"`python scripts/check_structured_real.py` ({len(CASES)} schemas of `tests/fixtures/app_schemas.json`; "
        f"greedy, and sampled at temperature {TEMPERATURE}, top-p {TOP_P}; max_tokens {args.max_tokens}; "
        f"{time.perf_counter() - t0:.0f} s). {len(schema_rows) - sum(r['verdict'] != 'valid' for r in schema_rows)}"
        f" of {len(schema_rows)} schema runs parsed, validated with `jsonschema` and ended with \"stop\".", "",
        "| path | mode | schema | tokens | finish | verdict | output |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        text = r["text"] if r["text"] is not None else ""
        lines.append(f"| {r['path']} | {r['mode']} | {r['name']} | {r['tokens']} | {r['finish']} | {r['verdict']} | "
                     f"`{text.replace('|', '¦')[:120]}` |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
