"""CPU by default: Triton kernels run under the interpreter, Megatron over gloo; `gpu` tests skip."""

import os
import sys
from pathlib import Path

import torch

# Shared references and stand-ins (tests/references/) import by name from every test folder.
sys.path.insert(0, str(Path(__file__).parent / "references"))

if not torch.cuda.is_available():
    # Must be set before triton is imported: the same kernel source then runs on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (sm80+); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_tp1():
    """A one-process gloo group with Megatron's parallel state at TP=1 (shared by in-process tests)."""
    from megasparse.testing import free_port, init_megatron, shutdown_megatron

    init_megatron(0, 1, free_port(), tensor_model_parallel_size=1)
    yield
    shutdown_megatron()
