"""Perplexity, KL divergence and compare on tiny conversions, checked against a numpy computation from each
model's full-sequence logits (one forward pass, no cache); logits files; bad input."""

import json
import math
import struct
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_factory import TINY
from mlx_gemma_qat import load
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.evaluate import kl_divergence, perplexity
from mlx_gemma_qat.evaluate.reference import LogitsFile, LogitsFileError
from mlx_gemma_qat.evaluate.windows import WindowError, plan_windows

TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat near the door; "
        "a bird sings in the tall tree and the sun rises over the quiet hills. ") * 6


@pytest.fixture(scope="module")
def tiny():
    """Three conversions of the tiny checkpoint: float (the reference), Q4_0 re-grid, 4-bit affine g32."""
    from mlx_gemma_qat.convert import convert

    root = Path(tempfile.mkdtemp())
    out = {"float": convert(TINY, root / "float", mode="none", progress=False),
           "q4_0": convert(TINY, root / "q4_0", mode="q4_0", progress=False),
           "affine": convert(TINY, root / "affine", mode="affine", bits=4, group_size=32, progress=False)}
    models = {k: load(v) for k, v in out.items()}
    ids = np.array(models["float"][1].encode(TEXT), np.int32)
    assert ids[0] == 2 and ids.size > 200
    return out, {k: m for k, (m, _) in models.items()}, ids


def full_logprobs(model, window: np.ndarray) -> np.ndarray:
    """float64 log-softmax of one forward pass over the whole window (no cache, no chunks)."""
    lg = np.array(model(mx.array(window)[None])[0].astype(mx.float32), np.float64)
    m = lg.max(-1, keepdims=True)
    return lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))


