"""GPU paths that would fail on a real GPU, checked on CPU with a faked device capability or stand-ins:
CUTLASS only on sm8x and never fp32, experts with zero tokens, and TE grouped options megasparse refuses."""

import pytest
import torch

from megasparse import SparsityConfig

from megasparse.core import warn
from megasparse.core.backends import (
    CusparseltBackend,
    CutlassBackend,
    resolve_backend,
)
from backend_standins import EmptyRefusingBackend
from megatron_helpers import make_config, make_column

pytestmark = pytest.mark.usefixtures("megatron_tp1")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen capability, with cuSPARSELt (only the checks are faked, no kernel runs)."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: capability["value"]
    )
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    return capability


class _OnCuda:
    """What resolve_backend reads of a weight: device, dtype, shape."""

    def __init__(self, dtype, shape=(64, 64)):
        self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, torch.Size(shape)


def test_cutlass_is_sm8x_only_and_auto_falls_back_instead_of_crashing(fake_gpu):
    cuda = torch.device("cuda", 0)
    assert "sm8x only, found sm90" in CutlassBackend().device_reason(cuda)
    fake_gpu["value"] = (8, 0)
    assert CutlassBackend().device_reason(cuda) is None
    fake_gpu["value"] = (9, 0)
    warn._warned.clear()
    with pytest.warns(
        UserWarning, match="dense masked GEMM.*cusparselt supports float16, bfloat16.*sm8x only"
    ):
        chosen = resolve_backend(
            "auto", _OnCuda(torch.float32), transposable=False
        )  # an fp32 model on an H100
    assert chosen.name == "dense"
    assert resolve_backend("auto", _OnCuda(torch.bfloat16), transposable=False).name == "cusparselt"


def test_cutlass_never_takes_fp32_whose_cutlass_sparsity_is_1_2():
    assert torch.float32 not in CutlassBackend.dtypes
    with pytest.raises(ValueError, match="cutlass supports float16, bfloat16 weights, not float32"):
        make_column(make_config(dtype=torch.float32), 64, 64, SparsityConfig(backend="cutlass"))


def test_an_expert_with_zero_tokens_skips_the_gemms(monkeypatch):
    monkeypatch.setattr(
        "megasparse.core.sparse_module.resolve_backend", lambda *a, **k: EmptyRefusingBackend()
    )
    layer = make_column(make_config(), 16, 32, SparsityConfig(mask="transposable"))
    x = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(
        layer.weight.grad, torch.zeros_like(layer.weight)
    )
    assert not CusparseltBackend().fits(
        torch.zeros(0, 64, dtype=torch.bfloat16)
    )  # no sparse 2:4 activation


def test_te_grouped_experts_refuse_a_single_grouped_weight():
    from megatron.core.transformer.moe.experts import TEGroupedMLP  # noqa: F401  (present in both versions)

    from megasparse.te.experts import SparseTEGroupedMLP

    config = make_config(dtype=torch.float32, num_moe_experts=2, moe_grouped_gemm=True)
    config.moe_single_grouped_weight = True  # megatron-core 0.19 with TE >= 2.14
    with pytest.raises(NotImplementedError, match="moe_single_grouped_weight=False"):
        SparseTEGroupedMLP(2, config, None, sparsity=SparsityConfig())
