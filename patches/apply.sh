#!/usr/bin/env bash
# Apply megasparse's patch to a Megatron-LM checkout's pretrain_gpt.py.
#   bash patches/apply.sh /path/to/Megatron-LM
# Tries the patch of each supported line (core_v0.16.x, core_v0.19.x) and applies the one that fits.
set -euo pipefail
target=${1:?usage: bash patches/apply.sh /path/to/Megatron-LM}
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$target/pretrain_gpt.py" ] || { echo "no pretrain_gpt.py in $target" >&2; exit 2; }
if grep -q "megasparse_lm" "$target/pretrain_gpt.py"; then
  echo "pretrain_gpt.py in $target is already patched"; exit 0
fi
for patch in "$here"/pretrain_gpt.core_v0.19.0.patch "$here"/pretrain_gpt.core_v0.16.1.patch; do
  if patch --dry-run -s -p1 -d "$target" < "$patch" >/dev/null 2>&1; then
    patch -s -p1 --no-backup-if-mismatch -d "$target" < "$patch"
    echo "applied $(basename "$patch") to $target/pretrain_gpt.py"
    exit 0
  fi
done
echo "none of megasparse's patches fits $target/pretrain_gpt.py (supported: core_v0.16.x, core_v0.19.x)" >&2
exit 1
