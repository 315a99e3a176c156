# Sourced by the experiment scripts (robustness.sh, la.sh): one run, trained with `sfr train`
# and scored with `sfr evaluate` on a fixed list of test cases, kept as OUT/NAME.json (the
# evaluation, plus `train_s` and the model's training check `class_check`) beside
# OUT/NAME.sfrmodel and OUT/NAME.log. A run whose JSON exists is skipped, so an interrupted
# script resumes where it stopped; the JSON appears only when the run is complete. An SFR run
# that runs SAM (--sfr without --pseudo-labels) also writes SAM's pseudo-labels and records
# their Dice against the unlabelled cases' true labels (`pseudo_label_dice`, scored after
# training by scripts/score_pseudo_labels.py; training never reads those labels).
#
#   train_and_score NAME OUT DATA TEST_CASES [sfr train arguments ...]
# needs $sfr (the binary).
train_and_score() {
  local name="$1" out="$2" data="$3" cases="$4"
  shift 4
  [ -f "$out/$name.json" ] && return 0
  echo "== $name"
  local start end sam=() arg
  for arg in "$@"; do [ "$arg" = --sfr ] && sam=(--write-pseudo-labels); done
  for arg in "$@"; do [ "$arg" = --pseudo-labels ] && sam=(); done
  start=$(date +%s)
  # --allow-weak: a run whose check fails is kept and counted, not dropped.
  "$sfr" train --data "$data" "$@" "${sam[@]}" --progress none --allow-weak \
    --out "$out/$name.sfrmodel" --work-dir "$out/$name.work" 2> "$out/$name.log"
  end=$(date +%s)
  "$sfr" evaluate --model "$out/$name.sfrmodel" --data "$data" --cases "$cases" --json > "$out/$name.json.tmp" 2>> "$out/$name.log"
  "$sfr" info "$out/$name.sfrmodel" > "$out/$name.info.json"
  if [ ${#sam[@]} -gt 0 ]; then
    python3 "$(dirname "${BASH_SOURCE[0]}")/score_pseudo_labels.py" "$out/$name.work/pseudo" "$data" --json "$out/$name.pseudo.json" >> "$out/$name.log"
  fi
  python3 - "$out/$name.json.tmp" "$out/$name.info.json" "$((end - start))" "$out/$name.pseudo.json" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
t = json.load(open(sys.argv[2]))["training"]
r["train_s"] = int(sys.argv[3])
r["class_check"] = t.get("class_check")
if os.path.exists(sys.argv[4]):
    p = json.load(open(sys.argv[4]))
    r["pseudo_label_dice"] = {"classes": p["mean"], "mean": p["overall"]}
json.dump(r, open(sys.argv[1], "w"))
PY
  rm -f "$out/$name.info.json" "$out/$name.pseudo.json"
  rm -rf "$out/$name.work"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
