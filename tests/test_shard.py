"""Gemma 3 split over processes (model/shard.py), launched with ``mlx.launch --backend ring`` as users launch it:
greedy tokens equal to one process's (pipeline: the same arithmetic; tensor: sums in another order, so a
difference would be admissible only at a near-tie, and none occurs on these prompts), on tiny models with 2 and 4
ranks (prompts past the sliding window, an 8-bit KV cache, a chat that reuses its cache, an image prompt) and on
the real 270M with 2; every weight slice equal to the slice of the dequantized whole (numpy); splits a model cannot
take refused before loading; a rank that fails makes every rank stop with an error, none hangs."""

import json
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import shared
from launcher import mlx_launch

from mlx_gemma_qat.model.config import TextConfig
from mlx_gemma_qat.model.shard import (
    ShardError,
    _cut_inputs,
    _cut_outputs,
    check_split,
    memory_counts,
    pipeline_counts,
    rank_heads,
)

pytestmark = pytest.mark.launches  # make test runs these on their own, after the others

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE = FIXTURES / "images" / "a.png"
PROMPT = list(range(5, 45))  # 40 tokens: past the tiny models' 16-token window

CASES = """
def tokens(model, tok, prompt, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, kw.pop("n", 12), **kw)]

def run(model, tok, cases, out):
  for case in cases:
    if case == "window":
        out[case] = tokens(model, tok, list(range(5, 45)), n=16, prefill_step_size=16)
    elif case.startswith("kv8"):  # kv8 or kv8:N, N tokens
        out[case] = tokens(model, tok, list(range(5, 45)), n=int(case[4:] or 12), kv_bits=8, kv_group_size=32)
    elif case == "short":
        out[case] = tokens(model, tok, list(range(5, 17)), n=6)
    elif case.startswith("chat"):  # chat:N, N turns
        session = ChatSession(model, tok)
        turns = []
        for text in ("red green blue", "and then?", "once more")[: int(case[5:])]:
            turns.append([r.token for r in session.send(text, max_tokens=6)])
        out[case] = {"turns": turns, "reused": session.reused_tokens}
    elif case == "carried":  # a second prompt continues in the first one's cache
        cache = model.make_cache()
        first = tokens(model, tok, list(range(5, 30)), cache=cache, n=8)
        out[case] = [first, tokens(model, tok, list(range(60, 75)), cache=cache, n=8), cache[0].offset]
    elif case == "sampled":
        out[case] = tokens(model, tok, "a b c d", temp=0.9, top_p=0.95, seed=7)
    elif case == "image":
        out[case] = tokens(model, tok, "Describe", images=[sys.argv[3]], chat=True)
"""
_IMPORTS = """
import json, sys
import mlx.core as mx
from mlx_gemma_qat import ChatSession, load
from mlx_gemma_qat.generate import stream_generate
"""
# One launch per (mode, ranks) runs every job (a model, its compute dtype, the cases to run on it, and optionally its
# own split mode); each rank prints one JSON line of what it generated.
WORKER = _IMPORTS + CASES + """
mode, jobs = sys.argv[1], json.loads(sys.argv[2])
rank = mx.distributed.init().rank() if mode != "none" else 0
results = []
for src, dtype, cases, *own in jobs:
    model, tok = load(src, dtype=dtype, shard=None if mode == "none" else (own or [mode])[0])
    out = {"weights": mx.get_active_memory(),
           "shard": None if model.shard is None else [model.shard.mode, model.shard.size, model.shard.layers]}
    results.append(out)
    run(model, tok, cases, out)
    del model
print("RESULT " + json.dumps({"rank": rank, "jobs": results}), flush=True)
"""


def _results(output: str) -> list[dict]:
    got = [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]
    return sorted(got, key=lambda r: r["rank"])


def _jobs(jobs) -> str:
    return json.dumps([[str(folder), *rest] for folder, *rest in jobs])


