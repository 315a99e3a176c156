#!/usr/bin/env bash
# Idempotent set-up: Debian packages, the cached PyTorch venv, the release build.
# A second run does no download and only an incremental build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"

# Debian packages used by the C/C++ tests (cmake, ITK, valgrind) and the build.
need=()
for p in cmake g++ pkg-config valgrind libinsighttoolkit5-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# PyTorch (libtorch for tch) plus the Python packages the reference tests use; slicer-core
# (Slicer's MRML and Segmentations libraries, headless, with the vtk it is built against) for
# the Slicer module's scene tests (tests/slicer/test_scene.py).
stamp="$SFR_VENV/.sfr-complete"
reqs="torch==$SFR_TORCH_VERSION numpy nibabel scipy segment-anything==1.0 safetensors pytest slicer-core==5.13.31053.0 vtk==9.6.2"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$reqs" ]; then
  echo "[setup] installing PyTorch $SFR_TORCH_VERSION into $SFR_VENV (once, ~5 GB)"
  mkdir -p "$SFR_CACHE"
  [ -x "$SFR_VENV/bin/python" ] || python3 -m venv "$SFR_VENV"
  "$SFR_VENV/bin/python" -m pip install -q --disable-pip-version-check $reqs
  echo "$reqs" > "$stamp"
fi

# cbindgen generates include/sfr.h; scripts/test_c.sh checks the committed header against a
# fresh run, so the version is pinned (another version may format the header differently).
cbindgen_version=0.29.4
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(cbindgen --version 2>/dev/null)" != "cbindgen $cbindgen_version" ]; then
  echo "[setup] installing cbindgen $cbindgen_version (once)"
  cargo install cbindgen --version "$cbindgen_version" --locked --quiet
fi

echo "[setup] building sfr (release)"
cd "$here"
cargo build --release --quiet