def numpy_scored(model, ids, context, stride=None):
    """(log-probs at scored positions, targets) by the definitions in windows.py, written out directly."""
    lps, tgts = [], []
    if stride is None:
        for k in range(ids.size // context):
            w = ids[k * context:(k + 1) * context].copy()
            w[0] = 2
            lp = full_logprobs(model, w)
            lps.append(lp[context // 2:context - 1])
            tgts.append(w[context // 2 + 1:])
    else:
        k, end = 0, 1
        while k * stride + context <= ids.size:
            w = ids[k * stride:k * stride + context].copy()
            w[0] = 2
            lp = full_logprobs(model, w)
            first = end - k * stride - 1  # the first not-yet-scored token's predicting position
            lps.append(lp[first:context - 1])
            tgts.append(w[first + 1:])
            end = k * stride + context
            k += 1
    return np.concatenate(lps), np.concatenate(tgts)


def test_windows_follow_llama_cpp_and_stride_scores_every_token_once():
    w = plan_windows(1000, 256)
    assert (w.count, w.first(0), w.scored(1), w.total_scored, w.unused_tokens) == (3, 128, 127, 381, 232)
    s = plan_windows(1000, 256, 64)
    covered = []
    for k in range(s.count):
        covered += list(range(s.start(k) + s.first(k) + 1, s.start(k) + 256))
    assert covered == list(range(1, s.start(s.count - 1) + 256))  # each token once, in order
    with pytest.raises(WindowError, match="larger than the model's context"):
        plan_windows(10_000, 4096, max_context=2048)
    with pytest.raises(WindowError, match="shorter than one window"):
        plan_windows(100, 256)
    with pytest.raises(WindowError, match="--stride 300"):
        plan_windows(1000, 256, 300)


@pytest.mark.parametrize("stride", [None, 40])
def test_perplexity_through_the_cache_equals_full_passes(tiny, stride):
    """Windows of 96 tokens (6x the sliding window of 16) in chunks of 24 through the rotating caches."""
    _, models, ids = tiny
    m = models["q4_0"]
    lp, t = numpy_scored(m, ids, 96, stride)
    nll = -lp[np.arange(t.size), t]
    r = perplexity(m, ids, context=96, stride=stride, chunk=24)
    assert r.tokens == t.size and r.windows == r.windows_planned
    np.testing.assert_allclose(r.nll, nll, atol=2e-4)
    assert math.isclose(r.ppl, math.exp(nll.mean()), rel_tol=1e-4)
    assert math.isclose(r.ppl_error, r.ppl * nll.std() / math.sqrt(nll.size - 1), rel_tol=1e-3)


def test_token_nll_scores_every_position_of_one_window(tiny):
    from mlx_gemma_qat.evaluate.scoring import token_nll

    _, models, ids = tiny
    lp = full_logprobs(models["q4_0"], ids[:100])
    np.testing.assert_allclose(token_nll(models["q4_0"], ids[:100], chunk=32), -lp[np.arange(99), ids[1:100]],
                               atol=2e-4)


def test_kld_statistics_match_numpy(tiny):
    _, models, ids = tiny
    q, ref = models["affine"], models["float"]
    lq, t = numpy_scored(q, ids, 64)
    lr, _ = numpy_scored(ref, ids, 64)
    idx = np.arange(t.size)
    kld = (np.exp(lr) * (lr - lq)).sum(-1)
    nll, nll_r = -lq[idx, t], -lr[idx, t]
    dp = np.exp(-nll) - np.exp(-nll_r)
    s = kl_divergence(q, ids, ref_model=ref, context=64, chunk=16).stats
    assert s.tokens == t.size
    np.testing.assert_allclose(s.kld_mean, kld.mean(), rtol=1e-3)
    np.testing.assert_allclose(s.kld_error, kld.std() / math.sqrt(kld.size - 1), rtol=1e-2)
    np.testing.assert_allclose([s.kld_max, s.kld_min, s.kld_percentiles["99"], s.kld_percentiles["50"],
                                s.kld_percentiles["5"]],
                               [kld.max(), kld.min(), *np.percentile(kld, [99, 50, 5])], rtol=2e-3)
    assert s.same_top == np.mean(lq.argmax(-1) == lr.argmax(-1))
    np.testing.assert_allclose([s.dp_mean, s.dp_rms, s.dp_max, s.dp_min, s.dp_percentiles["75"]],
                               [dp.mean(), np.sqrt((dp ** 2).mean()), dp.max(), dp.min(), np.percentile(dp, 75)],
                               rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose([s.ppl, s.ppl_base, s.ppl_ratio], [math.exp(nll.mean()), math.exp(nll_r.mean()),
                                                                  math.exp(nll.mean() - nll_r.mean())], rtol=1e-4)
    cov = np.cov(nll, nll_r, bias=True)[0, 1]
    assert math.isclose(s.log_ppl_correlation, cov / (nll.std() * nll_r.std()), rel_tol=1e-3)
    assert s.kld_mean > 0 and 0 < s.same_top < 1


def test_logits_file_is_llama_cpp_format_and_gives_the_same_kld(tiny, tmp_path):
    _, models, ids = tiny
    f = tmp_path / "ref.logits"
    p = perplexity(models["float"], ids, context=64, save_logits=f)
    raw = f.read_bytes()
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", raw[8:20])
    assert raw[:8] == b"_logits_" and (n_ctx, n_chunk) == (64, ids.size // 64)
    assert np.array_equal(np.frombuffer(raw[20:20 + 4 * 64 * n_chunk], np.int32), ids[:64 * n_chunk])
    row = 2 * ((n_vocab + 1) // 2) + 4
    assert len(raw) == 20 + 4 * 64 * n_chunk + 2 * row * p.tokens
    scale, lo = struct.unpack("<ff", raw[20 + 4 * 64 * n_chunk:][:8])
    assert 0 < scale <= 16 / 65535 + 1e-9 and lo < 0  # 16 nats below the top on 65,535 steps
    from_file = kl_divergence(models["q4_0"], ids, ref_logits=f).stats
    direct = kl_divergence(models["q4_0"], ids, ref_model=models["float"], context=64).stats
    assert abs(from_file.kld_mean - direct.kld_mean) < 2e-4 + 0.01 * direct.kld_mean
    assert from_file.same_top == direct.same_top
    # the format floors log-probs at 16 nats below the top one: this random model's targets often sit lower
    assert from_file.ppl_base <= direct.ppl_base
    assert math.isclose(from_file.ppl, direct.ppl, rel_tol=1e-6)


def test_top_k_file_is_a_lower_bound_and_exact_at_the_full_vocabulary(tiny, tmp_path):
    _, models, ids = tiny
    vocab = models["float"].cfg.vocab_size
    direct = kl_divergence(models["q4_0"], ids, ref_model=models["float"], context=64, stride=32).stats
    for k in (8, vocab):
        f = tmp_path / f"top{k}.logits"
        perplexity(models["float"], ids, context=64, stride=32, save_logits=f, logits_top_k=k)
        lf = LogitsFile(f)  # checks the size: header + tokens + (4 + 8k) bytes per scored token
        lf.close()
        assert (lf.top_k, lf.windows.context, lf.windows.stride) == (k, 64, 32)
        s = kl_divergence(models["q4_0"], ids, ref_logits=f).stats
        assert s.same_top == direct.same_top and math.isclose(s.ppl_base, direct.ppl_base, rel_tol=1e-5)
        if k == vocab:
            assert math.isclose(s.kld_mean, direct.kld_mean, rel_tol=1e-4)
        else:
            assert s.kld_mean <= direct.kld_mean + 1e-7 and s.kld_mean > 0


def test_interrupt_returns_the_completed_windows_and_keeps_no_file(tiny, tmp_path, monkeypatch):
    import importlib

    mod = importlib.import_module("mlx_gemma_qat.evaluate.perplexity")

    _, models, ids = tiny
    real = mod.scored_logprobs

    def stop_in_third_window(*a, **kw):
        for p in real(*a, **kw):
            if p.window == 2:
                raise KeyboardInterrupt
            yield p

    monkeypatch.setattr(mod, "scored_logprobs", stop_in_third_window)
    f = tmp_path / "ref.logits"
    r = perplexity(models["float"], ids, context=64, chunk=16, save_logits=f)
    assert r.interrupted and r.windows == 2 and r.tokens == 2 * 31 and r.windows_planned == ids.size // 64
    assert "interrupted after 2 of" in r.format()
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .partial

    def fail_in_second_window(*a, **kw):
        for p in real(*a, **kw):
            if p.window == 1:
                raise RuntimeError("disk full")
            yield p

    monkeypatch.setattr(mod, "scored_logprobs", fail_in_second_window)
    with pytest.raises(RuntimeError, match="disk full"):
        perplexity(models["float"], ids, context=64, chunk=16, save_logits=f)
    assert list(tmp_path.iterdir()) == []


def test_bad_references_and_settings_are_refused(tiny, tmp_path):
    folders, models, ids = tiny
    m = models["q4_0"]
    f = tmp_path / "ref.logits"
    perplexity(models["float"], ids, context=64, save_logits=f)
    raw = f.read_bytes()
    (tmp_path / "cut.logits").write_bytes(raw[:-100])
    with pytest.raises(LogitsFileError, match="truncated"):
        kl_divergence(m, None, ref_logits=tmp_path / "cut.logits")
    (tmp_path / "junk.logits").write_bytes(b"hello world, not logits" * 4)
    with pytest.raises(LogitsFileError, match="not a logits file"):
        kl_divergence(m, None, ref_logits=tmp_path / "junk.logits")
    from conftest import random_model, tiny_config

    small = random_model(tiny_config(vocab_size=300))
    perplexity(small, ids % 300, context=64, save_logits=tmp_path / "vocab.logits")
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        kl_divergence(m, None, ref_logits=tmp_path / "vocab.logits")
    shifted = ids.copy()
    shifted[70] = (shifted[70] + 1) % 100
    with pytest.raises(ValueError, match="other tokens"):
        kl_divergence(m, shifted, ref_logits=f)
    with pytest.raises(LogitsFileError, match="no --stride"):
        perplexity(models["float"], ids, context=64, stride=32, save_logits=tmp_path / "s.logits")
    with pytest.raises(WindowError, match="model's context"):
        perplexity(m, np.tile(ids, 3), context=m.cfg.max_position_embeddings * 2)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        kl_divergence(m, ids, ref_model=small, context=64)


def test_cli_perplexity_kld_compare(tiny, tmp_path):
    folders, _, ids = tiny
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    run = CliRunner().invoke
    f = str(tmp_path / "ref.logits")
    r = run(main, ["perplexity", "-m", str(folders["float"]), "--text", str(text), "-c", "64", "--json",
                   "--save-logits", f])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["windows"] == ids.size // 64 and d["tokens"] == 31 * d["windows"] and d["ppl"] > 1
    assert d["logits_file"] == f
    r = run(main, ["kld", "-m", str(folders["q4_0"]), "--ref-logits", f, "--quiet"])
    assert r.exit_code == 0, r.output
    assert "Mean    KLD:" in r.output and "Same top p:" in r.output and "99.9%   KLD:" in r.output
    r = run(main, ["kld", "-m", str(folders["q4_0"]), "--ref-logits", f, "--windows", "2", "--json", "--quiet"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tokens"] == 2 * 31, r.output
    png = tmp_path / "cmp.png"
    r = run(main, ["compare", f"Q4_0={folders['q4_0']}", str(folders["affine"]), "--ref", str(folders["float"]),
                   "--text", str(text), "-c", "64", "--windows", "2", "--kv-bits", "8", "--kv-group-size", "32", "--decode-tokens", "4",
                   "--plot", str(png), "--quiet"])
    assert r.exit_code == 0, r.output
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [c.split("|")[1].strip() for c in table[1:]] == ["float", "Q4_0", "Q4_0, KV 8-bit", "affine",
                                                            "affine, KV 8-bit"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run(main, ["perplexity", "-m", str(folders["float"]), "--text", str(text), "-c", "4096"])
    assert r.exit_code == 1 and "Error: " in r.output and "context" in r.output
    (tmp_path / "empty.txt").write_text("")
    r = run(main, ["perplexity", "-m", str(folders["float"]), "--text", str(tmp_path / "empty.txt")])
    assert r.exit_code == 1 and "no text" in r.output
    (tmp_path / "short.txt").write_text("the quick brown fox")
    r = run(main, ["perplexity", "-m", str(folders["float"]), "--text", str(tmp_path / "short.txt"), "-c", "64"])
    assert r.exit_code == 1 and "shorter than one window of --context 64" in r.output
    r = run(main, ["kld", "-m", str(folders["q4_0"]), "--text", str(text)])
    assert r.exit_code != 0 and "--ref MODEL or --ref-logits FILE" in r.output


@pytest.mark.real
def test_real_270m_perplexity_matches_llama_cpp_and_transformers(real_270m_exact):
    """Our perplexity on the real 270M equals transformers float32 on its dequantized weights token by token
    (scripts/make_reference_270m.py), and llama.cpp's llama-perplexity on the same GGUF and text (fixture by
    scripts/llama_perplexity.py) agrees with that reference on its window.

    Both references are on the first 1,024 tokens of the committed GPL-3 text: transformers' log-prob at every
    position, llama.cpp's perplexity of one 1,024-token window (the second half scored). A causal model's
    log-prob at a position depends only on the tokens up to it, so our window can be shorter than llama.cpp's
    and still compare one to one with transformers: 128 tokens in chunks of 48 score positions 64..126, at about
    a seventh of the cost of a window past the sliding window (the CPU backend's quantized GEMM runs at ~2
    GFLOP/s, and each scored position is a 262k-row head). Past the window, chunks whose rings drop keys are
    checked against the same transformers log-probs (positions 599..638) by test_real_past_window.py, and the
    perplexity loop through rotating caches against full passes on the tiny model above (window 16)."""
    fix = Path(__file__).parent / "fixtures"
    llama = json.loads((fix / "llama_perplexity_270m.json").read_text())
    ref = np.load(fix / "gemma3_270m_reference.npz")
    ids = np.array(llama["tokens"], np.int32)
    assert llama["tokens_match_ours"] and (llama["context"], llama["chunks"]) == (1024, 1)
    assert np.array_equal(ids, ref["gpl3_ids"])  # the same 1,024 tokens in both references
    # llama.cpp's window scores tokens 513..1023 (logits at 512..1022): transformers' log-probs there give its ppl
    assert abs(math.exp(ref["gpl3_nll"][512:1023].mean()) / llama["models"]["q4km"]["ppl"] - 1) < 0.005
    model, tok = load(real_270m_exact)
    text = (fix / "texts" / "GPL-3").read_text(encoding="utf-8")
    assert [2] + tok.encode(text, add_special_tokens=False)[:1023] == ids.tolist()  # our tokenizer, same tokens
    context = 128
    r = perplexity(model, ids[:context], context=context, chunk=48)
    transformers_nll = ref["gpl3_nll"][context // 2:context - 1]  # the second half: logits at 64..126
    assert r.tokens == transformers_nll.size == 63
    assert abs(r.ppl / math.exp(transformers_nll.mean()) - 1) < 0.001
    assert np.abs(r.nll - transformers_nll).mean() < 0.01
    assert np.abs(r.nll - transformers_nll).max() < 0.005  # measured: 3e-4 on a 640-token window
