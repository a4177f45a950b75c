"""Speculative decoding in the server: a speculating request (a model draft, perfect or poor, or prompt lookup)
answers exactly what plain decoding answers, past the sliding window, with float and 8-bit KV caches, beside
requests that opt out; a stop string that ends a request inside a round leaves a kept cache that holds exactly its
key (a follow-up reuses it and answers as a fresh prompt); constrained output under speculation; the usage extension
field; request fields validated; ``serve`` loading and checking a draft."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import pytest
from conftest import random_model, tiny_config
from served import serve

from mlx_gemma_qat.generate import encode_prompt, generate
from mlx_gemma_qat.server.engine import Engine, RequestError, SamplingParams

PROMPT = list(range(2, 60))  # 58 ids (BOS then 57 "words"): past the tiny model's 16-token window
STATS = {"rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round", "draft_s", "verify_s"}


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from mlx_gemma_qat import load

    model, tok = load(tiny_folder)
    assert model.cfg.sliding_window == 16
    return model, tok


@pytest.fixture(scope="module")
def poor():
    """A draft that shares the vocabulary but not the weights: nearly every draft is rejected."""
    return random_model(tiny_config(vocab_size=512, sliding_window=8), seed=5)


def drafter(kind, tiny, poor) -> dict:
    return {"self": dict(draft_model=tiny[0]), "poor": dict(draft_model=poor), "lookup": dict(prompt_lookup=True)}[kind]


def run(engine, ids, matcher=None, **kw):
    """(tokens, text, last event) of one request, read to the end."""
    events = list(engine.submit(ids, SamplingParams(**kw), matcher=matcher))
    return [e.token for e in events], "".join(e.text for e in events), events[-1]


_plain = {}


def plain(tiny, ids, kv_bits=None, **kw):
    """What a plain engine (no speculation, no kept caches) answers alone (memoized)."""
    key = (tuple(ids), kv_bits, tuple(sorted(kw.items())))
    if key not in _plain:
        with Engine(*tiny, kv_bits=kv_bits, kv_group_size=32, cache_entries=0) as eng:
            _plain[key] = run(eng, ids, **kw)
    return _plain[key]


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("kind", ["self", "poor", "lookup"])
def test_greedy_equals_plain_past_the_window(tiny, poor, kind, kv_bits):
    """80 tokens after a 58-token prompt (the 16-token window wraps many times over, rejected drafts trimmed from
    the rotating and the quantized caches): the very tokens, text and finish reason of plain decoding."""
    want = plain(tiny, PROMPT, kv_bits, max_tokens=80)
    with Engine(*tiny, kv_bits=kv_bits, kv_group_size=32, **drafter(kind, tiny, poor)) as eng:
        got = run(eng, PROMPT, max_tokens=80)
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2].finish_reason == want[2].finish_reason and len(got[0]) > 32  # 8-bit KV: eos after 44 tokens
    s = got[2].usage.speculative
    assert set(s) == STATS and s["rounds"] > 0 and s["drafted"] > 0
    if kind == "self":  # the model drafting for itself: (nearly) every draft kept, several tokens per forward
        assert s["acceptance_rate"] > 0.9 and s["tokens_per_round"] > 3
    if kind == "poor":
        assert s["acceptance_rate"] < 0.2


def test_concurrent_speculating_and_opted_out_requests_equal_alone(tiny):
    """Requests at once, some speculating (the server's k, their own k), some opting out (speculative=False,
    num_draft_tokens=0) and decoded in batches: each answers what it answers alone on a plain engine; the usage
    has the stats exactly when the request speculated. Two sampled speculating requests with the same seed agree."""
    jobs = [(PROMPT, 40, {}), (list(range(2, 40)), 30, dict(speculative=False)),
            (list(range(70, 100)), 25, dict(num_draft_tokens=0)), (list(range(5, 45, 2)), 35, dict(num_draft_tokens=6)),
            (list(range(100, 130)), 20, dict(speculative=False)), (list(range(200, 260)), 33, {})]
    want = [plain(tiny, ids, max_tokens=n) for ids, n, _ in jobs]
    with Engine(*tiny, draft_model=tiny[0], decode_batch=2, prefill_step=8, cache_entries=0) as eng:
        handles = [eng.submit(ids, SamplingParams(max_tokens=n, **kw)) for ids, n, kw in jobs]
        handles += [eng.submit(PROMPT, SamplingParams(max_tokens=30, temperature=0.8, seed=3)) for _ in range(2)]
        events = [list(h) for h in handles]
    for (ids, n, kw), w, ev in zip(jobs, want, events):
        assert [e.token for e in ev] == w[0] and "".join(e.text for e in ev) == w[1]
        s = ev[-1].usage.speculative
        if kw.get("speculative") is False or kw.get("num_draft_tokens") == 0:
            assert s is None
        else:
            assert s["drafted"] > 0 and s["accepted"] > 0
    assert [e.token for e in events[-1]] == [e.token for e in events[-2]]
    assert len(events[-1]) == 30 and events[-1][-1].usage.speculative["rounds"] > 0


def _stop_candidates(text: str) -> list[str]:
    """Short pieces of ``text`` that first occur at different places in it."""
    out = []
    for j in range(6, len(text) - 3, 3):
        s = text[j : j + 3]
        if s.strip() and "\ufffd" not in s and text.find(s) == j and s not in out:
            out.append(s)
    return out[:6]


def test_stop_string_inside_a_round_keeps_an_exact_cache(tiny):
    """A stop string that ends the request inside a round (the cache already holds drafts accepted after it):
    text and finish reason as plain decoding, and the kept cache holds exactly the tokens emitted: a follow-up
    request reuses all of them and answers as a fresh prompt does."""
    k = 4
    _, text, _ = plain(tiny, PROMPT, max_tokens=60)
    ends = []
    with Engine(*tiny, draft_model=tiny[0], num_draft_tokens=k, slack=0) as eng, \
            Engine(*tiny, cache_entries=0) as fresh:
        for stop in _stop_candidates(text):
            want = plain(tiny, PROMPT, max_tokens=60, stop=(stop,))
            tokens, got, last = run(eng, PROMPT, max_tokens=60, stop=(stop,))
            assert (tokens, got, last.finish_reason) == (want[0], want[1], "stop")
            ends.append(len(tokens) % (k + 1))  # the perfect draft's rounds emit k + 1 tokens each
            more = PROMPT + tokens + list(range(300, 310))
            again = run(eng, more, max_tokens=12)
            assert again[2].usage.cached_tokens == len(PROMPT) + len(tokens)
            assert again[0] == run(fresh, more, max_tokens=12)[0]
    assert any(ends), "no stop string ended a request inside a round"


@pytest.mark.parametrize("max_tokens", [1, 2, 6, 11])
def test_max_tokens_equal_plain_and_keep_an_exact_cache(tiny, max_tokens):
    """max_tokens caps the drafts of the last rounds (k = tokens left - 1): the same tokens and finish as plain
    decoding, and the kept cache (all but the last token, as plain decoding keeps) reused exactly."""
    want = plain(tiny, PROMPT, max_tokens=max_tokens)
    with Engine(*tiny, draft_model=tiny[0], num_draft_tokens=4, slack=0) as eng, \
            Engine(*tiny, cache_entries=0) as fresh:
        tokens, text, last = run(eng, PROMPT, max_tokens=max_tokens)
        assert (tokens, text, last.finish_reason) == (want[0], want[1], "length")
        more = PROMPT + tokens + [300, 301, 302]
        again = run(eng, more, max_tokens=8)
        assert again[2].usage.cached_tokens == len(PROMPT) + len(tokens) - 1
        assert again[0] == run(fresh, more, max_tokens=8)[0]


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "tag": {"enum": ["a", "bb", "ccc"]}, "words": {"type": "string"}},
          "required": ["n", "tag", "words"], "additionalProperties": False}


@pytest.mark.parametrize("kind", ["self", "poor", "lookup"])
def test_constrained_request_equals_plain(tiny, poor, kind):
    """A JSON-schema request with speculation (drafts drawn or cut under the grammar's masks, the matcher rolled
    back with the cache) answers what plain constrained decoding answers, beside a free speculating request."""
    from mlx_gemma_qat.constrain import compile_constraint, logits_width

    model, tok = tiny
    c = compile_constraint(json_schema=SCHEMA)
    ids = encode_prompt(tok, "the cat sat on the mat and then the cat sat on the mat again", chat=False)
    with Engine(*tiny, cache_entries=0) as eng:
        want = run(eng, ids, c.matcher(tok, logits_width(model)), max_tokens=48)
    with Engine(*tiny, cache_entries=0, **drafter(kind, tiny, poor)) as eng:
        h = eng.submit(ids, SamplingParams(max_tokens=48), matcher=c.matcher(tok, logits_width(model)))
        free = eng.submit(PROMPT, SamplingParams(max_tokens=30))
        events, free_events = list(h), list(free)
    assert [e.token for e in events] == want[0] and "".join(e.text for e in events) == want[1]
    assert [e.token for e in free_events] == plain(tiny, PROMPT, max_tokens=30)[0]
    if want[2].finish_reason == "stop":
        jsonschema.validate(json.loads(want[1]), SCHEMA)
    assert events[-1].usage.speculative["drafted"] > 0


def test_logprobs_of_accepted_drafts_equal_plain(tiny):
    """Logprobs and top logprobs of accepted drafts come from the verify forward's rows: those of plain decoding."""
    with Engine(*tiny, cache_entries=0) as eng:
        want = list(eng.submit(PROMPT, SamplingParams(max_tokens=12, logprobs=True, top_logprobs=3)))
    with Engine(*tiny, draft_model=tiny[0], cache_entries=0) as eng:
        got = list(eng.submit(PROMPT, SamplingParams(max_tokens=12, logprobs=True, top_logprobs=3)))
    assert got[-1].usage.speculative["accepted"] > 0
    assert [e.token for e in got] == [e.token for e in want]
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in g.top_logprobs] == [t for t, _ in w.top_logprobs]
        assert [v for _, v in g.top_logprobs] == pytest.approx([v for _, v in w.top_logprobs], abs=1e-4)


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_image_request_equals_plain(vlm, kind):
    """An image prompt: the target sees the image, a model draft sees the text around it (its soft tokens skipped),
    and the answer is plain decoding's."""
    from pathlib import Path

    from mlx_gemma_qat.generate import image_token_ids

    _, model, tok = vlm
    img = sorted((Path(__file__).parent / "fixtures" / "images").iterdir())[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it, what is it"}]}]
    ids = encode_prompt(tok, msgs, chat=True, n_images=1, image_ids=image_token_ids(model))
    spec = dict(draft_model=model) if kind == "draft" else dict(prompt_lookup=True)
    out = []
    for opts in ({}, spec):
        with Engine(model, tok, cache_entries=0, **opts) as eng:
            events = list(eng.submit(ids, SamplingParams(max_tokens=24), eng.load_images([img.read_bytes()])))
            out.append(([e.token for e in events], events[-1].usage.speculative))
    assert out[1][0] == out[0][0] and out[0][1] is None and out[1][1]["drafted"] > 0


def test_engine_refuses_bad_settings(tiny, poor):
    from mlx_gemma_qat.speculative import DraftError

    with pytest.raises(DraftError, match="not both"):
        Engine(*tiny, draft_model=poor, prompt_lookup=True)
    with pytest.raises(DraftError, match="needs a draft model"):
        Engine(*tiny, num_draft_tokens=3)
    with pytest.raises(DraftError, match="num_draft_tokens"):
        Engine(*tiny, prompt_lookup=True, num_draft_tokens=0)
    with pytest.raises(DraftError, match="loaded Gemma 3"):
        Engine(*tiny, draft_model="gemma3-270m")
    with Engine(*tiny, prompt_lookup=True) as eng:
        assert eng.speculative and eng.num_draft == 4
        for bad in (dict(speculative="no"), dict(num_draft_tokens=33), dict(num_draft_tokens=-1),
                    dict(num_draft_tokens=True)):
            with pytest.raises(RequestError):
                eng.submit(PROMPT, SamplingParams(**bad))


# -- over HTTP ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lookup_srv(tiny_folder, tiny):
    s = serve(tiny_folder, *tiny, prompt_lookup=True)
    yield s
    s.close()


HI = [{"role": "user", "content": "Say hello and hello again, hello"}]


def post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=60)


