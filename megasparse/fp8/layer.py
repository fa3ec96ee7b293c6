"""The standalone FP8 2:4 training layer, `megasparse.Fp8SparseLinear`.

y = x (M*W)^T + b with the FP8 training op (megasparse.fp8.linear) and the per-step weight state
(megasparse.core.weight_state), as Megatron's local sparse linears run it under
`SparsityConfig.fp8`, for a plain PyTorch model: current per-tensor scaling in the config's format
("hybrid": e4m3 forward, e5m2 gradients; "e4m3"), FP8 2:4 GEMMs on cuSPARSELt (sm90) or emulated
with the same math elsewhere, the mask and the FP8 weight built once per optimizer step, output in
the input's dtype (the autocast dtype under autocast).
"""

import math
from typing import Optional

import torch

from megasparse.config import SparsityConfig
from megasparse.core.backends import BACKENDS
from megasparse.core.sparse_module import SparseModuleMixin
from megasparse.core.weight_state import SparseWeightState
from megasparse.fp8.linear import check_shard_shape, fp8_sparse_linear_step, local_plan
from megasparse.fp8.scaling import quantized_weight


class Fp8SparseLinear(SparseModuleMixin, torch.nn.Module):
    """A linear layer trained in FP8 with a 2:4 weight (torch.nn.Linear's parameters and init).

    sparsity: a SparsityConfig with `fp8` set (default: 2:4, "hybrid"); both weight dims must be
    multiples of 16 (32 for cuSPARSELt's FP8 2:4 GEMM).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        sparsity: Optional[SparsityConfig] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        sparsity = sparsity if sparsity is not None else SparsityConfig(fp8="hybrid")
        if not isinstance(sparsity, SparsityConfig) or sparsity.fp8 is None:
            raise ValueError(
                "megasparse: Fp8SparseLinear needs a SparsityConfig with fp8='hybrid' or 'e4m3', "
                f"got {sparsity!r}"
            )
        check_shard_shape(type(self).__name__, (out_features, in_features))
        self._take_sparsity(sparsity)
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.weight_state = SparseWeightState(mask_source=quantized_weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialisation."""
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"megasparse: Fp8SparseLinear({self.in_features}, {self.out_features}) takes inputs "
                f"[..., {self.in_features}], got {tuple(x.shape)}"
            )
        step = self.weight_state.step(self.weight, self.sparsity, BACKENDS["dense"])
        plan = local_plan(self.sparsity, self.weight, x)
        return fp8_sparse_linear_step(x, self.weight, self.bias, step, plan)

    def sparse_weights(self) -> list:
        return [(self.weight, self.weight_state)] if hasattr(self, "weight_state") else []

    def get_extra_state(self):  # held masks (mask_refresh_interval > 1), S-STE's beta
        return self.weight_state.extra_state(self.sparsity)

    def set_extra_state(self, state):
        self.weight_state.restore_extra_state(state, self.weight)

    def extra_repr(self) -> str:
        features = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{features}, bias={self.bias is not None}, {super().extra_repr()}"
