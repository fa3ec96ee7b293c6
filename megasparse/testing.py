"""Test and demo support: run Megatron-core (and Megatron-LM's training loop) on CPU over gloo.

Megatron hard-codes CUDA in places. On a machine without CUDA, `cpu_megatron()` redirects those
calls to the CPU inside its block and restores everything when the block ends; nothing is changed
on import, and nothing in megasparse's product path uses this module.

    with cpu_megatron():                  # Megatron-core: layers, models, dist_checkpointing
        ...
    with cpu_megatron(training=True):     # also Megatron-LM's loop (megatron.training.pretrain)
        ...

Megatron-core (always):
- `torch.cuda.current_device()` (buffers in the comm mappings) -> the CPU device;
- `torch.cuda.synchronize()` (dist_checkpointing's writer) -> nothing to wait for;
- the CUDA RNG tracker (model-parallel dropout/init regions) -> the same bookkeeping on the CPU
  generator;
- `te_general_gemm`, which the MoE router's gating GEMM names even without Transformer Engine
  -> None, Megatron's own "no TE" value (applied with or without CUDA).
Megatron-LM's training loop (`training=True`), in addition:
- `device="cuda"` in tensor factories, `.cuda()` and `.to("cuda")` -> the CPU (a torch function
  mode, so only code running inside the block is affected), and `param.type()` answers with
  the CUDA type name Megatron's optimizer checks for;
- `torch.cuda` streams, RNG state, memory statistics, `empty_cache`, `set_device` -> CPU stand-ins;
- `initialize_megatron`: `allow_no_cuda`, the device-count checks that skip model-parallel init
  and seeding, the legacy fused-kernel build (nvcc), `set_jit_fusion_options`' CUDA warm-up;
- `validate_args`' `get_device_arch_version` -> 0 (no GPU architecture);
- `typing.override` (Python 3.12) for megatron-core 0.19's training package on Python 3.11.

`run_distributed` spawns N gloo processes with Megatron's parallel state initialized;
`run_megatron_lm` spawns N processes that each run a Megatron-LM entry point (torchrun's
environment variables set, `cpu_megatron(training=True)` active).
"""

import contextlib
import importlib.util
import os
import socket
import sys
import typing

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the redirections ------------------------------------------------------------------------------


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Same bookkeeping as Megatron's tracker, on the CPU generator."""

        on_cpu = True

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

    return CpuRNGStatesTracker


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class _CudaToCpu(TorchFunctionMode):
    """Tensors Megatron-LM's loop asks for on "cuda" are made on the CPU, inside the mode only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):  # tensor.cuda()
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return func(*args).replace(
                "torch.", "torch.cuda.", 1
            )  # "torch.cuda.FloatTensor" checks
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if name == "to":
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class _FakeStream:
    """Stands in for torch.cuda.Stream / current_stream(): CPU work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args):
        return None


def _cuda_stand_ins():
    """torch.cuda attribute -> CPU stand-in, for Megatron-LM's loop (one function object each:
    torch.compile keeps a table of torch.cuda's functions and refuses duplicates)."""
    stand_ins = {
        "Stream": _FakeStream,
        "current_stream": lambda *args, **kwargs: _FakeStream(),
        "stream": lambda *args, **kwargs: contextlib.nullcontext(),
        "get_rng_state": lambda *args, **kwargs: torch.get_rng_state(),
        "set_rng_state": lambda state, *args, **kwargs: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "memory_stats": lambda *args, **kwargs: {},
    }
    for name in ("set_stream", "set_device", "empty_cache"):
        stand_ins[name] = lambda *args, **kwargs: None
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
        "device_memory_used",
    ):
        stand_ins[name] = lambda *args, **kwargs: 0
    return stand_ins


def _training_patches(patch):
    """Megatron-LM's megatron.training on CPU (megatron-core 0.17+ wheels)."""
    if not hasattr(typing, "override"):  # megatron-core 0.19's training package, Python 3.11
        patch(typing, "override", lambda method: method)
    from megatron.training import arguments, initialize, training

    patch(
        torch.cuda, "device_count", lambda: 1
    )  # initialize_megatron: model-parallel init, seeding
    original_init = initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True  # no "Megatron requires CUDA" assertion
        return original_init(*args, **kwargs)

    patch(initialize, "initialize_megatron", initialize_megatron)
    patch(training, "initialize_megatron", initialize_megatron)
    for module in (initialize, training):
        if hasattr(module, "set_jit_fusion_options"):
            patch(module, "set_jit_fusion_options", lambda *args, **kwargs: None)  # CUDA warm-up
    if hasattr(initialize, "_compile_dependencies"):
        patch(
            initialize, "_compile_dependencies", lambda *args, **kwargs: None
        )  # fused kernels: nvcc
    if hasattr(arguments, "get_device_arch_version"):
        patch(arguments, "get_device_arch_version", lambda: 0)


