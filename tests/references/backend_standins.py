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


class CountingSparseBackend(DenseBackend):
    """A sparse backend to the layers and weight states (its name is not "dense") that computes
    dense: logs every compression (the shape compressed) and every GEMM as (role, the operand it
    was told is sparse, rows)."""

    name = "counting-sparse"

    def __init__(self):
        self.compressed, self.gemms = [], []

    def compress(self, matrix):
        self.compressed.append(tuple(matrix.shape))
        return matrix.clone()

    def linear(self, x2d, w, bias, sparse):
        self.gemms.append(("forward", sparse, x2d.shape[0]))
        return super().linear(x2d, w, bias, sparse)

    def input_grad(self, dy2d, w, sparse):
        self.gemms.append(("input_grad", sparse, dy2d.shape[0]))
        return super().input_grad(dy2d, w, sparse)
