"""Rewrite Megatron GPT layer / block specs so chosen linears become sparse: `sparsify_spec`.

Handles both spec forms: megatron-core 0.16 (ModuleSpec everywhere) and 0.19 (MLP, MoE and
experts as functools.partial builders). Never touches embeddings or the output layer (they are
not part of layer specs). Megatron-LM's `--spec` entry point lives in megasparse.megatron_lm.
It sits above megasparse.megatron and megasparse.te: it maps Megatron's local and Transformer
Engine classes to the sparse variants of both. A dense MLP becomes SparseMLP (the activation fused
with its sparsifier, fc1 told that its dH arrives sparse) only when fc2 is a target and the
activations are sparse, on the local and the TE spec alike; otherwise it keeps Megatron's own MLP
class over the sparse linears.
"""

import dataclasses
import functools
import inspect

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megasparse.megatron.compat import linear_entry
from megasparse.config import DEFAULT_TARGETS, TARGETS, SparsityConfig


def sparsify_spec(spec, sparsity: SparsityConfig, targets=DEFAULT_TARGETS):
    """A copy of `spec` (layer spec, block spec, or list of layer specs) with the `targets` linears sparse.

    targets: any of "qkv", "proj" (attention), "fc1", "fc2" (dense MLP), "experts" (MoE routed
    experts: SequentialMLP -> SparseSequentialMLP, TEGroupedMLP -> SparseTEGroupedMLP) and
    "shared_experts". Activation sparsity in `sparsity` applies to fc2 and experts only (local or
    Transformer Engine linears).
    The input spec is not modified.
    """
    if not isinstance(sparsity, SparsityConfig):
        raise TypeError(
            f"sparsify_spec needs a megasparse.SparsityConfig, got {type(sparsity).__name__}"
        )
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(
            f"sparsify_spec: unknown targets {unknown or '(none given)'}; choose from {list(TARGETS)}"
        )
    rewriter = _Rewriter(sparsity, set(targets))
    result = rewriter.any(spec)
    if (
        not rewriter.found
    ):  # targets absent from this kind of layer are fine (experts on a dense model)
        raise ValueError(
            f"sparsify_spec: targets {sorted(targets)} do not occur in this spec; nothing would be sparse"
        )
    return result


def require_transformer_engine(what: str) -> None:
    """Raise megasparse's clear error when `what` needs Transformer Engine and it is not installed
    (Megatron's own TE spec builders fail obscurely then: NameError on 0.16, TypeError on 0.19)."""
    from megatron.core.extensions import transformer_engine as mcore_te

    if not getattr(mcore_te, "HAVE_TE", False):
        raise ImportError(
            f"megasparse: {what} needs Transformer Engine, which is not installed: install it "
            "(pip install -e '.[te]' in the clone, or pip install "
            "'transformer-engine[pytorch]>=2.5', on a CUDA machine) or use Megatron's local spec "
            "(Megatron-LM: --transformer-impl local; megatron-core: get_gpt_layer_local_spec)"
        )


def _owner_class(func):
    """The class a builder constructs: a class, or the class of a bound classmethod like MLP.as_mlp_submodule."""
    if inspect.ismethod(func) and inspect.isclass(func.__self__):
        return func.__self__
    return func if inspect.isclass(func) else None


