#!/usr/bin/env bash
# Builds what scripts/gpu/checks.sh runs on a GPU machine that has PyTorch but no Rust: release
# rlhf-coord, rlhf-worker, the model benchmark and the CUDA-gated test binaries (rlhf-comm NCCL,
# rlhf-algo and rlhf-model device tests), stripped and packed into .gpu/bins.tar.xz (~9 MB).
# Any libtorch 2.11 here will do (the binaries open libtorch_cuda.so at run time, from the GPU
# machine's PyTorch). Copy or carry `.gpu/` to the GPU machine and run scripts/gpu/checks.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-coord -p rlhf-worker
cargo build --release -q -p rlhf-model --example bench_model
list=$(cargo test --release --no-run --message-format=json -p rlhf-comm --test nccl \
  -p rlhf-algo --test device -p rlhf-model --test device 2>/dev/null |
  python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["package_id"].split("#")[0].rsplit("/", 1)[-1].split("@")[0], m["executable"])')
rm -rf .gpu/bin && mkdir -p .gpu/bin
strip -o .gpu/bin/rlhf-coord target/release/rlhf-coord
strip -o .gpu/bin/rlhf-worker target/release/rlhf-worker
strip -o .gpu/bin/bench_model target/release/examples/bench_model
while read -r pkg exe; do
  case $pkg in
    rlhf-comm) strip -o .gpu/bin/nccl "$exe" ;;
    rlhf-algo) strip -o .gpu/bin/algo-device "$exe" ;;
    rlhf-model) strip -o .gpu/bin/model-device "$exe" ;;
  esac
done <<<"$list"
for b in nccl algo-device model-device; do
  [ -x .gpu/bin/$b ] || { echo "bundle: no test binary for $b" >&2; exit 1; }
done
[ -f "$RLHF_TORCH_LIB/libtorch_cuda.so" ] ||
  echo "bundle: warning: $RLHF_TORCH_LIB has no libtorch_cuda.so (a CPU-only PyTorch); the binaries still work with the GPU machine's CUDA libtorch" >&2
tar -C .gpu -cJf .gpu/bins.tar.xz bin && rm -rf .gpu/bin
ls -la .gpu/bins.tar.xz
