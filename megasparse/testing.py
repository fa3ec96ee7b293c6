"""Test and demo support: run Megatron-core on CPU over gloo.

Megatron-core hard-codes a few CUDA calls. On a machine without CUDA we redirect them,
all here and nowhere else:
- `torch.cuda.current_device()` (used to place buffers in the comm mappings) -> the CPU;
- `torch.cuda.synchronize()` (dist_checkpointing's writer) -> nothing to wait for;
- the CUDA RNG tracker's `fork()` (model-parallel dropout/init regions) -> a fork of the CPU
  generator with the same per-name state bookkeeping;
- `te_general_gemm`, which the MoE router's gating GEMM names even without Transformer Engine
  -> None, Megatron's own "no TE" value (this one is applied with or without CUDA).
`run_distributed` spawns N gloo processes with Megatron's parallel state initialized.
"""

import contextlib
import os
import socket

import torch
import torch.distributed as dist

_patched = False


def patch_megatron_for_cpu() -> None:
    """Redirect Megatron-core's hard-coded CUDA calls when CUDA is absent. Idempotent."""
    global _patched
    if _patched:
        return
    _patched = True
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Same bookkeeping as Megatron's tracker, on the CPU generator."""

        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)
            self.seeds_.add(seed)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron(rank: int, world_size: int, port: int, seed: int = 1234, backend: str = "gloo",
                  **parallel_sizes) -> None:
    """gloo process group + Megatron parallel state (sizes as in initialize_model_parallel) + RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    patch_megatron_for_cpu()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(**parallel_sizes)
    model_parallel_cuda_manual_seed(seed)


def shutdown_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank, world_size, port, parallel_sizes, fn, args):
    torch.set_num_threads(1)  # N processes share the machine's cores
    init_megatron(rank, world_size, port, **parallel_sizes)
    try:
        fn(*args)
    finally:
        shutdown_megatron()


def run_distributed(fn, world_size: int = 2, args=(), **parallel_sizes) -> None:
    """Run fn(*args) on `world_size` gloo processes; an exception on any rank fails the call.

    fn must be importable by name (a module-level function). parallel_sizes go to
    megatron.core.parallel_state.initialize_model_parallel, e.g. tensor_model_parallel_size=2.
    """
    torch.multiprocessing.spawn(
        _worker, args=(world_size, free_port(), parallel_sizes, fn, args), nprocs=world_size, join=True
    )
