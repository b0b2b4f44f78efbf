#!/usr/bin/env bash
# The whole test suite, every layer, as CI runs it (after deploy/install.sh --test):
# lint, types, the unit layer as an unprivileged user, then unit + integration as root.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff" >&2
python3 -m ruff check crishim tests benchmarks plugins
echo "== mypy" >&2
python3 -m mypy
echo "== unit tests as uid 65534 (no root, no netns)" >&2
# (nobody may not write the tree: Hypothesis keeps its examples in a directory of its own)
hypothesis_dir=$(mktemp -d /tmp/crishim-hypothesis-XXXXXX)
trap 'rm -rf "$hypothesis_dir"' EXIT
chown 65534:65534 "$hypothesis_dir"
HYPOTHESIS_STORAGE_DIRECTORY=$hypothesis_dir \
    python3 -m tests.support.unprivileged -m pytest -q -p no:cacheprovider tests/unit
echo "== all tests (root: network namespaces, real clients, containerd)" >&2
python3 -m pytest -q tests
