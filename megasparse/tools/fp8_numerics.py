"""FP8 + sparsity numerics, per layer: quantization error and kept magnitude, with and without 2:4, per order.

    python -m megasparse.tools.fp8_numerics --checkpoint model.pt [--mask 1d|transposable] [--json out.json]
    megasparse.tools.fp8_numerics.report(model_or_state_dict)  # the same from Python

For every 2-D weight that megasparse could sparsify (not embeddings or the output layer):
  fp8_err          ||Q(W) - W|| / ||W||                 dense FP8 (current scaling)
  kept             sum|W*M| / sum|W|                     share of magnitude the 2:4 mask keeps
  <order>_err      ||Q_s(W) - W*M|| / ||W*M||           FP8 error of the sparse weight
  <order>_total    ||Q_s(W) - W|| / ||W||               pruning and FP8 together
for both orders (megasparse.config.Fp8Order); Q is e4m3 with per-tensor scaling.
A checkpoint is a torch state_dict file (or Megatron's {"model": state_dict}).
"""

import argparse
import json

import torch

from megasparse.config import Fp8Order
from megasparse.core.masks import weight_mask
from megasparse.fp8.scaling import amax_of, quantize_with, scale_from_amax
from megasparse.fp8.study import sparse_fp8_weight

SKIP = ("embedding", "output_layer", "layernorm", "norm")


def _weights(model_or_state_dict):
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, torch.nn.Module)
        else model_or_state_dict
    )
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    for name, tensor in state.items():
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.dim() == 2
            and tensor.is_floating_point()
            and name.endswith("weight")
            and not any(s in name for s in SKIP)
        ):
            yield name, tensor


def layer_report(weight: torch.Tensor, mask_kind: str = "1d") -> dict:
    w = weight.detach().float()
    norm = w.double().norm()
    dense_scale = scale_from_amax(amax_of(w))
    row = {
        "shape": list(w.shape),
        "fp8_err": float(
            (quantize_with(w, dense_scale).double() / dense_scale.double() - w.double()).norm()
            / norm
        ),
        "kept": float(
            (w.abs() * weight_mask(w, mask_kind)).double().sum() / w.abs().double().sum()
        ),
    }
    for order in Fp8Order:
        w_q, scale, mask = sparse_fp8_weight(w, None, mask_kind, order)
        deq = w_q.double() / scale.double()
        pruned = w.double() * mask
        row[f"{order}_err"] = float((deq - pruned).norm() / pruned.norm())
        row[f"{order}_total"] = float((deq - w.double()).norm() / norm)
    return row


def report(model_or_state_dict, mask_kind: str = "1d") -> dict:
    """{layer name: numbers} for every sparsifiable 2-D weight (shapes that 2:4 cannot cut are skipped)."""
    rows = {}
    rows_multiple = 4 if mask_kind == "transposable" else 1
    for name, w in _weights(model_or_state_dict):
        if w.shape[1] % 4 == 0 and w.shape[0] % rows_multiple == 0:
            rows[name] = layer_report(w, mask_kind)
    return rows


def format_table(rows: dict) -> str:
    short = {Fp8Order.PRUNE_THEN_QUANTIZE: "P>Q", Fp8Order.QUANTIZE_THEN_PRUNE: "Q>P"}
    header = f"{'layer':<48} {'fp8 err':>8} {'kept':>6}" + "".join(
        f" {short[o] + ' err':>8} {short[o] + ' total':>9}" for o in Fp8Order
    )
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(
            f"{name[-48:]:<48} {r['fp8_err']:>8.4f} {r['kept']:>6.3f}"
            + "".join(f" {r[f'{o}_err']:>8.4f} {r[f'{o}_total']:>9.4f}" for o in Fp8Order)
        )
    lines.append(
        "P>Q: prune then quantize, Q>P: quantize then prune; err vs the pruned weight, total vs the dense one"
    )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="torch state_dict file (or Megatron's {'model': ...})"
    )
    p.add_argument("--mask", default="1d", choices=["1d", "transposable"])
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    rows = report(torch.load(args.checkpoint, map_location="cpu", weights_only=False), args.mask)
    if not rows:
        raise SystemExit(f"no sparsifiable 2-D weights in {args.checkpoint}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
