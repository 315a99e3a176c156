#!/usr/bin/env bash
# The C/C++ side: configure (with -DBUILD_TESTING=ON) and build the CMake package (cargo build
# of libsfr inside), install it into target/cmake-install, then run ctest, which checks the
# header is fresh, the installed library's SONAME, exported symbols, RUNPATH (and libtorch_cuda),
# a moved prefix, pkg-config (also for a /usr multiarch layout), a configure without test tools,
# and builds + runs the C program (under valgrind), the ITK C++ program and a consumer project
# against the installed package (cmake/SFRTests.cmake lists them). Called by scripts/test.sh.
#   SFR_C_TEST_TOOL=asan|none  run the C program with AddressSanitizer / natively instead
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
cd "$here"
export PATH="$HOME/.cargo/bin:$PATH"
# The installed library must find libtorch by itself.
unset LD_LIBRARY_PATH

build="$here/target/cmake-build"
prefix="$here/target/cmake-install"
tool="${SFR_C_TEST_TOOL:-valgrind}"
start=$SECONDS

echo "[test_c] configure ($build -> $prefix, C program under $tool)"
cmake -S "$here" -B "$build" -DCMAKE_INSTALL_PREFIX="$prefix" -DBUILD_TESTING=ON -DSFR_C_TEST_TOOL="$tool" >/dev/null
echo "[test_c] build (cargo build --release --lib)"
cmake --build "$build"
echo "[test_c] install"
rm -rf "$prefix"
cmake --install "$build" >/dev/null
echo "[test_c] ctest"
(cd "$build" && ctest --output-on-failure --timeout 1500 "$@")
echo "[test_c] done in $((SECONDS - start)) s"
