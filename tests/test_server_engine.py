"""The server's engine: concurrent requests answered as if alone, KV reuse across requests (past the sliding
window, equal to a fresh prompt), cancellation, bounded kept caches, seeded sampling, logprobs, bad requests."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from mlx_gemma_qat import generate
from mlx_gemma_qat.generate import ContextLengthError, encode_prompt, image_token_ids
from mlx_gemma_qat.image import ImageError, normalize
from mlx_gemma_qat.server.engine import Engine, QueueFull, RequestError, SamplingParams
from mlx_gemma_qat.server.reuse import CachePool, prompt_key

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from mlx_gemma_qat import load

    return load(tiny_folder)


def run(engine, ids, **kw):
    """(text, last event) of one request, read to the end."""
    events = list(engine.submit(ids, SamplingParams(**kw)))
    return "".join(e.text for e in events), events[-1]


PROMPTS = ["hello world", "the cat sat on", "one two three four five six seven eight nine ten eleven twelve",
           "a", "zebra crossing at night", "many words here and there", "x y z", "last one"]


@pytest.mark.parametrize("decode_batch,dtype", [(1, None), (4, None), (4, "bfloat16")])
def test_concurrent_requests_equal_alone(tiny_folder, decode_batch, dtype):
    """Eight requests at once (prefill and decode interleaved, batched or one after another) each get the text
    ``generate`` gives alone, with their own max_tokens (also on the GPU path: bfloat16 compute)."""
    from mlx_gemma_qat import load

    model, tok = load(tiny_folder, dtype=dtype)
    lengths = [20, 5, 12, 20, 1, 17, 9, 14]
    want = [generate(model, tok, p, n, chat=False) for p, n in zip(PROMPTS, lengths)]
    with Engine(model, tok, decode_batch=decode_batch, prefill_step=4, cache_entries=0) as eng:
        handles = [eng.submit(encode_prompt(tok, p, chat=False), SamplingParams(max_tokens=n))
                   for p, n in zip(PROMPTS, lengths)]
        assert eng.active_count() > 0
        events = [list(h) for h in handles]
        assert eng.active_count() == 0
    assert ["".join(e.text for e in ev) for ev in events] == want
    for ev, n in zip(events, lengths):
        u = ev[-1].usage
        assert u.completion_tokens == len(ev) <= n and u.cached_tokens == 0
        assert ev[-1].finish_reason in ("stop", "length") and all(e.finish_reason is None for e in ev[:-1])


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "tag": {"enum": ["a", "bb", "ccc"]}},
          "required": ["n", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("decode_batch,dtype", [(1, None), (4, None), (4, "bfloat16")])
def test_constrained_and_free_requests_in_the_same_rounds(tiny_folder, decode_batch, dtype):
    """Constrained requests (a JSON schema, greedy and sampled) run beside free ones, batched or one after another
    (also bfloat16, the GPU path), and each gets what ``generate`` gives alone with the same constraint."""
    from mlx_gemma_qat import load
    from mlx_gemma_qat.constrain import compile_constraint, logits_width

    model, tok = load(tiny_folder, dtype=dtype)
    c = compile_constraint(json_schema=SCHEMA)
    jobs = [(p, i % 2 == 0, 0.0 if i < 4 else 0.9) for i, p in enumerate(PROMPTS)]
    want = [generate(model, tok, p, 40, chat=False, constraint=c if on else None, temp=t, seed=i)
            for i, (p, on, t) in enumerate(jobs)]
    with Engine(model, tok, decode_batch=decode_batch, prefill_step=4, cache_entries=0) as eng:
        handles = [eng.submit(encode_prompt(tok, p, chat=False), SamplingParams(max_tokens=40, temperature=t, seed=i),
                              matcher=c.matcher(tok, logits_width(model)) if on else None)
                   for i, (p, on, t) in enumerate(jobs)]
        events = [list(h) for h in handles]
    got = ["".join(e.text for e in ev) for ev in events]
    for (p, on, t), text, w, ev in zip(jobs, got, want, events):
        if t == 0.0:  # sampled requests draw from the engine's own per-request generator, not generate's
            assert text == w
        if on:
            assert ev[-1].finish_reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA)


def gen(engine, ids, n):
    """(tokens, last event) of one greedy request."""
    events = list(engine.submit(ids, SamplingParams(max_tokens=n)))
    return [e.token for e in events], events[-1]


def test_reuse_past_window_equals_fresh(tiny):
    """A conversation's second and third turns reuse the kept cache (far past the 16-token sliding window) and
    answer exactly as a fresh prompt does. A turn whose copy of the last reply differs in its last tokens
    (within the slack) still reuses; one that differs further back reuses the turn before.

    (Turns are built from token ids: the tiny random model's replies are byte soup that does not survive a
    round trip through text; the real-weights server test goes through the chat template.)"""
    model, tok = tiny
    assert model.cfg.sliding_window == 16
    user = lambda text: tok.encode(f"<end_of_turn>\n<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
                                   add_special_tokens=False)
    with Engine(model, tok, slack=8) as eng, Engine(model, tok, cache_entries=0) as fresh:
        ids1 = encode_prompt(tok, [{"role": "user", "content": "tell me a long story about the sea and ships"}], chat=True)
        reply1, last1 = gen(eng, ids1, 24)
        assert len(ids1) > 16 and last1.usage.cached_tokens == 0 and last1.finish_reason == "length"
        ids2 = ids1 + reply1 + user("and then what")
        reply2, last2 = gen(eng, ids2, 24)
        assert reply2 == gen(fresh, ids2, 24)[0]
        # all but the last reply token were fed back into the cache (generation stopped at max_tokens)
        assert last2.usage.cached_tokens == len(ids1) + len(reply1) - 1
        # the second reply's last 3 tokens re-rendered differently: trimmed back within the slack
        ids3 = ids2 + reply2[:-3] + user("why")
        reply3, last3 = gen(eng, ids3, 8)
        assert reply3 == gen(fresh, ids3, 8)[0]
        assert last3.usage.cached_tokens == len(ids2) + len(reply2) - 3
        # the second reply changed from its 2nd token: past the slack, the first turn's cache serves it
        ids4 = ids2 + reply2[:1] + user("something else entirely") + reply2
        reply4, last4 = gen(eng, ids4, 8)
        assert reply4 == gen(fresh, ids4, 8)[0]
        assert last4.usage.cached_tokens == len(ids1) + len(reply1) - 1
    with Engine(model, tok, slack=0) as eng:  # without slack only exact extensions reuse
        gen(eng, ids2, 24)
        assert gen(eng, ids3, 8)[1].usage.cached_tokens == 0
        reply3, _ = gen(eng, ids3, 8)
        assert gen(eng, ids3 + reply3 + [5, 6], 4)[1].usage.cached_tokens == len(ids3) + len(reply3) - 1


def test_regenerate_same_prompt_reuses_all_but_last_token(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "the same prompt twice, which is longer than the window of sixteen", chat=False)
    with Engine(model, tok) as eng:
        a, first = run(eng, ids, max_tokens=6)
        b, second = run(eng, ids, max_tokens=6)
    assert a == b and first.usage.cached_tokens == 0 and second.usage.cached_tokens == len(ids) - 1


def test_seeded_sampling_is_independent_of_other_requests(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "sample me", chat=False)
    params = dict(max_tokens=16, temperature=1.5, top_k=50, top_p=0.95, min_p=0.01, seed=7)
    with Engine(model, tok, cache_entries=0) as eng:
        alone, _ = run(eng, ids, **params)
        others = [eng.submit(encode_prompt(tok, p, chat=False), SamplingParams(max_tokens=10, temperature=1.0))
                  for p in PROMPTS[:3]]
        again, _ = run(eng, ids, **params)
        other_seed, _ = run(eng, ids, **{**params, "seed": 8})
        for h in others:
            list(h)
    assert alone == again and alone != other_seed


def test_logprobs_and_stop_strings(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "one two three", chat=False)
    with Engine(model, tok) as eng:
        events = list(eng.submit(ids, SamplingParams(max_tokens=10, logprobs=True, top_logprobs=5)))
        full = "".join(e.text for e in events)
        for e in events:
            assert len(e.top_logprobs) == 5 and e.logprob <= 0
            vals = [v for _, v in e.top_logprobs]
            assert vals == sorted(vals, reverse=True)
            assert e.top_logprobs[0] == (e.token, pytest.approx(e.logprob))  # greedy: the sampled token is the top
        stop = full[3:6]
        text, last = run(eng, ids, max_tokens=10, stop=(stop,))
    assert text == full[: full.index(stop)] and last.finish_reason == "stop"


def test_cancel_frees_the_request(tiny):
    model, tok = tiny
    with Engine(model, tok) as eng:
        h = eng.submit(encode_prompt(tok, "go on and on", chat=False), SamplingParams(max_tokens=200))
        it = iter(h)
        next(it)
        h.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled" and eng.active_count() == 0
        assert len(eng.pool) == 0  # its cache was dropped, not kept
        text, _ = run(eng, encode_prompt(tok, "still serving", chat=False), max_tokens=3)
        assert len(eng.pool) == 1


def test_bad_requests(tiny):
    model, tok = tiny
    with Engine(model, tok) as eng:
        with pytest.raises(ContextLengthError, match="context is 256"):
            eng.submit(list(range(2, 258)), SamplingParams())
        for bad in (dict(max_tokens=0), dict(max_tokens=-1), dict(temperature=-1), dict(top_p=2.0),
                    dict(top_logprobs=21), dict(top_k=-3)):
            with pytest.raises(RequestError):
                eng.submit([2, 10], SamplingParams(**bad))
        with pytest.raises(RequestError, match="empty"):
            eng.submit([], SamplingParams())
        with pytest.raises(RequestError, match="text-only"):
            eng.load_images([b"x"])
        # a prompt close to the context gets only what fits
        text, last = run(eng, list(range(2, 252)), max_tokens=50)
        assert last.usage.completion_tokens <= 6


def test_pool_bounds_and_lru(tiny):
    model, tok = tiny
    cache = model.make_cache()
    import mlx.core as mx

    model(mx.array([[2, 3, 4, 5]]), cache=cache)
    n = sum(c.nbytes for c in cache)
    pool = CachePool(max_entries=2)
    for k in range(3):
        pool.put(np.array([2, 3, 4, 10 + k]), cache)
    assert len(pool) == 2
    assert pool.take(np.array([2, 3, 4, 10, 7]))[1] == 3  # the first was dropped: only the shared 3 tokens
    assert pool.take(np.array([2, 3, 4, 12, 7]))[1] == 4
    pool = CachePool(max_entries=8, max_bytes=2 * n)
    for k in range(3):
        pool.put(np.array([2, 3, 4, 10 + k]), cache)
    assert len(pool) == 2 and pool.nbytes <= 2 * n
    assert len(CachePool(max_entries=8, max_bytes=n - 1).put(np.array([1]), cache) or []) == 0


def test_image_tokens_are_keyed_by_pixels():
    ids = [2, 5, 9, 9, 9, 6, 9, 9, 9, 7]
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] = 1
    ka, kb = prompt_key(ids, a, 9), prompt_key(ids, b, 9)
    assert (ka[:6] == kb[:6]).all() and (ka[6:9] != kb[6:9]).all() and ka[9] == kb[9] == 7
    assert len(set(ka[2:5])) == 1 and ka[2] < 0


def test_images_reused_only_when_the_same(vlm):
    """Two requests with the same text and different images: the second reuses nothing of the image and answers
    as a fresh prompt does; the same image again is reused up to the prompt's end."""
    _, model, tok = vlm
    imgs = sorted((FIX / "images").iterdir())[:2]
    with Engine(model, tok) as eng, Engine(model, tok, cache_entries=0) as fresh:
        outs = []
        for img in (imgs[0], imgs[1], imgs[0]):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]}]
            ids = encode_prompt(tok, msgs, chat=True, n_images=1, image_ids=image_token_ids(model))
            pixels = eng.load_images([img.read_bytes()])
            text, last = run_px(eng, ids, pixels)
            assert text == run_px(fresh, ids, pixels)[0]
            outs.append((text, last.usage.cached_tokens))
            first_image = ids.index(image_token_ids(model)[2])
        assert outs[0][1] == 0 and outs[1][1] <= first_image and outs[2][1] == len(ids) - 1
        with pytest.raises(RequestError, match="image"):
            eng.submit(ids, SamplingParams(), None)
        with pytest.raises(RequestError, match="bytes"):  # never a path or a URL: the engine reads no file
            eng.load_images(["/etc/passwd"])
        with pytest.raises(ImageError, match="readable"):
            eng.load_images([b"not an image"])
        with pytest.raises(RequestError, match="8-bit RGB"):  # float pixel values are not what submit takes
            eng.submit(ids, SamplingParams(), normalize(pixels))