def _launch(tmp_path, jobs, mode, n) -> list[list[dict]]:
    """Each rank's results, job by job (``jobs``: (folder, dtype or None, cases[, its own mode]))."""
    rc, out, err = mlx_launch(tmp_path, WORKER, mode, _jobs(jobs), IMAGE, n=n, timeout=600)
    assert rc == 0, out + err
    results = _results(out)
    assert len(results) == n, out + err
    return [r["jobs"] for r in results]


def _one_process(tmp_path, jobs) -> list[dict]:
    import subprocess

    worker = tmp_path / "one.py"
    worker.write_text(WORKER)
    p = subprocess.run([sys.executable, str(worker), "none", _jobs(jobs), str(IMAGE)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return _results(p.stdout)[0]["jobs"]


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    """The tiny text fixture converted with defaults (linears re-gridded onto Q4_0: cuts between groups)."""
    from mlx_gemma_qat.convert import convert

    return shared(tmp_path_factory, "shard/tiny-q4", lambda out: convert(FIXTURES / "tiny_gemma3", out,
                                                                         progress=False))


def _write_wide(out: Path) -> None:
    """A tiny Gemma 3 with 4 query heads over 2 KV heads and 256 MLP columns (4 ranks can split it) in 6 layers (5
    sliding, 1 global), random weights (numpy), the tiny fixture's tokenizer; converted with defaults."""
    from safetensors.numpy import save_file

    from mlx_gemma_qat.convert import convert

    src = out.parent / (out.name + "-src")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    cfg = json.loads((FIXTURES / "tiny_gemma3" / "config.json").read_text())
    cfg.update(num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, num_hidden_layers=6,
               layer_types=cfg["layer_types"][:6])
    assert cfg["layer_types"][-1] == "full_attention"
    (src / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "tiny_gemma3" / f, src / f)
    rng = np.random.default_rng(0)
    h, d, i, v = cfg["hidden_size"], cfg["head_dim"], 256, cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (4 * d, h), p + "self_attn.k_proj.weight": (2 * d, h),
                       p + "self_attn.v_proj.weight": (2 * d, h), p + "self_attn.o_proj.weight": (h, 4 * d),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
    save_file({k: (rng.standard_normal(s) * (0.3 if len(s) == 1 else 0.08)).astype(np.float32)
               for k, s in shapes.items()}, str(src / "model.safetensors"))
    convert(src, out, progress=False)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return shared(tmp_path_factory, "shard/wide", _write_wide)


TINY_CASES = ["window", "kv8", "chat:2", "carried", "sampled"]
WIDE_CASES = ["kv8:6", "chat:2"]  # (kv8's 40-token prompt is past the window too)


@pytest.fixture(scope="module")
def two_rank_jobs(tiny_q, vlm_folder):
    """The tiny model's cases in float32, a prompt in bfloat16 (the GPU's compute dtype, run on the CPU), and an
    image prompt on the vision checkpoint: one launch per mode."""
    return [(tiny_q, None, TINY_CASES), (tiny_q, "bfloat16", ["window"]), (vlm_folder, None, ["image"])]


@pytest.fixture(scope="module")
def four_rank_jobs(wide, vlm_folder):
    return {"tensor": [(wide, None, WIDE_CASES)],  # (the vision checkpoint's 2 query heads: no 4-way tensor split)
            "pipeline": [(wide, None, WIDE_CASES), (vlm_folder, None, ["image"])]}


@pytest.fixture(scope="module")
def one_process(two_rank_jobs, four_rank_jobs, tmp_path_factory):
    """One process's outputs of every job, computed once (keyed by folder and dtype)."""
    jobs = two_rank_jobs + four_rank_jobs["tensor"]
    out = _one_process(tmp_path_factory.mktemp("one"), jobs)
    return {(str(folder), dtype): r for (folder, dtype, _), r in zip(jobs, out)}


def _compare(got, jobs, ref, mode, n):
    for rank, results in enumerate(got):
        for (folder, dtype, cases, *own), r in zip(jobs, results, strict=True):
            assert r["shard"][:2] == [(own or [mode])[0], n]
            for case in cases:
                assert r[case] == ref[str(folder), dtype][case], (mode, rank, folder, dtype, case)


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    from mlx_gemma_qat.convert import convert

    return shared(tmp_path_factory, "vlm/m", lambda out: convert(FIXTURES / "tiny_gemma3_vlm", out, mode="none",
                                                                 progress=False))


# ------------------------------------------------------------------------------------------------- the plan


def test_heads_split_with_the_kv_heads_they_read():
    # the 270M / 1B: 4 query heads, one KV head: each rank two query heads and the (replicated) KV head
    assert [(h.q0, h.q1, h.kv0, h.kv1) for h in (rank_heads(4, 1, 2, r) for r in range(2))] == [(0, 2, 0, 1),
                                                                                                (2, 4, 0, 1)]
    # 4B: 8 over 4 KV heads on 4 ranks: split
    assert [(h.kv0, h.kv1) for h in (rank_heads(8, 4, 4, r) for r in range(4))] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # 4 over 2 on 4 ranks: each rank one query head and the KV head of its group (each KV head on two ranks)
    assert [(h.q0, h.kv0, h.kv1) for h in (rank_heads(4, 2, 4, r) for r in range(4))] == [(0, 0, 1), (1, 0, 1),
                                                                                           (2, 1, 2), (3, 1, 2)]
    for heads, kv, n in ((4, 1, 8), (2, 1, 4), (6, 3, 4)):
        with pytest.raises(ShardError, match="cannot be split"):
            rank_heads(heads, kv, n, 0)


def _cfg(**kw) -> TextConfig:
    args = dict(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, num_attention_heads=4,
                num_key_value_heads=1, head_dim=256)
    args.update(kw)
    return TextConfig(**args)


def test_splits_a_model_cannot_take_are_refused_from_its_config():
    q4 = {"group_size": 32, "bits": 4}
    check_split(_cfg(), "tensor", 2, q4)
    check_split(_cfg(), "tensor", 4, q4)
    with pytest.raises(ShardError, match="4 query heads .* over 8 processes"):
        check_split(_cfg(), "tensor", 8, q4)
    with pytest.raises(ShardError, match="MLP's 2112 columns .* whole quantization groups"):
        check_split(_cfg(intermediate_size=2112), "tensor", 4, q4)  # 528 columns a rank: not whole groups of 32
    check_split(_cfg(intermediate_size=2112), "tensor", 4, {})  # dense: any cut
    with pytest.raises(ShardError, match="give 2 layer counts"):
        check_split(_cfg(), "pipeline", 2, q4, counts=[9, 8])
    with pytest.raises(ShardError, match="unknown shard mode"):
        check_split(_cfg(), "rows", 2)
    assert pipeline_counts(18, 4, None) == [5, 5, 4, 4]


def test_pipeline_layers_follow_each_ranks_memory():
    # equal memory: rank 0 also holds the embedding, so it takes fewer layers
    assert memory_counts(18, 100, 600, [1, 1]) == [6, 12]
    assert sum(memory_counts(62, 7, 3000, [16, 64, 64])) == 62
    c = memory_counts(62, 7, 0, [16, 64, 64])
    assert c[0] < min(c[1:]) and abs(c[1] - c[2]) <= 1
    few = memory_counts(4, 100, 10_000, [1, 1, 1])  # every rank keeps at least one layer
    assert sum(few) == 4 and few[0] == 1 and min(few) == 1


@pytest.mark.parametrize("n", [2, 4])
def test_every_slice_is_the_whole_tensors_slice(tiny_q, n):
    """Cut from the loaded (quantized) layers, each rank's part dequantizes to numpy's slice of the whole."""
    from mlx_gemma_qat.model.load import load_model
    from mlx_gemma_qat.model.quantized import QuantizedLinear

    model = load_model(tiny_q)
    layer = model.model.layers[3]

    def dense(m):
        if isinstance(m, QuantizedLinear):
            return np.array(mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                                          group_size=m.group_size, bits=m.bits))
        return np.array(m.weight)

    for name, cut, axis in (("mlp.down_proj", _cut_inputs, 1), ("mlp.gate_proj", _cut_outputs, 0)):
        whole_module = dict(layer.named_modules())[name]
        assert isinstance(whole_module, QuantizedLinear)
        whole = dense(whole_module)
        width = whole.shape[axis] // n
        for r in range(n):
            fresh = load_model(tiny_q)
            m = dict(fresh.model.layers[3].named_modules())[name]
            cut(m, r * width, (r + 1) * width)
            np.testing.assert_array_equal(dense(m), np.take(whole, range(r * width, (r + 1) * width), axis=axis))


# ------------------------------------------------------------------------------------------------- launched


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_ranks_generate_one_process_tokens(two_rank_jobs, one_process, tmp_path, mode):
    """(The image prompt: the vision tower runs on rank 0, its features go to the others. bfloat16: pipeline is
    one process's arithmetic; tensor parallel sums the partial projections in float32 and rounds once, as one
    process's matmul does: summed in bfloat16 after each partial's rounding, this prompt parts ways.)"""
    _compare(_launch(tmp_path, two_rank_jobs, mode, 2), two_rank_jobs, one_process, mode, 2)
    carried = one_process[str(two_rank_jobs[0][0]), None]["carried"]
    assert carried[2] == 25 + 7 + 15 + 7  # the second prompt ran after the first turn (its last token unfed)


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_four_ranks_generate_one_process_tokens(four_rank_jobs, one_process, wide, tmp_path, mode):
    jobs = four_rank_jobs[mode]
    got = _launch(tmp_path, jobs, mode, 4)
    _compare(got, jobs, one_process, mode, 4)
    if mode == "tensor":  # each rank one query head and its KV head, a quarter of the MLP and vocabulary
        assert max(r[0]["weights"] for r in got) < 0.5 * one_process[str(wide), None]["weights"]


def _cli(tmp_path, n, *args, stdin=None):
    rc, out, err = mlx_launch(tmp_path, None, n=n, timeout=600, stdin=stdin,
                              command=[str(Path(sys.executable).parent / "mlx-gemma"), *map(str, args)])
    return rc, out, err


def test_chat_lines_are_read_by_rank_0(tiny_q, tmp_path):
    """chat --shard: rank 0 reads the lines (mlx.launch hands it the input) and every rank takes them; the replies
    are one process's, printed once. mlx.launch never passes the input's end on, so generate --prompt - (which
    reads to the end) is refused with a way round, rather than waiting forever."""
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    lines = "red green blue\n/reset\nand then?\nonce more\n/quit\n"
    args = ["chat", "-m", tiny_q, "-n", "6"]
    one = CliRunner().invoke(main, list(map(str, args)), input=lines)
    assert one.exit_code == 0, one.output
    _, out, err = _cli(tmp_path, 2, *args, "--shard", "tensor", stdin=lines)
    assert out == one.stdout and "(conversation cleared)" in err, err
    _, out, err = _cli(tmp_path, 2, "generate", "-m", tiny_q, "--prompt", "-", "--shard", "pipeline",
                       stdin="piped prompt text")
    said = [line for line in (out + err).splitlines() if line.startswith("Error")]
    assert len(said) == 1 and '--prompt "$(cat FILE)"' in said[0], out + err


def test_the_cli_prints_once_from_rank_0(tmp_path, monkeypatch):
    """From a GGUF (Google's QAT layout: Q4_0 linears, F16 embedding) that both ranks on this host convert into
    an empty cache at once (one converts, the other waits for it); pipeline with the layer counts given."""
    from click.testing import CliRunner
    from gguf_factory import write_tiny_gguf

    from mlx_gemma_qat.cli import main

    gguf_path = tmp_path / "tiny-q4_0.gguf"
    write_tiny_gguf(gguf_path)
    args = ["generate", "-m", gguf_path, "--prompt", "one two three", "-n", "10", "--stats"]
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache-one"))
    one = CliRunner().invoke(main, list(map(str, args)))
    assert one.exit_code == 0, one.output
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache-split"))  # the launched ranks inherit it
    for mode, more in (("tensor", []), ("pipeline", ["--pipeline-split", "3,5"])):
        rc, out, err = _cli(tmp_path, 2, *args, "--shard", mode, *more)
        assert rc == 0, out + err
        assert out == one.stdout  # rank 0's text only, once
        assert err.count("Generation: 10 tokens") == 1
        said = "; layers 3, 5" if more else ""
        assert re.search(rf"Weights per rank \({mode} parallel over 2 processes{said}\): [\d.]+, [\d.]+ MiB", err), err


def test_a_split_the_model_cannot_take_is_one_error_before_loading(tiny_q, tmp_path):
    """(mlx.launch itself exits 0 whatever its ranks do: the ranks' codes are in its warnings.)"""
    _, out, err = _cli(tmp_path, 4, "generate", "-m", tiny_q, "--prompt", "x", "--shard", "tensor")
    said = [line for line in (out + err).splitlines() if line.startswith("Error")]
    assert len(said) == 1, out + err  # every rank failed alike: rank 0 says it, once
    assert "Error: 2 query heads over 1 KV heads cannot be split over 4 processes" in err
    assert "Traceback" not in out + err and "exited with code" in err


FAILING = """
import sys
import mlx.core as mx
from mlx_gemma_qat import load
from mlx_gemma_qat.world import PeerFailed
rank = mx.distributed.init().rank()
try:
    load(sys.argv[1] if rank == 0 else sys.argv[1] + "-missing", shard="tensor")
except PeerFailed as e:
    print(f"rank {rank} PEER: {e}", flush=True)
    e.stopped_with.barrier()  # every rank stopped at the same point
except ValueError as e:
    print(f"rank {rank} OWN: {e} (said by rank 0: {e.said_by_rank0})", flush=True)
    e.stopped_with.barrier()
"""


def test_a_rank_that_cannot_load_stops_every_rank(tiny_q, tmp_path):
    _, out, err = mlx_launch(tmp_path, FAILING, tiny_q, n=2, timeout=300)
    assert "rank 1 OWN: " in out and "-missing" in out and "(said by rank 0: False)" in out
    assert "rank 0 PEER: rank 1 failed while finding the model" in out


REAL_CASES = ["short"]  # (chats, caches, windows, images: on the tiny models above)


@pytest.fixture(scope="module")
def real_one_process(real_270m, tmp_path_factory):
    return {(str(real_270m), None): _one_process(tmp_path_factory.mktemp("one"), [(real_270m, None, REAL_CASES)])[0]}


@pytest.mark.real
def test_the_real_270m_on_two_ranks(real_270m, real_one_process, tmp_path):
    """Both modes in one launch (the second loaded after the first is freed)."""
    jobs = [(real_270m, None, REAL_CASES, "tensor"), (real_270m, None, REAL_CASES, "pipeline")]
    got = _launch(tmp_path, jobs, "tensor", 2)
    _compare(got, jobs, real_one_process, "tensor", 2)
    share = [[r["weights"] / real_one_process[str(real_270m), None]["weights"] for r in ranks] for ranks in got]
    tensor, pipeline = zip(*share)
    assert max(tensor) <= 0.55, share
    # pipeline: rank 0 holds the embedding and head (63% of the 270M) and its layers, the other the rest
    counts = got[0][1]["shard"][2]
    assert sum(counts) == 18 and min(counts) >= 1
    assert 0.95 < sum(pipeline) < 1.1, share


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _ask(url: str, model: str) -> list:
    """The same requests, through the official OpenAI client: greedy twice (the second reuses the kept cache),
    sampled with a seed, a JSON-schema constrained chat, and two streams at once."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none")
    out = []
    for _ in range(2):
        r = client.completions.create(model=model, prompt="one two three four", max_tokens=10, temperature=0)
        out.append((r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens > 0))
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0.8, seed=11)
    out.append(r.choices[0].message.content)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "json"}], max_tokens=24,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": SCHEMA}})
    out.append(r.choices[0].message.content)

    def stream(prompt):
        chunks = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(2) as pool:
        out += list(pool.map(stream, ["red green", "blue black white"]))
    return out


@pytest.fixture(scope="module")
def served_ref(tiny_q):
    """(model id, answers) of one process's server."""
    from served import serve

    from mlx_gemma_qat import load

    model, tok = load(tiny_q)
    one = serve(tiny_q, model, tok, max_tokens=16)
    try:
        return one.card.id, _ask(one.url, one.card.id)
    finally:
        one.close()


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_serve_split_answers_as_one_process(tiny_q, served_ref, tmp_path, mode):
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    model_id, ref = served_ref
    assert ref[1][1]  # the second greedy request reused the first one's cache

    port = _free_port()
    from launcher import ring_port

    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port",
           str(ring_port(2)), "--", str(Path(sys.executable).parent / "mlx-gemma"), "serve", "-m", str(tiny_q),
           "--model-name", model_id, "--port", str(port), "--shard", mode]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        got = _ask(f"http://127.0.0.1:{port}", model_id)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert got == ref, (tmp_path / "serve.log").read_text()
    assert "split over 2 processes" in (tmp_path / "serve.log").read_text()


