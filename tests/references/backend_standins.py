"""Backend stand-ins for the tests."""

from megasparse.core.backends import DenseBackend


class EmptyRefusingBackend(DenseBackend):
    """A sparse backend that, like PyTorch's semi-structured kernels, raises on an operand with no rows."""

    name = "empty-refusing"

    def linear(self, x2d, w, bias, sparse):
        assert x2d.shape[0] > 0, "sparse kernel called with an empty operand"
        return super().linear(x2d, w, bias, sparse)

    def input_grad(self, dy2d, w, sparse):
        assert dy2d.shape[0] > 0, "sparse kernel called with an empty operand"
        return super().input_grad(dy2d, w, sparse)
