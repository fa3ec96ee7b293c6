"""What a layer hands its weight state: the mask source (FP8 quantize-then-prune) and the process
group S-STE's beta is summed over; and the kernel dispatch the core ops share."""

from types import SimpleNamespace

import pytest
import torch

from megasparse import SparsityConfig, kernels
from megasparse.core.backends import BACKENDS
from megasparse.core.gradients import sste_scale
from megasparse.core.masks import weight_mask
from megasparse.core.weight_state import SparseWeightState

QUANTIZE_FIRST = dict(fp8="hybrid", fp8_order="quantize-then-prune", backend="dense")


def _weight(seed=0):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))


def test_the_mask_source_gives_the_tensor_masked_under_quantize_then_prune_only():
    seen = []

    def source(weight):  # a stand-in quantizer: another magnitude order than the weight's
        seen.append(weight)
        return weight.flip(-1)

    w = _weight()
    state = SparseWeightState(mask_source=source)
    plain = state.step(w, SparsityConfig(backend="dense"), BACKENDS["dense"])
    assert torch.equal(plain.mask(), weight_mask(w)) and not seen
    quantized_first = state.mask_of(w, SparsityConfig(**QUANTIZE_FIRST))
    assert torch.equal(quantized_first, weight_mask(w.flip(-1))) and len(seen) == 1


def test_quantize_then_prune_without_a_mask_source_names_the_fix():
    with pytest.raises(ValueError, match=r"SparseWeightState\(mask_source="):
        SparseWeightState().mask_of(_weight(), SparsityConfig(**QUANTIZE_FIRST))


class _OneRankGroup:
    def size(self):
        return 1


def test_the_process_group_is_asked_once_at_the_first_sparse_forward():
    asked = []
    w = _weight(1)
    state = SparseWeightState(process_group=lambda weight: asked.append(weight) or _OneRankGroup())
    state.step(w, SparsityConfig(gradient="sste", enabled=False), BACKENDS["dense"])
    assert not asked and state.sste_beta is None  # dense phase: no beta yet
    for _ in range(2):
        state.step(w, SparsityConfig(gradient="sste", backend="dense"), BACKENDS["dense"])
    assert len(asked) == 1 and asked[0] is w
    assert torch.equal(state.sste_beta, sste_scale(w, None))  # one rank: nothing to sum


@pytest.mark.parametrize("have_triton", [True, False])
def test_kernels_pick_triton_for_cuda_tensors_with_triton_else_the_reference(
    monkeypatch, have_triton
):
    from megasparse.kernels import dispatch

    monkeypatch.setattr(dispatch, "HAVE_TRITON", have_triton)
    triton_kernel, reference = object(), object()
    cuda_tensor = SimpleNamespace(is_cuda=True)
    assert kernels.pick(triton_kernel, reference, torch.zeros(1)) is reference
    expected = triton_kernel if have_triton else reference
    assert kernels.pick(triton_kernel, reference, cuda_tensor) is expected
