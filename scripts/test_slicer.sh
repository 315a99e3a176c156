#!/usr/bin/env bash
# pytest suite of the Slicer module's logic (slicer_module/SFRSegmentation/SFRSegmentationLib)
# against the real built library and tool, in the cached venv's Python (numpy, nibabel, pytest).
# Expects `cargo build --release` to have run (scripts/test.sh does it through cargo test).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
cd "$here"
export SFR_LIBRARY="${SFR_LIBRARY:-$here/target/release/libsfr.so}"
export SFR_CLI="${SFR_CLI:-$here/target/release/sfr}"
for f in "$SFR_LIBRARY" "$SFR_CLI"; do
  if [ ! -f "$f" ]; then
    echo "[test_slicer] $f is missing: run 'cargo build --release' first" >&2
    exit 1
  fi
done
echo "[test_slicer] python -m pytest tests/slicer -q (SFR_LIBRARY=$SFR_LIBRARY)"
# No .pytest_cache in the checkout.
python -m pytest -p no:cacheprovider tests/slicer -q "$@"
