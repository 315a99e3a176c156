#!/usr/bin/env bash
# The wheel on a clean environment: build it (scripts/wheel.sh), install it into a new virtual
# environment, then use it with the build tree and the cached venv hidden (empty tmpfs mounted over
# them in a private mount namespace), so that only what the wheel and the new venv hold can be
# found. Checks: RUNPATHs relative, ldd resolving libtorch inside the new venv, `sfr --version`,
# `sfr demo --help`, a test-tiny train + segment on shipped scans, and a C program built with
# pkg-config against the installed library.
#
# torch comes from the cache without a download: the new venv gets the cached venv's
# site-packages as hard links (same files, new paths), so pip sees torch==2.13.0 installed and
# resolves the wheel's dependency offline (--no-index); no sfr package is in the cache's venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/wheel.sh"
source "$here/scripts/env.sh"
wheel="$(ls -t "$here"/dist/sfr_segmentation-*.whl | head -n 1)"
py="$(python -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"

work="$(mktemp -d /tmp/sfr-wheel-test.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# --without-pip: site-packages starts empty, so the links below collide with nothing (pip comes
# with the cached packages).
python3 -m venv --without-pip "$work/venv"
site="$work/venv/lib/$py/site-packages"
cp -al "$SFR_VENV/lib/$py/site-packages/." "$site/" 2>/dev/null || { rm -rf "$site"; cp -a "$SFR_VENV/lib/$py/site-packages" "$site"; }
if [ -e "$site/sfr" ]; then echo "test_wheel: the cached venv already holds an sfr package" >&2; exit 1; fi
# The wheel is installed by the Slicer module's own install logic (what its "Install SFR" button
# runs: `python -m pip install WHEEL`), offline here.
"$work/venv/bin/python" - "$here/slicer_module/SFRSegmentation" "$wheel" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import SFRSegmentationLib as sl
assert sl.installed_engine() is None, "the new venv already has an sfr package"
job = sl.EngineInstall(sys.argv[2], pip_args=["--no-index"]).start()
result = job.wait(1800)
print(f"the module's EngineInstall installed SFR {result['version']}: {result['cli']}")
PY
cp -r "$here/demo/hippocampus" "$work/data"
# The module as an extension would hold it (its own folder), and the tests' phantoms.
mkdir -p "$work/slicer_module" && cp -r "$here/slicer_module/SFRSegmentation" "$work/slicer_module/"
cp -r "$here/tests/slicer" "$work/tests_slicer"
cp -r "$here/tests/consumer" "$work/consumer"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$here/Cargo.toml" | head -n 1)"

# Everything below runs with target/ and the cache hidden; PATH holds the new venv and the system.
cat > "$work/check.sh" <<'CHECK'
set -euo pipefail
work="$1"
export PATH="$work/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
unset LD_LIBRARY_PATH PYTHONPATH LIBTORCH LIBTORCH_USE_PYTORCH PYTHON_SYS_EXECUTABLE SFR_VENV SFR_LIBRARY SFR_CLI
cd "$work"
lib="$(python -c 'import sfr; print(sfr.library())')"
exe="$(python -c 'import sfr; print(sfr.executable())')"
for f in "$lib" "$exe"; do
  rp="$(readelf -d "$f" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')"
  echo "RUNPATH $(basename "$f"): $rp"
  case ":$rp:" in *:/*) echo "test_wheel: $f has an absolute RUNPATH entry: $rp" >&2; exit 1;; esac
  if ldd "$f" | grep -q "not found"; then ldd "$f" >&2; echo "test_wheel: unresolved libraries in $f" >&2; exit 1; fi
  torch_at="$(ldd "$f" | sed -n 's/.*libtorch_cpu.so => \(.*\) (.*/\1/p')"
  case "$(readlink -f "$torch_at")" in
    "$work"/venv/*) echo "libtorch_cpu.so of $(basename "$f") => $torch_at" ;;
    *) echo "test_wheel: $f resolves libtorch_cpu.so outside the new venv: '$torch_at'" >&2; exit 1;;
  esac
done
[ "$(command -v sfr)" = "$work/venv/bin/sfr" ] || { echo "test_wheel: sfr on PATH is $(command -v sfr)" >&2; exit 1; }
sfr --version
sfr demo --help > /dev/null
sfr train --data data --labeled 2 --max-unlabeled 0 --preset test-tiny --method supervised --no-sam \
  --progress none --allow-weak --out model.sfrmodel 2> train.log || { cat train.log >&2; exit 1; }
case0="$(python -c 'import json; d = json.load(open("data/dataset.json")); print(d["training"][-1]["image"])')"
sfr segment --model model.sfrmodel --input "data/$case0" --output seg.nii.gz
python -c 'import sys, nibabel as nb, numpy as np; a = np.asarray(nb.load("seg.nii.gz").dataobj); ref = nb.load(sys.argv[1]); assert a.shape == ref.shape, (a.shape, ref.shape); assert np.allclose(nb.load("seg.nii.gz").affine, ref.affine, atol=1e-4); print("segment: labels", sorted(set(np.unique(a).tolist())), "shape", a.shape)' "data/$case0"
# A C program against the installed package: CMake (find_package(SFR) from the wheel's folder) and pkg-config.
cmake -S consumer -B consumer-build -DSFR_DIR="$(python -c 'import sfr; print(sfr.cmake_dir())')" \
  -DSFR_EXPECTED_VERSION="$2" > /dev/null
cmake --build consumer-build > /dev/null
./consumer-build/sfr_consumer
export PKG_CONFIG_PATH="$(python -c 'import sfr; print(sfr.pkgconfig_dir())')"
cc consumer/main.c $(pkg-config --cflags --libs sfr) -DSFR_PACKAGE_VERSION="\"$(pkg-config --modversion sfr)\"" -o consumer-pc
./consumer-pc
# The Slicer module's worker finds the installed engine without a path and trains through it.
python - "$work/slicer_module/SFRSegmentation" "$work/tests_slicer" <<'PY'
import sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import numpy as np
import SFRSegmentationLib as sl
from conftest import phantom, training_data, oblique_matrix, run_to_end
engine = sl.installed_engine()
assert engine is not None and sl.find_cli() == engine["cli"], (engine, sl.find_cli())
logic = sl.SFRLogic(mode="worker")
job = logic.start_training(training_data(), preset="test-tiny")
run_to_end(job)
model = job.wait()
image, _ = phantom(7)
labels = model.segment(image, oblique_matrix())
assert labels.shape == image.shape, labels.shape
model.close()
print(f"the module's worker trained test-tiny through {engine['cli']} and segmented a {image.shape} volume")
PY
echo "test_wheel: the installed wheel works with the build tree and the cache hidden"
CHECK

hide=("$here/target" "$SFR_CACHE")
if unshare -m --propagation private true 2>/dev/null; then
  unshare -m --propagation private bash -c '
    set -e; work="$1"; version="$2"; shift 2
    for d in "$@"; do mount -t tmpfs -o size=1m sfr-hidden "$d"; done
    exec bash "$work/check.sh" "$work" "$version"' _ "$work" "$version" "${hide[@]}"
else
  echo "test_wheel: no private mount namespace here (unshare -m needs root): the build tree and the cache stay visible; the ldd and RUNPATH checks still require every library inside the new venv" >&2
  bash "$work/check.sh" "$work" "$version"
fi