class _Rewriter:
    def __init__(self, sparsity, targets):
        self.sparsity = sparsity
        # fc1 reads the activation's options (activations, activation_wgrad) from its fc2
        self.weights_only = dataclasses.replace(
            sparsity, activations=None, activation_function=None, activation_wgrad=None
        )
        self.targets = targets
        self.found = set()

    # -- generic walking ----------------------------------------------------------------------

    def any(self, node):
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        if isinstance(node, (list, tuple)):
            return type(node)(self.any(n) for n in node)
        if isinstance(node, TransformerBlockSubmodules):
            return dataclasses.replace(node, layer_specs=[self.any(s) for s in node.layer_specs])
        module, submodules = self._split(node)
        from megatron.core.transformer.transformer_block import TransformerBlock
        from megatron.core.transformer.transformer_layer import BaseTransformerLayer

        if module is not None and issubclass(module, TransformerBlock):
            return self._join(node, submodules=self.any(submodules))
        if module is not None and issubclass(module, BaseTransformerLayer):
            return self._join(node, submodules=self._layer(submodules))
        raise TypeError(f"sparsify_spec: expected a GPT layer or block spec, got {node!r}")

    @staticmethod
    def _split(node):
        """(module class or None, submodules) of a ModuleSpec, a partial builder or a class."""
        if isinstance(node, ModuleSpec):
            module = node.module if inspect.isclass(node.module) else None
            return module, node.submodules
        if isinstance(node, functools.partial):
            return _owner_class(node.func), node.keywords.get("submodules")
        if inspect.isclass(node):
            return node, None
        return None, None

    @staticmethod
    def _join(node, module=None, submodules=None, params=None):
        """`node` in its own form with a new class, submodules and extra params."""
        if isinstance(node, ModuleSpec):
            changes = {"submodules": submodules if submodules is not None else node.submodules}
            if module is not None:
                changes["module"] = module
            if params:
                changes["params"] = {**node.params, **params}
            return dataclasses.replace(node, **changes)
        if isinstance(node, functools.partial):
            func = node.func
            if module is not None:
                func = getattr(module, func.__name__) if inspect.ismethod(func) else module
            keywords = dict(node.keywords)
            if submodules is not None:
                keywords["submodules"] = submodules
            keywords.update(params or {})
            return functools.partial(func, *node.args, **keywords)
        if inspect.isclass(node) and module is not None:
            return functools.partial(module, **(params or {}))
        return node

    # -- the GPT layer ------------------------------------------------------------------------

    def _layer(self, layer):
        changes = {}
        attention = getattr(layer, "self_attention", None)
        if attention is not None and self.targets & {"qkv", "proj"}:
            module, sub = self._split(attention)
            if sub is not None:
                linears = {}
                if "qkv" in self.targets and hasattr(sub, "linear_qkv"):
                    linears["linear_qkv"] = self._linear(sub.linear_qkv, "qkv", self.weights_only)
                if "proj" in self.targets and hasattr(sub, "linear_proj"):
                    linears["linear_proj"] = self._linear(
                        sub.linear_proj, "proj", self.weights_only
                    )
                changes["self_attention"] = self._join(
                    attention, submodules=dataclasses.replace(sub, **linears)
                )
        mlp = getattr(layer, "mlp", None)
        if mlp is not None:
            changes["mlp"] = self._mlp_or_moe(mlp)
        return dataclasses.replace(layer, **changes)

    def _mlp_or_moe(self, node):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        module, sub = self._split(node)
        if module is not None and issubclass(module, MoELayer):
            return self._moe(node, sub)
        if module is not None and issubclass(module, MLP):
            return self._dense_mlp(node, module, sub, ("fc1", "fc2"))
        return node

    def _dense_mlp(self, node, module, sub, names, mlp_class_for=None):
        from megasparse.megatron.mlp import SparseMLP

        wanted = [n for n in names if n in self.targets]
        if not wanted or sub is None:
            return node
        if module.__name__ == "TEFusedMLP":
            raise NotImplementedError(
                "sparsify_spec: this MLP is Megatron's TEFusedMLP (use_te_op_fuser), whose fused "
                "Transformer Engine ops compute with the weights directly, not through the sparse "
                "linears. Build the spec with use_te_op_fuser=False (Megatron's MLP), or leave "
                f"{wanted} out of the targets."
            )
        linears = {}
        if "fc1" in wanted:
            linears["linear_fc1"] = self._linear(sub.linear_fc1, "fc1", self.weights_only)
        if "fc2" in wanted:
            linears["linear_fc2"] = self._linear(sub.linear_fc2, "fc2", self.sparsity)
        # SparseMLP only where it fuses the activation with its sparsifier: Megatron's own MLP
        # otherwise, so the transformer layer passes it what it passes an MLP (0.16: tp_group only
        # for the MLP class itself); subclasses (e.g. SharedExpertMLP) stay
        activation_sparse = "fc2" in wanted and self.sparsity.activations is not None
        new_module = SparseMLP if module is MLP and activation_sparse else None
        return self._join(node, module=new_module, submodules=dataclasses.replace(sub, **linears))

    def _moe(self, node, sub):
        changes = {}
        if "experts" in self.targets and sub.experts is not None:
            changes["experts"] = self._experts(sub.experts)
        if "shared_experts" in self.targets and getattr(sub, "shared_experts", None) is not None:
            shared = sub.shared_experts
            _, shared_sub = self._split(shared)
            linears = dict(
                linear_fc1=self._linear(shared_sub.linear_fc1, "shared_experts", self.weights_only),
                linear_fc2=self._linear(shared_sub.linear_fc2, "shared_experts", self.sparsity),
            )
            changes["shared_experts"] = self._join(
                shared, submodules=dataclasses.replace(shared_sub, **linears)
            )
        return self._join(node, submodules=dataclasses.replace(sub, **changes))

    def _experts(self, node):
        from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

        from megasparse.megatron.experts import SparseSequentialMLP
        from megasparse.te.experts import SparseTEGroupedMLP

        module, _ = self._split(node)
        mapping = {SequentialMLP: SparseSequentialMLP, TEGroupedMLP: SparseTEGroupedMLP}
        if module in mapping:
            self.found.add("experts")
            return self._join(node, module=mapping[module], params={"sparsity": self.sparsity})
        if module in mapping.values():
            self.found.add("experts")
            return node
        raise NotImplementedError(
            f"sparsify_spec: experts of type {getattr(module, '__name__', module)} are not supported; use "
            "SequentialMLP (moe_grouped_gemm=False) or TEGroupedMLP, or megasparse.SparseGroupedMLP directly"
        )

    def _linear(self, entry, target, sparsity):
        from megasparse.megatron.layers import SparseColumnParallelLinear, SparseRowParallelLinear

        module, _ = self._split(entry)
        mapping = {
            ColumnParallelLinear: SparseColumnParallelLinear,
            RowParallelLinear: SparseRowParallelLinear,
        }
        if module in mapping:
            self.found.add(target)
            return linear_entry(mapping[module], sparsity)
        if module in mapping.values():
            self.found.add(target)
            return entry
        name = getattr(module, "__name__", repr(entry))
        if name in (
            "TEColumnParallelLinear",
            "TERowParallelLinear",
            "TELayerNormColumnParallelLinear",
        ):
            from megasparse.te.linear import sparse_te_class

            # Megatron's own TE class (tests use stand-ins named like it)
            if getattr(module, "__module__", "").startswith("megatron.core.extensions"):
                require_transformer_engine(f"sparsify_spec: {target} ({name})")
            self.found.add(target)
            return linear_entry(sparse_te_class(module), sparsity)
        if name.startswith("TE"):
            raise NotImplementedError(
                f"sparsify_spec: {target} is Transformer Engine's {name}, which has no sparse variant; build the "
                f"model with the local spec (Megatron-LM: --transformer-impl local), or leave {target!r} out."
            )
        raise TypeError(
            f"sparsify_spec: cannot make {target} ({name}) sparse: not a Column/RowParallelLinear"
        )
