#!/usr/bin/env python3
"""Writes the tables of docs/results.md from the JSON files that scripts/results.sh's runs
leave (one `sfr evaluate --json` per run, with `train_s` and `class_check` added by
scripts/robustness.sh).

    results_tables.py OUT DOC [TABLE ...]

Each table replaces the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in
DOC. A table whose runs are all missing is left as it is (and said so); one with some runs
missing is written from those present, with the seed counts showing it. Dice in %, mean ± std
over seeds of each run's mean over the test cases. Standard library only.
"""
import json
import os
import re
import statistics as st
import subprocess
import sys

RUN = re.compile(r"(.+)-(\d+)-([A-C])-(\d+)\.json")


def load(folder):
    """{(row, labelled, set, seed): run} of a folder of robustness.sh runs."""
    runs = {}
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            m = RUN.fullmatch(f)
            if m:
                with open(os.path.join(folder, f)) as fh:
                    r = json.load(fh)
                r["_model"] = os.path.join(folder, f[: -len(".json")] + ".sfrmodel")
                runs[(m[1], int(m[2]), m[3], int(m[4]))] = r
    return runs


def dice(r):
    return [c["dice_mean"] for c in r["summary"]]


def names(r):
    return [c.get("name", f"class {c.get('class')}").lower() for c in r["summary"]]


def pct(v):
    v = list(v)
    return f"{100 * st.mean(v):.1f} ± {100 * (st.stdev(v) if len(v) > 1 else 0):.1f}"


def failed(r):
    classes = (r.get("class_check") or {}).get("classes", [])
    return any(c.get("verdict") in ("never_predicted", "far_below") for c in classes)


def robustness(out):
    runs = load(os.path.join(out, "runs"))
    by_set = {}
    for (row, n, s, seed), r in sorted(runs.items()):
        if row == "supervised" and n == 4:
            by_set.setdefault(s, []).append(r)
    if not by_set:
        return None
    cls = names(next(iter(by_set.values()))[0])
    lines = ["| labelled set | seeds | " + " | ".join(cls) + " | mean | lowest class of any run | runs with a class < 60 | check failed | train s |",
             "|---|---|" + "---|" * len(cls) + "---|---|---|---|---|"]
    for s, rs in sorted(by_set.items()):
        per = [dice(r) for r in rs]
        cells = [pct(p[k] for p in per) for k in range(len(cls))]
        lines.append(f"| {s} | {len(rs)} | " + " | ".join(cells)
                     + f" | {pct(sum(p) / len(p) for p in per)} | {100 * min(min(p) for p in per):.1f}"
                     + f" | {sum(min(p) < 0.6 for p in per)} | {sum(failed(r) for r in rs)} | {st.mean(r['train_s'] for r in rs):.0f} |")
    return lines


def sfr(out):
    runs = load(os.path.join(out, "runs"))
    seeds = sorted(seed for (row, n, s, seed) in runs if row == "mean-teacher-sfr" and n == 4 and s == "A")
    if not seeds:
        return None
    cls = names(runs[("mean-teacher-sfr", 4, "A", seeds[0])])
    both = " / ".join(cls)
    lines = [f"| seed | supervised: {both} | mean | SFR (mean teacher): {both} | mean | SFR − supervised (mean) |",
             "|---|---|---|---|---|---|"]
    for seed in seeds:
        f = runs[("mean-teacher-sfr", 4, "A", seed)]
        s = runs.get(("supervised", 4, "A", seed))
        fd = dice(f)
        fm = sum(fd) / len(fd)
        if s is None:
            lines.append(f"| {seed} | — | — | {' / '.join(f'{100 * d:.1f}' for d in fd)} | {100 * fm:.1f} | — |")
            continue
        sd = dice(s)
        sm = sum(sd) / len(sd)
        lines.append(f"| {seed} | {' / '.join(f'{100 * d:.1f}' for d in sd)} | {100 * sm:.1f} | "
                     f"{' / '.join(f'{100 * d:.1f}' for d in fd)} | {100 * fm:.1f} | {100 * (fm - sm):+.1f} |")
    return lines


def training_fit(model):
    """Mean Dice of a model on its own labelled cases (`sfr info`), or None."""
    sfr_bin = os.environ.get("SFR_BIN") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "sfr")
    if not os.path.isfile(model) or not os.path.isfile(sfr_bin):
        return None
    p = subprocess.run([sfr_bin, "info", model], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    fit = json.loads(p.stdout).get("training", {}).get("training_fit")
    return fit and fit.get("mean_dice")


def one_label(out):
    runs = load(os.path.join(out, "runs"))
    picked = {(s, seed): r for (row, n, s, seed), r in runs.items() if row == "supervised" and n == 1}
    if not picked:
        return None
    cls = names(next(iter(picked.values())))
    lines = ["| labelled set (one case) | seed | " + " | ".join(cls) + " | fit on its labelled case |",
             "|---|---|" + "---|" * len(cls) + "---|"]
    for (s, seed), r in sorted(picked.items()):
        d = dice(r)
        fit = training_fit(r["_model"])
        lines.append(f"| {s} | {seed} | " + " | ".join(f"{100 * x:.1f}" for x in d)
                     + f" | {'—' if fit is None else f'{100 * fit:.1f}'} |")
    return lines


def ablation(out):
    variants = [("random", "0.5", os.path.join(out, "ablation-random-0.5")),
                ("random", "0", os.path.join(out, "ablation-random-0")),
                ("class prior", "0.5", os.path.join(out, "ablation-prior-0.5")),
                ("**class prior**", "**0**", os.path.join(out, "runs"))]
    rows = []
    for head, drop, folder in variants:
        r = load(folder).get(("supervised", 4, "A", 1))
        rows.append((head, drop, r))
    present = [r for _, _, r in rows if r]
    if not present:
        return None
    cls = names(present[0])
    lines = ["| head | dropout | " + " | ".join(cls) + " |", "|---|---|" + "---|" * len(cls)]
    for head, drop, r in rows:
        bold = head.startswith("**")
        cells = ["—"] * len(cls) if r is None else [f"{100 * x:.1f}" for x in dice(r)]
        if bold:
            cells = [f"**{c}**" for c in cells]
        lines.append(f"| {head} | {drop} | " + " | ".join(cells) + " |")
    return lines


TABLES = {"robustness": robustness, "sfr": sfr, "one-label": one_label, "ablation": ablation}


def main():
    out, doc, names_ = sys.argv[1], sys.argv[2], sys.argv[3:] or list(TABLES)
    with open(doc) as fh:
        text = fh.read()
    for name in names_:
        if name not in TABLES:
            sys.exit(f"results_tables: unknown table {name} ({', '.join(TABLES)})")
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        if start not in text or end not in text:
            sys.exit(f"results_tables: {doc} has no {start} ... {end}")
        lines = TABLES[name](out)
        if lines is None:
            print(f"[results] {name}: no runs in {out}; table left as it is", file=sys.stderr)
            continue
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + start + "\n" + "\n".join(lines) + "\n" + end + after
        print(f"[results] {name}: table written", file=sys.stderr)
        print("\n".join(lines))
    with open(doc + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(doc + ".tmp", doc)


if __name__ == "__main__":
    main()
