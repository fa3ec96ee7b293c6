"""The FP8 2:4 route of sparse Transformer Engine linears: when it runs (TE's fp8_autocast with a
per-tensor recipe, cuSPARSELt's e4m3 GEMM on this device or the CPU emulation, the layer prunes),
and the plan of each GEMM: the scales of x and dY from the module's own TE quantizers where it has
them (GEMM i's input at `quantizers["scaling_fwd"][3 i]`, its output gradient at
`quantizers["scaling_bwd"][2 i]`: FP8FwdTensorIdx.GEMM1_INPUT / FP8BwdTensorIdx.GRAD_OUTPUT1 of each
GEMM's tensors, indexed as TE's GroupedLinear._get_quantizers does), else megasparse's scalers
following the recipe. The forwards that call it: megasparse.te.forward.
"""

from megasparse.fp8.linear import Fp8LinearPlan, cusparselt_fp8_reason, fp8_sparse_linear_step
from megasparse.fp8.scaling import E4M3, CurrentScaler, Fp8Recipe, te_scaler
from megasparse.core.warn import warn_once


def te_fp8_state():
    """(enabled, recipe) of Transformer Engine's fp8_autocast; (False, None) without TE."""
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:
            return False, None
    if not FP8GlobalStateManager.is_fp8_enabled():
        return False, None
    return True, FP8GlobalStateManager.get_fp8_recipe()


def _route_reason(weights, recipe, te_recipe):
    """Why the FP8 2:4 GEMMs cannot run for these weights under this recipe (None: they can)."""
    if recipe is None:
        return (
            f"TE recipe {type(te_recipe).__name__} is block-scaled; cuSPARSELt takes "
            "per-tensor scales"
        )
    override = getattr(te_recipe, "backward_override", None)
    if override is not None:
        return f"TE recipe backward_override={override!r} (TE's own backward precision)"
    device = weights[0].device
    if device.type != "cuda":
        return None  # the CPU emulation
    return next(filter(None, (cusparselt_fp8_reason(w) for w in weights)), None)


def fp8_route(module, unsupported=None):
    """(Fp8Recipe, use_cusparselt) when the FP8 2:4 path runs for this call, else None.

    unsupported: the caller's reason this call needs TE's own forward (a TE option not reproduced)."""
    enabled, te_recipe = te_fp8_state()
    if not enabled or not module.sparsity.prunes_weights or module.sparsity.backend == "dense":
        return None
    recipe = Fp8Recipe.from_te(te_recipe)
    weights = [getattr(module, name) for name in module._sparse_weight_names()]
    reason = unsupported or _route_reason(weights, recipe, te_recipe)
    if reason is not None:
        warn_once(
            f"megasparse: FP8 2:4 is off for this layer ({reason}); TE's dense FP8 GEMM "
            "runs on W*M instead",
            stacklevel=4,
        )
        return None
    return recipe, weights[0].device.type == "cuda"


def _scalers(module, recipe: Fp8Recipe, gemm=0):
    """(x, dY, e4m3 dY for the sparse dgrad) of GEMM `gemm`: the module's TE quantizer state where it
    exposes it, else megasparse's own scalers following the recipe (kept on the module, per GEMM)."""
    quantizers = getattr(module, "quantizers", None) if getattr(module, "fp8", False) else None
    x_scaler = grad_scaler = None
    if quantizers:
        per_gemm = getattr(module, "_num_fp8_tensors_per_gemm", {"fwd": 3, "bwd": 2})
        fwd, bwd = quantizers["scaling_fwd"], quantizers["scaling_bwd"]
        x_scaler = te_scaler(fwd[per_gemm["fwd"] * gemm], E4M3)  # GEMM1_INPUT of GEMM `gemm`
        grad_scaler = te_scaler(bwd[per_gemm["bwd"] * gemm], recipe.grad_dtype)  # GRAD_OUTPUT1
    own = getattr(module, "_megasparse_fp8_scalers", None)
    if own is None or own[0] != recipe:
        own = (recipe, {})
        module._megasparse_fp8_scalers = own
    if gemm not in own[1]:
        own[1][gemm] = (recipe.own_scaler(E4M3), recipe.own_scaler(recipe.grad_dtype))
    x_scaler = x_scaler or own[1][gemm][0]
    grad_scaler = grad_scaler or own[1][gemm][1]
    dgrad = None if recipe.grad_dtype == E4M3 else CurrentScaler(E4M3, recipe.margin)
    return x_scaler, grad_scaler, dgrad


def plan_for(module, route, out_dtype, gemm=0) -> Fp8LinearPlan:
    recipe, use_cusparselt = route
    return Fp8LinearPlan(
        *_scalers(module, recipe, gemm),
        use_cusparselt,
        recipe.fp8_wgrad,
        bool(getattr(module, "fuse_wgrad_accumulation", False)),
        out_dtype,
    )


def fp8_gemm(module, x, weight, bias, step, gemm, out_dtype, *, route):
    """GEMM `gemm` of a TE forward call on the FP8 2:4 route: y = x (W*M)^T + b."""
    return fp8_sparse_linear_step(x, weight, bias, step, plan_for(module, route, out_dtype, gemm))
