"""The GPU timer of the speed gate and the benchmarks: mean time per call of a function by CUDA events."""

from typing import Callable

import torch


def cuda_event_seconds(
    fn: Callable[[], object],
    iterations: int = 10,
    warmup: int = 3,
    synchronize_device: bool = False,
) -> float:
    """Mean seconds per call of fn on the current CUDA stream, after `warmup` untimed calls.

    synchronize_device: wait for the whole device before the first and after the last timed call
    (a benchmark of work that may run on other streams); else only for the end event (the speed
    gate, inside a training step).
    """
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if synchronize_device:
        torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    if synchronize_device:
        torch.cuda.synchronize()
    else:
        end.synchronize()
    return start.elapsed_time(end) / iterations / 1e3
