"""The FFN activation as a linear's GEMM operand, for the local and the sparse TE linears alike.

Two sides of one MLP: fc2 (`SparseActivationInput`) sparsifies its input, the FFN activation, to
`sparsity.activations` (2:4 or V:N:M), unless SparseMLP's activation already did, and counts what
it dropped; fc1 (`FeedsSparseActivation`) learns from SparseMLP that its output gradient dH is the
gradient of that activation and may arrive marked 2:4 or compact, so its op must run to take dH as
the sparse operand of its input-gradient GEMM. The GEMMs themselves are the layer's own (local:
megasparse.megatron.layers; TE: megasparse.te); these mixins only say when and what they receive.
"""

import weakref

from megasparse.core.activation_sparsity import ActivationStats, sparsify
from megasparse.core.sparse_operand import sparse_pattern


class LinearActivationRole:
    """A sparse linear outside an activation-sparse FFN (the defaults both sides override)."""

    def _capture_configs(self) -> tuple:
        """The configs that decide whether some phase of this layer runs megasparse's op."""
        return (self.sparsity,)

    def _sparse_input_now(self) -> bool:
        """Whether a sparse activation reaches this layer's GEMMs now (its input or dH)."""
        return False

    def _sparse_input(self, input):
        """The GEMM input as this layer computes with it."""
        return input


class SparseActivationInput(LinearActivationRole):
    """fc2's side: the input is the FFN activation, sparsified here or upstream (SparseMLP)."""

    def _setup_activation_input(
        self, *, ffn_size: int, columns_per_rank: int, tp: int, comm_name
    ) -> None:
        """Counters and the construction checks of an activation-sparse fc2.

        ffn_size: fc2's input size over all ranks; columns_per_rank: its input columns on this
        rank (the ffn shard the selection runs on); comm_name: the tp_comm_buffer_name it was
        built with (Megatron's MLP passes "fc2")."""
        self.activation_counter = ActivationStats()
        self.input_sparsified_upstream = False  # set by SparseMLP: its activation sparsifies
        pattern = self.sparsity.activation_pattern
        if pattern is None:
            return
        name, m = type(self).__name__, pattern.m
        if columns_per_rank % m:
            raise ValueError(
                f"megasparse: activations={self.sparsity.activations!r} groups {m} FFN columns, but "
                f"ffn size {ffn_size} over tensor-parallel size {tp} gives {columns_per_rank} per "
                f"rank. Make the FFN size a multiple of {m}*TP={m * tp}."
            )
        if getattr(self.config, "gated_linear_unit", False):
            raise ValueError(
                f"megasparse: activations={self.sparsity.activations!r} needs a non-gated "
                "Squared-ReLU FFN, but this fc2 belongs to a gated one (gated_linear_unit=True, "
                "e.g. SwiGLU or a gated shared expert): its input is the gate's product, not a "
                "Squared-ReLU activation. Use gated_linear_unit=False with squared_relu, or "
                "activations=None for this layer (weights may stay 2:4)."
            )
        if comm_name != "fc2":
            raise ValueError(
                f"megasparse: activations={self.sparsity.activations!r} sparsifies the FFN activation, "
                f"the input of an MLP's fc2, but this {name} was built with tp_comm_buffer_name="
                f"{comm_name!r}. Build it as an MLP's linear_fc2 (Megatron's MLP passes "
                "tp_comm_buffer_name='fc2'), pass tp_comm_buffer_name='fc2' yourself if its input "
                "is an FFN activation, or set activations=None."
            )

    def activation_stats(self, reset: bool = False) -> dict:
        """Exact-zero fraction and dropped-L1 fraction of the input activation since the last reset."""
        result = self.activation_counter.as_dict()
        if reset:
            self.activation_counter.reset()
        return result

    def _sparse_input_now(self) -> bool:
        return self.sparsity.sparsifies_activations

    def _sparse_input(self, input):
        """The GEMM input: the activation sparsified to the configured pattern (marked 2:4, or
        carrying its compact form)."""
        if not self.sparsity.sparsifies_activations:
            return input
        if sparse_pattern(input) == self.sparsity.activation_pattern:
            return input  # sparsified (and counted) by SparseMLP's activation
        # hand-built fc2, or an activation rescaled on the way (MoE probs): sparsify here
        stats = None if self.input_sparsified_upstream else self.activation_counter
        pattern, wgrad = self.sparsity.activation_pattern, self.sparsity.activation_wgrad_pattern
        return sparsify(input, pattern, stats, wgrad)[0]


class FeedsSparseActivation(LinearActivationRole):
    """fc1's side: its output feeds an activation-sparse fc2 (declared by SparseMLP), so its output
    gradient dH may arrive marked 2:4 or compact."""

    def feeds_sparse_activation_of(self, fc2) -> None:
        """Declared by SparseMLP: our output is the FFN activation's input, so dH may arrive sparse."""
        self._feeds = weakref.ref(fc2)  # not a submodule: no state_dict entry, no cycle

    def _fed_fc2(self):
        """The fc2 whose activation we feed (None: not declared, or gone)."""
        ref = self.__dict__.get("_feeds")
        return None if ref is None else ref()

    def _capture_configs(self) -> tuple:
        fc2 = self._fed_fc2()  # its activation sparsity makes our dH sparse
        if fc2 is None or fc2.sparsity.activations is None:
            return (self.sparsity,)
        return (self.sparsity, fc2.sparsity)

    def _sparse_input_now(self) -> bool:
        # dH may arrive 2:4 or compact (M >= 8): run our op, whose backward takes dH as the sparse
        # operand or gathers its chosen columns
        fc2 = self._fed_fc2()
        return fc2 is not None and fc2.sparsity.sparsifies_activations