def run_px(engine, ids, pixels):
    events = list(engine.submit(ids, SamplingParams(max_tokens=6), pixels))
    return "".join(e.text for e in events), events[-1]


def test_parallel_slots_and_a_bounded_queue(tiny):
    """parallel=1: a request is admitted only when none runs; beyond one waiting, QueueFull at once; a cancelled
    waiting request leaves the queue without running."""
    model, tok = tiny
    with Engine(model, tok, parallel=1, max_queue=1) as eng:
        running_at_admission, real = [], eng._admit

        def admit(r):
            running_at_admission.append(len(eng._active))
            real(r)

        eng._admit = admit
        a = eng.submit([2, 10, 11], SamplingParams(max_tokens=20))
        b = eng.submit([2, 12, 13], SamplingParams(max_tokens=5))
        with pytest.raises(QueueFull):
            eng.submit([2, 14], SamplingParams())
        assert not eng.has_room()
        ea, eb = list(a), list(b)
        assert running_at_admission == [0, 0] and ea[-1].usage.completion_tokens == 20
        assert eb[-1].usage.queued_s > 0 and eng.has_room()
        c = eng.submit([2, 10, 11], SamplingParams(max_tokens=200))
        d = eng.submit([2, 15], SamplingParams(max_tokens=5))
        d.cancel()
        assert [e.finish_reason for e in d] == ["cancelled"]
        c.cancel()
        assert list(c)[-1].finish_reason == "cancelled"
        assert len(running_at_admission) == 3  # d never ran
