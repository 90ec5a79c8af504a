"""Run the slow tests' independent training runs side by side. The runs are tiny models, which use a second thread
poorly: on 2 cores, two runs at one thread each finish in about two thirds of the time of the same runs one after
the other at two threads (ablations.topic_run: 65 s for the pair against 48 s each), with the same results."""

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def in_parallel(*calls: Callable[[], T]) -> list[T]:
    """The results of calls (picklable: module-level functions or functools.partial of them), in order. They run in
    as many worker processes as there are cores, each with one torch thread (one core: here, one after another).
    The workers are spawned, not forked, so none inherits the test process's thread pools or random state."""
    workers = min(len(calls), cores())
    if workers == 1:
        return [call() for call in calls]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
