"""How much |W| each 2:4 mask keeps on Gaussian weights (the numbers in docs/numerics.md).

python -m megasparse.tools.mask_report [--size 2048] [--seed 0]
"""

import argparse

import torch

from megasparse.kernels import (
    mask_1d_reference,
    mask_transposable_greedy,
    mask_transposable_reference,
)


def tile_sums(a: torch.Tensor) -> torch.Tensor:
    rows, cols = a.shape
    return a.reshape(rows // 4, 4, cols // 4, 4).sum((1, 3)).flatten()


def report(size: int, seed: int) -> dict:
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    a = w.abs().double()
    masks = {
        "1d": mask_1d_reference(w),
        "transposable (exact)": mask_transposable_reference(w),
        "transposable (greedy)": mask_transposable_greedy(w),
    }
    kept = {name: float((a * m).sum() / a.sum()) for name, m in masks.items()}
    exact, greedy = (
        tile_sums(a * masks["transposable (exact)"]),
        tile_sums(a * masks["transposable (greedy)"]),
    )
    return {
        "kept": kept,
        "exact_beats_greedy_tiles": float((exact > greedy).double().mean()),
        "greedy_beats_exact_tiles": float((greedy > exact).double().mean()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size", type=int, default=2048, help="the weight is size x size (a multiple of 4)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    r = report(args.size, args.seed)
    print(f"share of |W| kept, {args.size}x{args.size} Gaussian weight (seed {args.seed})")
    for name, value in r["kept"].items():
        print(f"  {name:<22} {value:.4f}")
    print(
        f"  exact > greedy on {100 * r['exact_beats_greedy_tiles']:.1f}% of 4x4 tiles, "
        f"greedy > exact on {100 * r['greedy_beats_exact_tiles']:.1f}%"
    )


if __name__ == "__main__":
    main()
