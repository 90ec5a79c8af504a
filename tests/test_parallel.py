"""tests/parallel.py, which the slow tests use to run their training runs side by side."""

from functools import partial

import torch

from tests.parallel import cores, in_parallel


def test_results_come_back_in_order_from_one_thread_each():
    threads = 1 if cores() > 1 else torch.get_num_threads()      # one core: run here, as they are
    calls = [partial(pow, 2, 3), torch.get_num_threads, partial(pow, 3, 2), torch.get_num_threads]
    assert in_parallel(*calls) == [8, threads, 9, threads]
