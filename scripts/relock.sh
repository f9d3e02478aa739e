#!/usr/bin/env bash
# Rewrite constraints.txt (the locked environment) from a fresh, unlocked set-up of the committed tree: the newest
# releases that pyproject.toml and scripts/setup.sh allow. Run the whole suite on the result before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone -q . "$scratch/repo"
AISEC_TRAIN_UNLOCKED=1 "$scratch/repo/scripts/setup.sh"
"$scratch/repo/.venv/bin/pip" install -q wheel  # pip's build environments install it: pinned with the rest
{
  sed -n '/^#/!q;p' constraints.txt  # the header comment stays
  "$scratch/repo/.venv/bin/pip" freeze --all --exclude-editable
} >"$scratch/constraints.txt"
mv "$scratch/constraints.txt" constraints.txt
echo "constraints.txt rewritten; next: .venv/bin/python -m pytest -m 'not gpu' -n 2, then commit it"
