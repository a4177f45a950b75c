"""MLX_GEMMA_DEVICE picks the MLX device for the package and for the processes that import it; the suite runs on the
CPU on every platform (tests/conftest.py), so a Mac computes what Linux CI computes."""

import os
import subprocess
import sys

import mlx.core as mx

SHOW = "import mlx_gemma_qat, mlx.core as mx; print(mx.default_device())"


def _python(code: str, device: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLX_GEMMA_DEVICE": device}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_suite_runs_on_the_cpu_and_its_subprocesses_too():
    assert os.environ["MLX_GEMMA_DEVICE"] == "cpu" and mx.default_device() == mx.cpu
    r = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, timeout=120)  # inherits it
    assert r.returncode == 0 and r.stdout.strip() == "Device(cpu, 0)", r.stderr


def test_a_bad_device_name_is_refused():
    r = _python(SHOW, "tpu")
    assert r.returncode != 0 and "MLX_GEMMA_DEVICE='tpu': expected cpu or gpu" in r.stderr