def test_openai_usage_extension_and_opt_out(lookup_srv, tiny):
    """The OpenAI answers keep their shape; usage carries ``speculative`` when the request speculated, not when it
    opted out ("speculative": false, or llama.cpp's "speculative.n_max": 0); the text is plain decoding's."""
    want = generate(*tiny, HI, 20)
    body = {"model": "tiny-gemma", "messages": HI, "max_tokens": 20}
    r = post(lookup_srv, "/v1/chat/completions", body).json()
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["choices"][0]["message"]["content"] == want
    assert set(r["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                               "speculative"}
    assert set(r["usage"]["speculative"]) == STATS and r["usage"]["speculative"]["drafted"] > 0
    for off in ({"speculative": False}, {"speculative.n_max": 0}):
        r = post(lookup_srv, "/v1/chat/completions", {**body, **off}).json()
        assert r["choices"][0]["message"]["content"] == want and "speculative" not in r["usage"]
    r = post(lookup_srv, "/v1/chat/completions", {**body, "speculative.n_max": 2}).json()
    assert r["choices"][0]["message"]["content"] == want and r["usage"]["speculative"]["rounds"] > 0
    # streamed, with the usage chunk
    with httpx.stream("POST", lookup_srv.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want
    assert chunks[-1]["usage"]["speculative"]["drafted"] > 0
    # legacy completions
    r = post(lookup_srv, "/v1/completions", {"prompt": "hello hello hello", "max_tokens": 10}).json()
    assert r["usage"]["speculative"]["drafted"] > 0
    r = post(lookup_srv, "/v1/completions", {"prompt": "hello hello hello", "max_tokens": 10,
                                             "speculative": False}).json()
    assert "speculative" not in r["usage"]


def test_ollama_extension_field_and_opt_out(lookup_srv, tiny):
    want = generate(*tiny, HI, 20)
    body = {"model": "tiny-gemma", "messages": HI, "stream": False, "options": {"num_predict": 20}}
    r = post(lookup_srv, "/api/chat", body).json()
    assert r["message"]["content"] == want and set(r["speculative"]) == STATS
    off = post(lookup_srv, "/api/chat", {**body, "options": {"num_predict": 20, "speculative": False}}).json()
    assert off["message"]["content"] == want and "speculative" not in off
    assert set(r) - set(off) == {"speculative"}
    off = post(lookup_srv, "/api/chat", {**body, "options": {"num_predict": 20, "num_draft_tokens": 0}}).json()
    assert "speculative" not in off
    lines = [json.loads(x) for x in post(lookup_srv, "/api/generate", {"prompt": "hello hello hello",
                                                                      "options": {"num_predict": 8}}).text.splitlines()]
    assert lines[-1]["done"] and lines[-1]["speculative"]["drafted"] > 0
    assert all("speculative" not in x for x in lines[:-1])


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"speculative": "no"}, "speculative"),
    ("/v1/chat/completions", {"speculative": 0}, "speculative"),
    ("/v1/chat/completions", {"speculative.n_max": 33}, "speculative.n_max"),
    ("/v1/chat/completions", {"speculative.n_max": -1}, "speculative.n_max"),
    ("/v1/chat/completions", {"speculative.n_max": 2.5}, "speculative.n_max"),
    ("/v1/completions", {"speculative.n_max": True}, "speculative.n_max"),
    ("/api/chat", {"options": {"speculative": "false"}}, "options.speculative"),
    ("/api/generate", {"options": {"num_draft_tokens": "3"}}, "options.num_draft_tokens"),
    ("/api/chat", {"options": {"num_draft_tokens": 99}}, "options.num_draft_tokens"),
])
def test_bad_speculative_fields_are_400(lookup_srv, path, extra, param):
    body = {"model": "tiny-gemma", "max_tokens": 2, "stream": False}
    body.update({"messages": HI} if "chat" in path else {"prompt": "hi"})
    r = post(lookup_srv, path, {**body, **extra})
    assert r.status_code == 400, r.text
    assert param in r.text
    assert post(lookup_srv, path, body).status_code == 200  # the server goes on


