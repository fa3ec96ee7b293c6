"""SparseMLP: Megatron's MLP with the FFN activation sparsified where it is computed.

Drop-in for `MLP` in a layer spec (0.16 `ModuleSpec(module=SparseMLP, submodules=...)`, 0.19
`partial(SparseMLP.as_mlp_submodule, submodules=...)`), with sparse linears as fc1 / fc2 and
`activations` (and `activation_wgrad`) set in fc2's SparsityConfig: the local spec's
`SparseColumnParallelLinear` / `SparseRowParallelLinear`, or the TE spec's sparse
TELayerNormColumnParallelLinear / TERowParallelLinear (megasparse.te.linear: their bf16/fp16 route
runs the same op; FP8 is refused with activation sparsity) - any fc1 / fc2 with the sides of
megasparse.megatron.activation_input. Megatron's own forward runs unchanged; only the activation
call is replaced, so that
- Squared-ReLU and the 2:4 / V:N:M sparsifier run as one kernel pass;
- fc2 receives the already-sparse activation: 2:4 marked as a sparse GEMM operand; V:N:M with
  M >= 8 carrying its compact form (megasparse.core.compact_activation), whose chosen columns
  fc2's forward gathers and whose gradient fc2 computes only there;
- fc1's output gradient dH = dA * mask * 2 relu(H) arrives marked (2:4) or compact (M >= 8), so
  its input gradient dX = dH W1 takes dH as the sparse operand or gathers its chosen columns;
- with `activation_wgrad`, both weight gradients reduce over the tokens kept along tokens.
Each tensor-parallel rank selects on its own ffn shard (groups of M never cross one).
Activation sparsity needs a non-gated FFN: a gated one (SwiGLU, gated_linear_unit=True) is refused
at construction, since the selection would act on the GLU product, not on an activation of fc1's
output. Other non-gated activations (GeLU, fused bias-GeLU, TE activations) are sparsified unfused
by fc2, which still reads the compact form (M >= 8), and their loss shows in the stats; their dH
is a plain tensor, so fc1's input and weight gradients run dense and exact.
"""

from megatron.core.activations import squared_relu
from megatron.core.transformer.mlp import MLP

from megasparse.core.activation_sparsity import FFNActivationSparsifier
from megasparse.megatron.activation_input import FeedsSparseActivation, SparseActivationInput
from megasparse.core.weight_state import refuse_graph_capture


def install_activation_sparsity(mlp: MLP) -> None:
    """Give an MLP (or an MoE expert) SparseMLP's activation: fused with the sparsifier, counted once.
    fc2 / fc1: any linear with the activation-input side / the feeding side (local or TE)."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    refuse_gated_activation_sparsity(mlp)
    if isinstance(fc2, SparseActivationInput) and not isinstance(
        mlp.activation_func, FFNActivationSparsifier
    ):
        activation = mlp.activation_func
        mlp.activation_func = FFNActivationSparsifier(
            activation, fc2, is_squared_relu=is_squared_relu(activation)
        )
        fc2.input_sparsified_upstream = True
        if isinstance(fc1, FeedsSparseActivation):
            fc1.feeds_sparse_activation_of(fc2)  # fc1 reads fc2's current config at every forward


def refuse_gated_activation_sparsity(mlp: MLP) -> None:
    """Activation sparsity of a gated FFN (SwiGLU) is refused with the fix; its weights may be sparse."""
    fc2 = mlp.linear_fc2
    pattern = getattr(getattr(fc2, "sparsity", None), "activations", None)
    if pattern is None or not mlp.config.gated_linear_unit:
        return
    raise ValueError(
        f"megasparse: activations={pattern!r} needs a non-gated Squared-ReLU FFN, but this "
        f"{type(mlp).__name__} is gated (gated_linear_unit=True, e.g. SwiGLU): its fc2 input is "
        "the GLU product act(x W) * (x V), whose sparsity the selection does not match. Use "
        "gated_linear_unit=False with activation_func=squared_relu (Megatron-LM: --squared-relu, "
        "no --swiglu), or set activations=None (--sparsity-activations none) to keep 2:4 weights "
        "only."
    )


def is_squared_relu(fn) -> bool:
    """Whether `fn` is Megatron's Squared-ReLU (fused with the sparsifier in one kernel pass)."""
    return fn is squared_relu


class SparseMLP(MLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_activation_sparsity(self)

    def forward(self, hidden_states, *args, **kwargs):
        refuse_gated_activation_sparsity(self)  # activations may be set after construction
        # the activation's sparsifier reads its phase in Python, which graph replays skip
        if isinstance(self.activation_func, FFNActivationSparsifier):
            refuse_graph_capture(hidden_states, self.linear_fc2.sparsity)
        return super().forward(hidden_states, *args, **kwargs)

    def activation_stats(self, reset: bool = False) -> dict:
        """Exact-zero fraction and dropped-L1 fraction of the activation since the last reset (this rank)."""
        return self.linear_fc2.activation_stats(reset)
