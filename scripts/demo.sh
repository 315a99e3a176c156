#!/usr/bin/env bash
# The main job, with its own set-up: `sfr demo` trains on the real MRI shipped in demo/hippocampus
# (MSD Task04 subset, CC-BY-SA 4.0: demo/hippocampus/LICENSE.md) with 4 labelled and 20 unlabelled
# cases, and prints a table of supervised, mean teacher and SFR(mean teacher) on 12 held-out test
# cases. Writes the SFR model, an example segmentation, pictures and the results to demo-out/
# (override: SFR_DEMO_OUT). Extra arguments go to `sfr demo` (e.g. --sfr-plus, --synthetic).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
out="${SFR_DEMO_OUT:-$here/demo-out}"
exec "$here/target/release/sfr" demo --out "$out" "$@"
