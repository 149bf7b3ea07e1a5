"""Independent CPU work on several cores at once: the cores split between the tasks, not within each op.

At the tiny profile's size torch's intra-op threads leave cores idle: a matmul splits well, but the
small element-wise ops, attention on 53-token rows and the Python between ops run on one core. Two
independent tasks, each with half the intra-op threads, fill those gaps. The PPO update has such a
pair: the policy's and the critic's minibatch step share no parameter (``PPOTrainer.update``). Measured
on the 2-core CI machine, steps alternated in one process: a PPO iteration of the benchmark configuration
(64 rollouts, 2 epochs of 2 minibatches) took 534 and 557 ms with the two steps in two threads against
584 and 577 ms one after the other. Scoring passes were tried too (the reference, critic and RM passes
as three tasks, or the length buckets of one pass) and were slower (115 against 110 ms), so they stay
sequential. ATen releases the GIL inside every op and autograd runs a backward on the thread that calls
it, so Python threads are enough.

Results do not depend on which thread runs which task, so a run stays deterministic; with two workers on
two cores they equal a sequential run on one intra-op thread (checked by
``test_threaded_update_equals_sequential_update`` in tests/test_robustness.py), not necessarily one on two
threads (a matmul split over two threads may round differently).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")

_local = threading.local()  # .inside: this thread is running a task (a nested run goes sequential)


class Workers:
    """Runs independent tasks on ``n`` threads, each task with ``threads // n`` intra-op threads (at least
    one); ``n=1`` runs them one after the other on the caller's thread.

    Tasks must not share mutable state: for :class:`~rlhf_lite.models.AdapterStack` passes, that means
    different adapters on a float base (merged-weight views, see ``AdapterStack.causal_lm``).
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"Workers needs at least one thread, got {n}")
        self.n = n
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="rlhf_lite") if n > 1 else None

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Results of ``tasks`` in their order, each run in the caller's grad mode; the first exception
        raised by a task is re-raised once all tasks have ended."""
        if self._pool is None or len(tasks) < 2 or getattr(_local, "inside", False):
            return [task() for task in tasks]
        threads = torch.get_num_threads()
        per_task = max(1, threads // min(self.n, len(tasks)))
        grad = torch.is_grad_enabled()  # thread-local in torch: a new thread starts with gradients on
        torch.set_num_threads(per_task)  # MKL's setting is process-wide: no task may fan out further
        try:
            futures = [self._pool.submit(_run_task, task, grad, per_task) for task in tasks]
            wait(futures)
            return [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        """Stop the threads (a later :meth:`run` would fail)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _run_task(task: Callable[[], T], grad: bool, threads: int) -> T:
    torch.set_num_threads(threads)
    _local.inside = True
    try:
        with torch.set_grad_enabled(grad):
            return task()
    finally:
        _local.inside = False
