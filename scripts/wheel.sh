#!/usr/bin/env bash
# Builds the installable wheel into dist/: `sfr` + libsfr (+ sfr.h, CMake and pkg-config files),
# libtorch from its `torch==2.13.*` dependency found relative to the package (no absolute path).
#   ./scripts/wheel.sh      -> dist/sfr_segmentation-X.Y.Z-py3-none-manylinux_2_NN_x86_64.whl
# The manylinux tag is the one auditwheel derives from the glibc symbol versions the binaries need
# (scripts/build_wheel.py checks it); libtorch's libraries are excluded from grafting because the
# torch wheel provides them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
source "$here/scripts/env.sh"
cd "$here"
cargo build --release --quiet
wheel="$(python "$here/scripts/build_wheel.py" --out "$here/dist" | tail -n 1)"
echo "wheel: ${wheel#"$here"/}"
