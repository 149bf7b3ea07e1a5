"""rlhf_lite.parallel.Workers: order, grad mode, thread counts and errors across threads."""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf_lite.parallel import Workers


def test_results_keep_task_order_and_run_on_worker_threads() -> None:
    workers = Workers(2)
    barrier = threading.Barrier(2, timeout=10)  # both tasks must be running at once to pass it

    def task(i: int):
        def run() -> tuple[int, str]:
            barrier.wait()
            return i, threading.current_thread().name
        return run

    out = workers.run([task(0), task(1)])
    assert [i for i, _ in out] == [0, 1]
    assert all(name.startswith("rlhf_lite") for _, name in out) and out[0][1] != out[1][1]
    workers.close()


def test_grad_mode_and_threads_follow_the_caller() -> None:
    workers = Workers(2)
    threads = torch.get_num_threads()
    probe = [lambda: (torch.is_grad_enabled(), torch.get_num_threads())] * 2
    with torch.no_grad():
        assert workers.run(probe) == [(False, max(1, threads // 2))] * 2
    assert workers.run(probe) == [(True, max(1, threads // 2))] * 2
    assert torch.get_num_threads() == threads  # restored for the caller


def test_a_failing_task_raises_after_all_tasks_end() -> None:
    workers = Workers(2)
    done = threading.Event()

    def slow() -> None:
        done.wait(0.2)
        done.set()

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        workers.run([fail, slow])
    assert done.is_set()  # the other task finished before the error surfaced


def test_one_worker_and_nested_runs_stay_on_the_calling_thread() -> None:
    main = threading.current_thread().name
    assert Workers(1).run([lambda: threading.current_thread().name] * 2) == [main, main]
    workers = Workers(2)
    inner = workers.run([lambda: workers.run([lambda: threading.current_thread().name] * 2), lambda: None])[0]
    assert len(set(inner)) == 1 and inner[0].startswith("rlhf_lite")  # no deadlock: nested runs go in order
    with pytest.raises(ValueError, match="at least one"):
        Workers(0)
