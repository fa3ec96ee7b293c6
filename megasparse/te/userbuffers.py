"""TE's userbuffers communication overlap (Megatron's --tp-comm-overlap) on a TE module: the
flags TE's Linear / LayerNormLinear `__init__` derive from their ub_* arguments (TE 2.5, 2.12,
2.18 and main). With any of them set, the tensor-parallel communication runs inside TE's own GEMM,
which takes no 2:4 operand.
"""

# TE's GroupedLinear has no such flags
USERBUFFERS_FLAGS = (
    "ub_overlap_ag_fprop",
    "ub_overlap_rs_fprop",
    "ub_overlap_ag_dgrad",
    "ub_overlap_rs_dgrad",
    "ub_bulk_dgrad",
    "ub_bulk_wgrad",
)


def userbuffers_overlap(module) -> list:
    """The userbuffers-overlap flags set on this TE module (empty: no overlap)."""
    return [flag for flag in USERBUFFERS_FLAGS if getattr(module, flag, False)]