# -- the serve command ------------------------------------------------------------------------------------------


def _serve_cli(monkeypatch, *args):
    """``mlx-gemma serve ARGS`` up to where it would listen: (result, the app it would serve or None)."""
    from click.testing import CliRunner

    import mlx_gemma_qat.server.app as app_module
    from mlx_gemma_qat.cli import main

    served = []
    monkeypatch.setattr(app_module, "run", lambda app, host, port: served.append(app))
    r = CliRunner().invoke(main, ["serve", *map(str, args)])
    return r, (served[0] if served else None)


def test_serve_loads_a_draft_and_refuses_one_with_another_vocabulary(tiny_folder, tmp_path, monkeypatch):
    r, app = _serve_cli(monkeypatch, "-m", tiny_folder, "--draft-model", tiny_folder, "--num-draft-tokens", 5)
    assert r.exit_code == 0, r.output
    eng = app.state.server.engine
    assert eng.draft_model is not None and eng.num_draft == 5 and "speculative decoding" in r.output

    r, app = _serve_cli(monkeypatch, "-m", tiny_folder, "--prompt-lookup")
    assert r.exit_code == 0 and app.state.server.engine.prompt_lookup and app.state.server.engine.num_draft == 4

    # a copy of the model whose tokenizer has two pieces swapped
    bad = tmp_path / "bad-draft"
    shutil.copytree(tiny_folder, bad)
    spec = json.loads((bad / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [p for p, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    r, app = _serve_cli(monkeypatch, "-m", tiny_folder, "--draft-model", bad)
    assert r.exit_code == 1 and app is None
    assert "Error: the draft model's vocabulary differs from the target's at 2 of" in r.output

    for args, msg in [(("--draft-model", tiny_folder, "--prompt-lookup"), "not both"),
                      (("--num-draft-tokens", 3), "needs --draft-model or --prompt-lookup"),
                      (("--prompt-lookup", "--num-draft-tokens", 0), "--num-draft-tokens")]:
        r, app = _serve_cli(monkeypatch, "-m", tiny_folder, *args)
        assert r.exit_code == 2 and app is None and msg in r.output