DYING = """
import os, sys, time
import mlx.core as mx
from mlx_gemma_qat import load
from mlx_gemma_qat.generate import generate_step
model, tok = load(sys.argv[1], shard=sys.argv[2])
world_rank = mx.distributed.init().rank()
if world_rank == 1:
    time.sleep(1)
    os._exit(5)  # gone without a word, as a machine that drops off the network or is killed for memory
for _ in generate_step(mx.array(list(range(5, 45))), model, max_tokens=100_000):
    pass
"""


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_rank_that_disappears_ends_the_run(tiny_q, tmp_path, mode):
    """Rank 0 was generating when rank 1 vanished: it does not wait in a collective; the run ends, named."""
    import time

    t0 = time.monotonic()
    _, out, err = mlx_launch(tmp_path, DYING, tiny_q, mode, n=2, timeout=120)
    assert "rank 1 exited with code 5" in err, out + err
    assert time.monotonic() - t0 < 100


def test_images_are_read_by_rank_0_only(vlm_folder, tmp_path):
    """generate --image under --shard: rank 0 reads the image and shares its pixels (the other hosts need not hold
    the file): one process's text; an image rank 0 cannot read is one Error line, and no rank waits."""
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    args = ["generate", "-m", vlm_folder, "--prompt", "Describe", "--image", IMAGE, "-n", "8", "--no-stats"]
    one = CliRunner().invoke(main, list(map(str, args)))
    assert one.exit_code == 0, one.output
    _, out, err = _cli(tmp_path, 2, *args, "--shard", "tensor")
    assert out == one.stdout, err
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"no pixels here")
    _, out, err = _cli(tmp_path, 2, "generate", "-m", vlm_folder, "--prompt", "x", "--image", bad, "--shard",
                       "pipeline")
    said = [line for line in (out + err).splitlines() if line.startswith("Error")]
    assert len(said) == 1 and "not a readable image" in said[0] and "Traceback" not in out + err, out + err
