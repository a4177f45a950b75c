"""The processes mlx.launch started (mx.distributed; one process when it did not start this one), as a LoRA run's
data-parallel group or a split model's ranks: sums, rank 0's values everywhere, and agreement on failures.

Agreement: a collective (all_sum) waits until every rank has joined it, so a rank that fails alone (rank 0
finds checkpoints it must not overwrite, a machine cannot read its data) would leave the others waiting in the
next one. Wherever a rank may fail alone, every rank therefore reports at the same point whether it failed (a
flag per rank, summed: ``together`` around a block, or ``flags`` folded into a sum the ranks make anyway, as a
training step's gradient sum), and then all of them raise: a failed rank its own error, the others a
``PeerFailed`` naming the failed ranks. A rank that dies outright (killed, out of memory) cannot report: then
mlx.launch stops the others, and the ring backend raises "connection to a peer was lost" in them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten


class PeerFailed(RuntimeError):
    """Another rank failed (its own error is in its output); this one stops too."""


class World:
    """The launched group: ``size`` processes, this one ``rank``."""

    def __init__(self):
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.size = self.group.size() if self.group is not None else 1
        self.rank = self.group.rank() if self.group is not None else 0
        # True once the ranks agreed to stop (``check`` raised, or the caller stops on a value they all summed):
        # every rank is then unwinding from the same point, the one time a collective (``barrier``) is still safe
        self.stopped_together = False

    def sum(self, tree):
        if self.size == 1:
            return tree
        return tree_map(lambda x: mx.distributed.all_sum(x, group=self.group), tree)

    def broadcast(self, tree):
        """Rank 0's values on every rank (the others contribute zeros to a sum). Every rank must hold the same
        names and shapes; they are sent in sorted name order (a tree read from a file may be ordered otherwise)."""
        flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
        flat = [(k, v if self.rank == 0 else mx.zeros_like(v)) for k, v in flat]
        return tree_unflatten([(k, mx.distributed.all_sum(v, group=self.group)) for k, v in flat])

    def text(self, value: str | None) -> str:
        """Rank 0's string on every rank (the others pass anything: None)."""
        if self.size == 1:
            return value or ""
        data = np.frombuffer((value or "").encode(), np.uint8) if self.rank == 0 else np.zeros(0, np.uint8)
        n = int(self.broadcast({"n": mx.array(len(data))})["n"].item())
        if self.rank != 0:
            data = np.zeros(n, np.uint8)
        got = self.broadcast({"b": mx.array(data.astype(np.int32))})["b"] if n else mx.zeros(0, mx.int32)
        return bytes(np.array(got).astype(np.uint8)).decode()

    def array(self, a: np.ndarray) -> np.ndarray:
        """Rank 0's array on every rank (the others pass zeros of its shape and dtype)."""
        if self.size == 1:
            return a
        return np.array(self.broadcast({"a": mx.array(a)})["a"])

    def values(self, value: float) -> list[float]:
        """Every rank's ``value``, in rank order."""
        if self.size == 1:
            return [value]
        return mx.distributed.all_gather(mx.array([value], mx.float32), group=self.group).tolist()

    def same_random_numbers(self) -> None:
        """Seed MLX's generator on every rank with rank 0's random seed: ranks that sample the same logits in the
        same order then draw the same tokens."""
        if self.size > 1:
            seed = int(np.random.SeedSequence().entropy % 2**31) if self.rank == 0 else 0
            mx.random.seed(int(self.broadcast({"s": mx.array(seed)})["s"].item()))

    def say_when_stopped(self) -> None:
        """mlx.launch ends every rank once one has ended (an error, a kill, out of memory): rank 0 then says so on
        its way out instead of vanishing (the failed rank's own error and the launcher's warnings say which)."""
        if self.size == 1:
            return

        def ended(signum, frame):
            if self.rank == 0:
                sys.stderr.write("Error: another rank ended, so mlx.launch stopped this one (see that rank's error "
                                 "and the launcher's warnings)\n")
                sys.stderr.flush()
            os._exit(1)

        signal.signal(signal.SIGTERM, ended)

    def flags(self, error: BaseException | None) -> mx.array:
        """This rank's failure flag (1 at its own index), to be summed with the others' (see ``check``)."""
        f = np.zeros(self.size, np.float32)
        f[self.rank] = error is not None
        return mx.array(f)

    def check(self, error: BaseException | None, summed_flags: mx.array, what: str) -> None:
        """After a sum of ``flags``: raise ``error`` on a rank that failed, PeerFailed on the others if any did."""
        failed = [r for r, f in enumerate(np.array(summed_flags).tolist()) if f > 0]
        self.stopped_together = self.stopped_together or bool(failed)
        if not failed:
            return
        if error is None:
            who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"
            error = PeerFailed(f"{who} failed while {what} (see its error); rank {self.rank} stops too")
        raise self.stopping(error, every_rank=len(failed) == self.size)

    def stopping(self, error: BaseException, every_rank: bool = True) -> BaseException:
        """``error`` marked for whoever reports it: every rank stops at this point (a barrier is safe), and when
        every rank fails, most likely alike, rank 0's message is enough (``said_by_rank0`` on the others)."""
        error.stopped_with = self
        error.said_by_rank0 = every_rank and self.rank != 0
        return error

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank learns whether any failed at this point (one all_sum of the flags); then see ``check``."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        self.check(error, mx.distributed.all_sum(self.flags(error), group=self.group), what)

    def barrier(self) -> None:
        """Wait until every rank is here (only where every rank is sure to come: see ``stopped_together``)."""
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group))

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a block that may fail on some ranks only; when it ends (failed or not) the ranks agree (``agree``).
        The block must hold no collective that a failure could make a rank skip."""
        error = None
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then raised again
            error = e
        self.agree(error, what)


__all__ = ["World", "PeerFailed"]
