"""The Megatron-LM patches call only what megasparse.megatron_lm provides, and add the flags a launch uses."""

import importlib
import re
from pathlib import Path

import megasparse.megatron_lm as megatron_lm

ROOT = Path(__file__).resolve().parents[2]


def test_patches_call_existing_hooks():
    patches = sorted((ROOT / "patches").glob("pretrain_gpt.core_*.patch"))
    assert len(patches) == 2
    for patch in patches:
        added = [
            line[1:]
            for line in patch.read_text().splitlines()
            if line.startswith("+") and not line.startswith("+++")
        ]
        assert len(added) == 3, patch.name
        names = set(re.findall(r"megasparse_lm\.(\w+)", "\n".join(added)))
        assert names == {"on_forward_step", "extra_args_provider"}, patch.name
        assert all(callable(getattr(megatron_lm, n)) for n in names)


def test_example_launch_uses_real_flags_and_spec():
    import argparse

    from megasparse.megatron.args import add_args

    script = (ROOT / "examples" / "pretrain_gpt_sparse.sh").read_text()
    flags = re.findall(r"(--sparsity-[\w-]+(?: [^-\\\n][^ \\\n]*)*)", script)
    argv = " ".join(flags).split()
    args = add_args(argparse.ArgumentParser()).parse_args(argv)  # every flag in the script parses
    assert args.sparsity_weights == "2:4" and args.sparsity_activations == "2:4"
    module, name = re.search(r"--spec (\S+) (\S+)", script).groups()
    assert name in vars(
        importlib.import_module(module)
    )  # Megatron-LM imports the module, reads vars(module)[name]
