#!/usr/bin/env bash
# One short check on a machine WITH an NVIDIA GPU (never part of the tests): that this build
# really computes on CUDA. Needs the set-up of scripts/setup.sh (the cached PyTorch venv ships
# libtorch_cuda and the CUDA libraries) and ../shared/data/la2018.
#   1. cargo build --release, then `sfr info --devices`: libtorch_cuda must be loaded and a
#      CUDA device available (else it stops, saying which of the two is missing);
#   2. `sfr bench --device cuda --quick` (with the PyTorch eager reference on the same GPU);
#   3. a short `paper-la` training on LA with --device cuda (few iterations: minutes, not the
#      paper's 6000), whose model metadata must say it trained on cuda:0, then an evaluation;
#   4. issue 10's open measurement: `sfr demo` on the shipped hippocampus subset with LoRA on
#      every LiteMedSAM block (`--sam-canvases 0`: no frozen encoder; too slow on a CPU), which
#      prints its pseudo-labels' Dice and the table (skipped without the cached LiteMedSAM).
# Writes everything under OUT (default gpu-check/) and prints a summary.
#   Usage: scripts/gpu_check.sh [OUT] [LA_FOLDER]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
out="${1:-$here/gpu-check}"
la="${2:-$here/../shared/data/la2018}"
sfr="$here/target/release/sfr"
mkdir -p "$out"
cd "$here"
start=$SECONDS

echo "[gpu_check] cargo build --release"
cargo build --release --quiet
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$out/nvidia-smi.txt" || echo "(nvidia-smi not available)"

echo "[gpu_check] sfr info --devices"
"$sfr" info --devices | tee "$out/devices.json"
python3 - "$out/devices.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
if not d["cuda_linked"]:
    sys.exit("libtorch_cuda is not loaded: the build did not link it (SFR_LINK_CUDA=0 or a CPU-only libtorch)")
if not d["cuda_available"]:
    sys.exit("libtorch_cuda is loaded but CUDA finds no device (driver missing? CUDA_VISIBLE_DEVICES?)")
print(f"CUDA: {d['cuda_device_count']} device(s), cuDNN {d['cudnn_available']}, auto = {d['auto']}")
PY

echo "[gpu_check] sfr bench --device cuda --quick"
"$sfr" bench --json --quick --device cuda > "$out/bench.json" 2> "$out/bench.log"
python3 - "$out/bench.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
def walk(v, path=""):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from walk(x, f"{path}.{k}" if path else k)
    elif isinstance(v, (int, float, str)) and any(s in path for s in ("device", "_vs_pytorch", "_s", "seconds")):
        yield path, v
for p, v in walk(b):
    print(f"  {p} = {v}")
PY

if [ ! -f "$la/dataset.json" ]; then
  echo "[gpu_check] $la/dataset.json not found: the LA training is SKIPPED"
  exit 1
fi
echo "[gpu_check] paper-la on LA, --device cuda (short)"
# The first 16 cases labelled (2 of them for validation), 16 unlabelled; the last 8 of the 80
# are evaluated. Iterations are cut so the run takes minutes.
"$sfr" train --data "$la" --labeled 16 --max-unlabeled 16 --preset paper-la --device cuda --sfr \
  --set '{"sam": {"iterations": 200}, "vnet": {"iterations": 300}, "validation_cases": 2}' \
  --progress none --out "$out/la.sfrmodel" 2> "$out/train.log"
grep -E "training on|validation|saved" "$out/train.log" || true
"$sfr" info "$out/la.sfrmodel" > "$out/la-meta.json"
python3 - "$out/la-meta.json" "$la/dataset.json" "$out/test_cases.txt" <<'PY'
import json, os, sys
m = json.load(open(sys.argv[1]))
dev = m["training"].get("device")
if dev != "cuda:0":
    sys.exit(f"the model's metadata says it trained on {dev!r}, not cuda:0")
d = json.load(open(sys.argv[2]))
ids = [os.path.basename(t["image"]).replace(".nii.gz", "") for t in d["training"]]
open(sys.argv[3], "w").write("\n".join(ids[-8:]) + "\n")
print(f"model metadata: trained on {dev}; validation {m.get('validation', {}) and m['validation'].get('mean_dice')}")
PY
"$sfr" evaluate --model "$out/la.sfrmodel" --data "$la" --cases "$out/test_cases.txt" --device cuda | tee "$out/evaluate.txt"

echo "[gpu_check] sfr demo, LiteMedSAM + LoRA on every block (--sam-canvases 0), 600 V-Net iterations"
if "$sfr" demo --sam-checkpoint lite-medsam --sam-canvases 0 --iterations 600 --progress none \
    --out "$out/demo-lora-all" > "$out/demo-lora-all.txt" 2> "$out/demo-lora-all.log"; then
  cat "$out/demo-lora-all.txt"
else
  echo "  the demo failed (no cached LiteMedSAM? see $out/demo-lora-all.log):"; tail -3 "$out/demo-lora-all.log"
fi
echo "[gpu_check] done in $((SECONDS - start)) s; results in $out"
