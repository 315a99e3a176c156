#!/usr/bin/env bash
# The main job, with its own set-up. Until `sfr demo` (training on synthetic phantoms) exists,
# this runs the most complete chain there is on real data: inspect a volume, stitch it as the
# paper's first module does (PNG with the label overlay), and the benchmarks.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
sfr="$here/target/release/sfr"
out="${SFR_DEMO_OUT:-$here/demo-out}"
mkdir -p "$out"
data="$here/../shared/data/la2018"
if [ -d "$data" ]; then
  img="$data/imagesTr/06SR5RBREL16DQ6M8LWS.nii.gz"
  lab="$data/labelsTr/06SR5RBREL16DQ6M8LWS.nii.gz"
  echo "== sfr info $img"
  "$sfr" info "$img"
  echo "== sfr stitch: 112x112x80 patch at the volume's centre -> 9x9 grid on a 1024 canvas"
  "$sfr" stitch "$img" "$out/la_stitched.png" --label "$lab" --patch 112,112,80
  echo "wrote $out/la_stitched.png"
else
  echo "../shared/data is absent: skipping the real-data part of the demo"
fi
echo "== sfr bench --json"
"$sfr" bench --json | tee "$out/bench.json"
