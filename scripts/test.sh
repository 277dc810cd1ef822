#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this). On a fresh machine it installs
# what it needs first: PyTorch 2.11.0 + the Python reference packages into the venv outside the
# work tree (scripts/setup-torch.sh), then formats-check, lints and tests the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup-torch.sh --test-deps)"
# A real Slurm for crates/rlhf-coord/tests/slurm.rs (one node on loopback) and multinode.rs (four
# nodes, each in its own network namespace: needs root and iproute2), from Debian's slurm-wlm +
# munge; the tests bring their clusters up and down with scripts/slurm-local.sh. As root (CI) it
# is installed and required; elsewhere the tests run when Slurm is installed and say SKIPPED
# otherwise.
if [ "$(id -u)" = 0 ]; then
  scripts/slurm-local.sh install
  export RLHF_REQUIRE_SLURM=${RLHF_REQUIRE_SLURM:-1}
fi
# Two cores: keep libtorch from oversubscribing them while cargo runs tests in parallel.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
