#!/usr/bin/env bash
# Robustness of training over labelled sets and seeds, on MSD hippocampus (cpu-small): does
# every run learn every class, and how much do results move with the seed?
#
# Labelled sets are disjoint runs of consecutive cases of dataset.json: with N labelled cases,
# set A is cases 0..N-1, set B cases 4..4+N-1, set C cases 8..8+N-1 (so the sets of 1, 2 and 4
# cases nest within A, B, C). The unlabelled cases are the first N_UNLABELED (20) others in
# dataset.json order (their labels are never read in training). The test split is cases
# 100..159 (60 cases), touched by no run. Every run is scored on it with `sfr evaluate`, and its
# training check (class never predicted / far below the others) is recorded.
#
#   scripts/robustness.sh [DATA] [OUT]
#   LABELED="4"           labelled cases per set (e.g. "1 2 4")
#   SETS="A B C"          labelled sets
#   SEEDS="1 2 3 4 5"     seeds
#   ROWS="supervised"     rows: supervised, mean-teacher-sfr (SFR with a mean teacher),
#                         mean-teacher-sfr-lora (the same with cpu-lora's LoRA fine-tuning)
#   SET='{...}'           extra config overrides for every run
#   SFR_THREADS=2         threads per run
# Finished runs (OUT/<row>-<N>-<set>-<seed>.json) are kept and skipped on a rerun; the table
# goes to OUT/results.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
source "$here/scripts/train_and_score.sh"
data="${1:-$here/../shared/data/hippocampus}"
out="${2:-$here/experiments/robustness}"
sfr="${SFR_BIN:-$here/target/release/sfr}"
labeled_counts="${LABELED:-4}"
sets="${SETS:-A B C}"
seeds="${SEEDS:-1 2 3 4 5}"
rows="${ROWS:-supervised}"
extra="${SET:-{\}}"
n_unlabeled="${N_UNLABELED:-20}"
[ -f "$data/dataset.json" ] || { echo "robustness: $data/dataset.json not found (the hippocampus data of ../shared/data)" >&2; exit 2; }
mkdir -p "$out"
set="$(python3 -c 'import json, sys; d = json.loads(sys.argv[1]); d.setdefault("threads", int(sys.argv[2])); print(json.dumps(d))' "$extra" "${SFR_THREADS:-0}")"

# Case lists: OUT/test_cases.txt and OUT/labeled-<N>-<set>.txt
python3 - "$data" "$out" $labeled_counts <<'PY'
import json, sys, os
d = json.load(open(os.path.join(sys.argv[1], "dataset.json")))
ids = [os.path.basename(t["image"]).replace(".nii.gz", "") for t in d["training"]]
assert len(ids) >= 160, len(ids)
out = sys.argv[2]
open(os.path.join(out, "test_cases.txt"), "w").write("\n".join(ids[100:160]) + "\n")
for n in map(int, sys.argv[3:]):
    assert 1 <= n <= 4, n
    for k, s in enumerate("ABC"):
        open(os.path.join(out, f"labeled-{n}-{s}.txt"), "w").write("\n".join(ids[4 * k:4 * k + n]) + "\n")
PY

args_of() {
  case "$1" in
    supervised) echo "--preset cpu-small --method supervised --no-sam" ;;
    mean-teacher-sfr) echo "--preset cpu-small --method mean-teacher --sfr" ;;
    mean-teacher-sfr-lora) echo "--preset cpu-lora --method mean-teacher --sfr" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

for n in $labeled_counts; do
  for s in $sets; do
    for seed in $seeds; do
      for row in $rows; do
        # shellcheck disable=SC2046
        train_and_score "$row-$n-$s-$seed" "$out" "$data" "$out/test_cases.txt" --labeled-list "$out/labeled-$n-$s.txt" \
          --max-unlabeled "$n_unlabeled" --seed "$seed" --set "$set" $(args_of "$row")
      done
    done
  done
done

python3 - "$out" <<'PY' | tee "$out/results.md"
import json, os, re, sys, statistics as st
out = sys.argv[1]
runs = {}
for f in sorted(os.listdir(out)):
    m = re.fullmatch(r"(.+)-(\d)-([A-C])-(\d+)\.json", f)
    if m:
        runs.setdefault((m[1], int(m[2]), m[3]), []).append(json.load(open(os.path.join(out, f))))
pct = lambda v: f"{100 * st.mean(v):.1f} ± {100 * (st.stdev(v) if len(v) > 1 else 0):.1f}"
print("Test split: 60 hippocampus cases never used in training. Dice (%): mean ± std over seeds of")
print("each run's mean over the test cases. 'min class' is the lowest per-class Dice of any run;")
print("'check failed' counts runs whose training check flagged a class.\n")
print("| row | labelled | set | seeds | anterior | posterior | mean | min class | runs < 60 | check failed | train s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (row, n, s), rs in sorted(runs.items()):
    per = [[c["dice_mean"] for c in r["summary"]] for r in rs]
    ant, post = [p[0] for p in per], [p[1] for p in per]
    mean = [sum(p) / len(p) for p in per]
    low = min(min(p) for p in per)
    below = sum(min(p) < 0.6 for p in per)
    failed = sum(any(c["verdict"] in ("never_predicted", "far_below") for c in (r.get("class_check") or {}).get("classes", [])) for r in rs)
    print(f"| {row} | {n} | {s} | {len(rs)} | {pct(ant)} | {pct(post)} | {pct(mean)} | {100 * low:.1f} | {below} | {failed} | {st.mean(r['train_s'] for r in rs):.0f} |")
PY
