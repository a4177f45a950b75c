"""mlx.launch of local ranks (ring backend) for the tests: a script run by ``n`` processes, a hang a test failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def ring_port(n: int = 2) -> int:
    """A free port followed by ``n - 1`` free ones: the ring backend's local ranks listen on consecutive ports.
    mlx.launch's fixed default (32323) would collide when two launches run at once in the suite's workers."""
    for _ in range(100):
        socks = [socket.socket() for _ in range(n)]
        try:
            socks[0].bind(("127.0.0.1", 0))
            port = socks[0].getsockname()[1]
            for i, s in enumerate(socks[1:], 1):
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} adjacent free ports")


def mlx_launch(tmp_path: Path, script: str, *args, timeout: int, n: int = 2, command: list[str] | None = None,
               stdin: str | None = None):
    """``mlx.launch -n N --backend ring`` of ``script`` (or of ``command``, a program and its arguments), with
    ``stdin`` for rank 0 (mlx.launch hands its input to rank 0): (exit code, stdout, stderr). A hang fails the test
    (the launcher and every rank are killed)."""
    launch = Path(sys.executable).parent / "mlx.launch"
    if command is None:
        worker = tmp_path / "worker.py"
        worker.write_text(script)
        command = [sys.executable, str(worker), *map(str, args)]
    cmd = [str(launch), "-n", str(n), "--backend", "ring", "--starting-port", str(ring_port(n)), "--", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        import pytest

        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the ranks hung (killed after {timeout} s):\n{out}\n{err}")
    return proc.returncode, out, err
