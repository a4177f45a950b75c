"""Gradient accumulation and data-parallel training (2 local processes under mlx.launch) give the adapter of
one process training on the combined batch (within float tolerance: only the summation order differs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_qat.lora import finetune

TINY = Path(__file__).parent / "fixtures" / "tiny_gemma3"
ADAPTER = dict(kind="pooled", num_layers=3, embedding=True)
TRAIN = dict(iters=4, batch_size=4, learning_rate=2e-3, val_every=0, save_every=0, report_every=1)

WORKER = """
import sys, json
from mlx_gemma_qat.lora import finetune
folder, data, out, adapter, train, stop, resume = sys.argv[1:8]
finetune(folder, data, out, adapter=json.loads(adapter), train_config=json.loads(train), progress=False,
         log=lambda *a: None, stop_after=int(stop) or None, resume=resume == "1")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mlx_gemma_qat.convert import convert

    root = tmp_path_factory.mktemp("par")
    folder = convert(TINY, root / "m", embed_bits=4, progress=False)
    data = root / "data"
    data.mkdir()
    words = "red green blue black white gray pink brown gold teal navy lime".split()
    rows = [{"prompt": f"Colour {i}?", "completion": " ".join(words[i:i + 1 + i % 4])} for i in range(len(words))]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return folder, data


def _adapter(path):
    return mx.load(str(Path(path) / "adapters.safetensors"))


def _close(a, b, tol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=tol, atol=tol, err_msg=k)


class Rows:
    """Batches of ``per`` rows cut from one fixed array: batch k of 4 rows = batches 2k, 2k+1 of 2 rows."""

    def __init__(self, per):
        x = np.random.default_rng(0).integers(3, 200, (32, 17)).astype(np.int32)
        x[:, 1::2] = (x[:, 0:-1:2] * 5 + 1) % 200
        self.x, self.per = x, per

    def __len__(self):
        return len(self.x) // self.per

    def batch(self, k):
        r = self.x[(k % len(self)) * self.per:][: self.per]
        w = np.ones((self.per, 16), np.float32)
        w[:, :3] = 0  # some positions are not targets: the normalisation is per target token of the step
        return r[:, :-1], r[:, 1:], w, [()] * self.per


def test_gradient_accumulation_equals_the_combined_batch(setup, tmp_path):
    from mlx_gemma_qat import load
    from mlx_gemma_qat.lora import AdapterConfig, TrainConfig, train

    folder, _ = setup
    runs = {}
    for name, per, accum in (("one", 4, 1), ("acc", 2, 2)):
        model, _ = load(folder)
        runs[name] = train(model, Rows(per), None, tmp_path / name, AdapterConfig(**ADAPTER),
                           TrainConfig(**{**TRAIN, "batch_size": 4, "grad_accum": accum}), progress=False,
                           log=lambda *a: None)
    _close(_adapter(tmp_path / "one"), _adapter(tmp_path / "acc"))
    assert runs["one"].train_loss == pytest.approx(runs["acc"].train_loss, rel=1e-5)


def _launch(tmp_path, folder, data, out, stop=0, resume=False):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launch = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launch), "-n", "2", "--backend", "ring", "--python", sys.executable, str(worker), str(folder), str(data),
           str(tmp_path / out), json.dumps(ADAPTER), json.dumps(TRAIN), str(stop), "1" if resume else "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_two_processes_equal_one_with_the_combined_batch(setup, tmp_path):
    folder, data = setup
    finetune(folder, data, tmp_path / "single", adapter=ADAPTER, train_config=TRAIN, progress=False, log=lambda *a: None)
    _launch(tmp_path, folder, data, "dist")
    _close(_adapter(tmp_path / "single"), _adapter(tmp_path / "dist"))
    m1 = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    loss = lambda ms: [m["train_loss"] for m in ms if "train_loss" in m]  # noqa: E731
    np.testing.assert_allclose(loss(m1), loss(m2), rtol=1e-4)
    assert [m["trained_tokens"] for m in m1 if "trained_tokens" in m] == [m["trained_tokens"] for m in m2 if "trained_tokens" in m]


def test_two_processes_stopped_and_resumed_equal_an_uninterrupted_run(setup, tmp_path):
    """Only rank 0 reads the checkpoint; the other rank gets adapter, optimizer state and step through the group."""
    folder, data = setup
    _launch(tmp_path, folder, data, "full")
    _launch(tmp_path, folder, data, "part", stop=2)
    assert not (tmp_path / "part" / "adapters.safetensors").exists()
    _launch(tmp_path, folder, data, "part", resume=True)
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "part")
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
