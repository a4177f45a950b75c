"""Multi-turn chat with the KV cache carried over (ChatSession and `mlx-gemma chat`)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma_qat import stream_generate
from mlx_gemma_qat.chat import ChatSession
from mlx_gemma_qat.cli import main

FIX = Path(__file__).parent / "fixtures"
IMAGES = FIX / "images"


def letters_only(tok):
    """Greedy over the single-letter tokens: replies the tokenizer re-encodes to the same ids (a random
    model's free choice of byte and unused tokens would not round-trip through the template)."""
    allowed = np.full(tok.vocab_size, -np.inf, np.float32)
    for c in "abcdefghijklmnopqrstuvwxyz ":
        (i,) = tok.encode(c, add_special_tokens=False)
        allowed[i] = 0
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    allowed[end_of_turn] = 0
    mask = mx.array(allowed)

    def sampler(logprobs):
        return mx.argmax(logprobs + mask[: logprobs.shape[-1]], axis=-1)

    return sampler


def fresh(model, tok, messages, sampler, n):
    """The reply a from-scratch prompt of the whole conversation gets (no cache reuse)."""
    rs = list(stream_generate(model, tok, messages, n, sampler=sampler))
    return [r.token for r in rs], rs[-1].prompt_tokens


def test_turns_reuse_the_cache_and_match_a_fresh_prompt(vlm):
    _, model, tok = vlm
    sampler = letters_only(tok)
    s = ChatSession(model, tok, system="Be brief.")
    turns = [("hi", []), ("and this", [IMAGES / "a.png"]), ("now both", [IMAGES / "b.jpg", IMAGES / "a.png"]),
             ("thanks", [])]
    history, finish = [], set()
    for k, (text, images) in enumerate(turns):
        before = list(s.cached_ids)
        rs = list(s.send(text, images, max_tokens=10, sampler=sampler))
        finish.add(rs[-1].finish_reason)
        content = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": text}]
        history.append({"role": "user", "content": content})
        tokens, full_prompt = fresh(model, tok, [{"role": "system", "content": "Be brief."}] + history, sampler, 10)
        assert [r.token for r in rs] == tokens, k
        # only what the cache did not hold was prefilled
        assert s.reused_tokens == len(before) and (k == 0) == (len(before) == 0)
        assert rs[-1].prompt_tokens == full_prompt - len(before)
        history.append({"role": "assistant", "content": "".join(r.text for r in rs)})
    assert s.cache[0].offset == len(s.cached_ids)
    assert finish == {"stop", "length"}  # replies ended by <end_of_turn> (fed to the cache) and by the limit


def test_a_reply_that_does_not_re_tokenize_the_same_starts_over(vlm):
    _, model, tok = vlm
    sampler = letters_only(tok)
    s = ChatSession(model, tok)
    list(s.send("hi", max_tokens=4, sampler=sampler))
    s.messages[-1]["content"] = "edited"  # the template now renders another reply than the cache holds
    rs = list(s.send("again", max_tokens=4, sampler=sampler))
    assert s.reused_tokens == 0
    assert [r.token for r in rs] == fresh(model, tok, s.messages[:-1], sampler, 4)[0]


def test_full_context_and_bad_image_leave_the_session_usable(vlm):
    _, model, tok = vlm
    s = ChatSession(model, tok, pan_and_scan=True)
    list(s.send("hi", max_tokens=2))
    n = len(s.messages)
    with pytest.raises(ValueError, match="context is 256"):
        list(s.send("look", [IMAGES / "wide.png"] * 3, max_tokens=2))  # 3 x (1 + 3 crops) x 20 tokens
    with pytest.raises(ValueError, match="no such image"):
        list(s.send("look", [IMAGES / "missing.png"], max_tokens=2))
    assert len(s.messages) == n
    rs = list(s.send("look", [IMAGES / "a.png"], max_tokens=2))
    assert rs[-1].generation_tokens == 2 and len(s.messages) == n + 2


def test_cli_chat(vlm):
    folder, _, _ = vlm
    lines = "\n".join(["hello", f"/image {IMAGES / 'a.png'}", "what is it", f"/image {IMAGES / 'nope.png'}",
                       "and this", "/reset", "again", "/quit", "never sent"]) + "\n"
    r = CliRunner().invoke(main, ["chat", "-m", str(folder), "-n", "3", "--stats"], input=lines)
    assert r.exit_code == 0, r.output
    reused = [int(x.split(": ")[1].rstrip(")")) for x in r.output.splitlines() if "reused from the cache" in x]
    assert len(reused) == 3  # hello, what is it, again (the bad image's turn failed)
    assert reused[0] == 0 and reused[2] == 0  # first turn and after /reset
    assert "Error:" in r.output and "nope.png" in r.output


def test_cli_chat_ends_cleanly_at_end_of_input(vlm):
    r = CliRunner().invoke(main, ["chat", "-m", str(vlm[0]), "-n", "2"], input="hello\n")
    assert r.exit_code == 0, r.output


def test_a_reply_left_early_keeps_the_cache_record_true(vlm):
    """A caller that stops reading a reply (break) leaves the cache holding what was fed; the next turn
    still replies as a fresh prompt of the conversation (with the reply as far as it went) would."""
    _, model, tok = vlm
    sampler = letters_only(tok)
    s = ChatSession(model, tok)
    for r in s.send("hi", max_tokens=10, sampler=sampler):
        if r.generation_tokens == 3:
            break
    assert s.cache[0].offset == len(s.cached_ids) and len(s.messages) == 2
    rs = list(s.send("more", max_tokens=6, sampler=sampler))
    assert s.reused_tokens > 0
    assert [r.token for r in rs] == fresh(model, tok, s.messages[:-1], sampler, 6)[0]


def test_chat_on_a_base_model_says_so_once(vlm, tmp_path, monkeypatch):
    """A model that ships no chat template (a base model's GGUF, like the embedded 270M): `chat` and `generate
    --chat` say once that it continues text and point to an instruction-tuned file; a templated model and a raw
    `generate` say nothing."""
    from gguf_factory import write_tiny_gguf

    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base.gguf"
    write_tiny_gguf(base)  # llama.cpp's converter writes no template for a base model
    note = "Note: this model ships no chat template: it is a base (pre-trained) model"
    r = CliRunner().invoke(main, ["chat", "-m", str(base), "-n", "2"], input="hello\nagain\n")
    assert r.exit_code == 0 and r.output.count(note) == 1 and "gemma-3-1b-it-qat-q4_0-gguf" in r.output, r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(base), "--chat", "--prompt", "hi", "-n", "2"])
    assert r.exit_code == 0 and r.output.count(note) == 1, r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(base), "--prompt", "hi", "-n", "2"])
    assert r.exit_code == 0 and note not in r.output, r.output
    r = CliRunner().invoke(main, ["chat", "-m", str(vlm[0]), "-n", "2"], input="hello\n")
    assert r.exit_code == 0 and note not in r.output, r.output
