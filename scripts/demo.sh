#!/usr/bin/env bash
# The main job, with its own set-up: `sfr demo` trains on synthetic phantoms with few labels and
# prints a table of supervised, mean teacher and SFR(mean teacher) on held-out phantoms. Writes
# its data, model and an example segmentation to demo-out/ (override: SFR_DEMO_OUT).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
out="${SFR_DEMO_OUT:-$here/demo-out}"
exec "$here/target/release/sfr" demo --out "$out" "$@"