@contextlib.contextmanager
def cpu_megatron(training: bool = False):
    """Inside the block, Megatron's hard-coded CUDA calls run on the CPU (see the module docstring).

    Everything is restored when the block ends. With CUDA available only the TE-less MoE router
    fix is applied. `training=True` also covers Megatron's training machinery: DDP, optimizers,
    pipeline schedules, and Megatron-LM's loop (megatron.training) where it is installed.
    """
    with contextlib.ExitStack() as stack:

        def patch(owner, name, value):
            missing = object()
            old = getattr(owner, name, missing)
            setattr(owner, name, value)
            stack.callback(
                lambda: delattr(owner, name) if old is missing else setattr(owner, name, old)
            )

        from megatron.core.tensor_parallel import random as mcore_random
        from megatron.core.transformer.moe import moe_utils

        if getattr(moe_utils, "te_general_gemm", None) is None:
            patch(moe_utils, "te_general_gemm", None)
        if torch.cuda.is_available():
            yield
            return
        patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
        patch(torch.cuda, "synchronize", lambda device=None: None)
        # activation recompute saves and restores the "CUDA" RNG state: the CPU generator's
        patch(mcore_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
        patch(
            mcore_random,
            "_set_cuda_rng_state",
            lambda state, *args, **kwargs: torch.set_rng_state(state),
        )
        if not getattr(
            mcore_random._CUDA_RNG_STATE_TRACKER, "on_cpu", False
        ):  # not yet (nested blocks)
            patch(mcore_random, "_CUDA_RNG_STATE_TRACKER", _cpu_rng_tracker_class()())
            patch(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
        if training:
            for name, value in _cuda_stand_ins().items():
                patch(torch.cuda, name, value)
            if importlib.util.find_spec("megatron.training") is not None:
                _training_patches(patch)
            stack.enter_context(_CudaToCpu())
        yield


# -- worker processes ------------------------------------------------------------------------------

_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "megasparse"]


def _start(worker, args, nprocs) -> None:
    """Run worker(rank, *args) on nprocs fresh processes; an exception on any rank fails the call.

    Workers fork from a forkserver that has imported torch and megatron.core once (about 15 s a
    process on a small machine): a clean process, never the caller's (no process group, no threads).
    """
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    torch.multiprocessing.start_processes(
        worker, args=args, nprocs=nprocs, join=True, start_method="forkserver"
    )


# -- Megatron-core's parallel state in gloo processes ----------------------------------------------

_sessions = []  # the cpu_megatron() blocks opened by init_megatron, closed by shutdown_megatron


def init_megatron(
    rank: int,
    world_size: int,
    port: int,
    seed: int = 1234,
    backend: str = "gloo",
    cpu_training: bool = False,
    **parallel_sizes,
) -> None:
    """gloo process group + Megatron parallel state (sizes as in initialize_model_parallel) + RNG
    tracker, with cpu_megatron(training=cpu_training) active until shutdown_megatron()."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    session = contextlib.ExitStack()
    session.enter_context(cpu_megatron(training=cpu_training))
    _sessions.append(session)
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
    if _sessions:
        _sessions.pop().close()


def _worker(rank, world_size, port, parallel_sizes, fn, args, cpu_training):
    torch.set_num_threads(1)  # N processes share the machine's cores
    init_megatron(rank, world_size, port, cpu_training=cpu_training, **parallel_sizes)
    try:
        fn(*args)
    finally:
        shutdown_megatron()


def run_distributed(
    fn, world_size: int = 2, args=(), cpu_training: bool = False, **parallel_sizes
) -> None:
    """Run fn(*args) on `world_size` gloo processes; an exception on any rank fails the call.

    fn must be importable by name (a module-level function). parallel_sizes go to
    megatron.core.parallel_state.initialize_model_parallel, e.g. tensor_model_parallel_size=2.
    cpu_training=True: cpu_megatron(training=True) (Megatron DDP, optimizers, pipeline schedules).
    """
    _start(_worker, (world_size, free_port(), parallel_sizes, fn, args, cpu_training), world_size)


# -- Megatron-LM's training loop in gloo processes -------------------------------------------------


def _megatron_lm_worker(rank, world_size, port, fn, argv, args):
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_DEVICE_MAX_CONNECTIONS="1",
    )
    sys.argv = ["megatron-lm", *argv]
    with cpu_megatron(training=True):
        try:
            fn(*args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def run_megatron_lm(fn, argv, world_size: int = 2, args=()) -> None:
    """Run a Megatron-LM entry point fn(*args) (e.g. one that calls megatron.training.pretrain) on
    `world_size` CPU processes, with `argv` as its command line. Add `--distributed-backend gloo`.

    fn must be importable by name. An exception on any rank fails the call.
    """
    _start(_megatron_lm_worker, (world_size, free_port(), fn, list(argv), args), world_size)
