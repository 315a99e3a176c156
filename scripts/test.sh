#!/usr/bin/env bash
# Every test: Rust unit + integration tests (parity against PyTorch references, real data from
# ../shared/data when present). Does its own set-up first (idempotent, cached).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
source "$here/scripts/env.sh"
cd "$here"

# Reference tests must not skip silently where their inputs exist.
export SFR_REQUIRE_PYTHON=1
if [ -d "$here/../shared/data" ]; then
  export SFR_REQUIRE_DATA=1
else
  echo "[test] ../shared/data is absent: real-data tests will print SKIPPED and not run"
fi

echo "[test] cargo test --release"
cargo test --release --quiet 2>&1

echo "[test] C and C++ (CMake package, ctest: C API under valgrind, ITK program, consumer project)"
"$here/scripts/test_c.sh"

echo "[test] 3D Slicer module logic (pytest against the built library)"
"$here/scripts/test_slicer.sh"

echo "[test] the wheel: build, install into a new venv, use it with the build tree and the cache hidden"
"$here/scripts/test_wheel.sh"
