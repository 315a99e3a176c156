#!/usr/bin/env python3
"""Writes the tables of docs/results.md from the JSON files that scripts/results.sh's runs
leave (one `sfr evaluate --json` per run, with `train_s` and `class_check` added by
scripts/robustness.sh), and the plot beside it, results-dice.svg.

    results_tables.py OUT DOC [TABLE ...]

Each table replaces the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in
DOC. A table whose runs are all missing is left as it is (and said so); one with some runs
missing is written from those present, with the seed counts showing it. Dice in %, mean ± std
over seeds of each run's mean over the test cases. The tables need the standard library only.

The `demo` table comes from OUT/demo/results.json (`sfr demo --pseudo-label-curve`), with two
plots beside DOC, demo-pseudo-label-curve.svg (SAM's pseudo-label Dice against its fine-tuning
steps) and demo-stage-times.svg (each row's training time, stage by stage), and the demo's two
pictures copied beside DOC as demo-views.png and demo-pseudo-label.png.

The plot shows every run in OUT/runs: per labelled count and set, each seed's mean Dice as a
dot, one colour per row, and each row's mean over its seeds as a bar. It needs matplotlib;
without it the plot is skipped (and said so) and the tables are still written. The SVG is
deterministic: the same runs give the same file.
"""
import json
import os
import re
import statistics as st
import sys

RUN = re.compile(r"(.+)-(\d+)-([A-C])-(\d+)\.json")


def load(folder, pattern=RUN):
    """{(row, labelled, set, seed): run} of a folder of robustness.sh runs; with another
    `pattern`, keyed by its groups (as strings)."""
    runs = {}
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            m = pattern.fullmatch(f)
            if m:
                with open(os.path.join(folder, f)) as fh:
                    r = json.load(fh)
                r["_model"] = os.path.join(folder, f[: -len(".json")] + ".sfrmodel")
                key = (m[1], int(m[2]), m[3], int(m[4])) if pattern is RUN else m.groups()
                runs[key] = r
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


def per_set(out, counts):
    """Supervised runs per labelled count and set: mean ± std over seeds."""
    runs = load(os.path.join(out, "runs"))
    groups = {}
    for (row, n, s, seed), r in sorted(runs.items()):
        if row == "supervised" and n in counts:
            groups.setdefault((n, s), []).append(r)
    if not groups:
        return None
    cls = names(next(iter(groups.values()))[0])
    lines = ["| labelled | set | seeds | " + " | ".join(cls) + " | mean | lowest class of any run | runs with a class < 60 | check failed | train s |",
             "|---|---|---|" + "---|" * len(cls) + "---|---|---|---|---|"]
    for (n, s), rs in sorted(groups.items()):
        per = [dice(r) for r in rs]
        cells = [pct(p[k] for p in per) for k in range(len(cls))]
        lines.append(f"| {n} | {s} | {len(rs)} | " + " | ".join(cells)
                     + f" | {pct(sum(p) / len(p) for p in per)} | {100 * min(min(p) for p in per):.1f}"
                     + f" | {sum(min(p) < 0.6 for p in per)} | {sum(failed(r) for r in rs)} | {st.mean(r['train_s'] for r in rs):.0f} |")
    return lines


def robustness(out):
    return per_set(out, (4,))


def few_labels(out):
    return per_set(out, (1, 2))


# The SFR rows, as robustness.sh names them, and their column titles.
SFR_ROWS = [("mean-teacher-sfr", "SFR (MT), cpu-small"), ("mean-teacher-sfr-lora", "SFR (MT), cpu-lora")]


def sfr_table(out, counts):
    """Every (labelled count, set, seed) with an SFR run, beside supervised on the same."""
    runs = load(os.path.join(out, "runs"))
    keys = sorted({(n, s, seed) for (row, n, s, seed) in runs if row in dict(SFR_ROWS) and n in counts})
    if not keys:
        return None
    cls = names(runs[next((row, *k) for k in keys for row, _ in SFR_ROWS if (row, *k) in runs)])
    both = " / ".join(cls)

    def cell(r):
        if r is None:
            return "—"
        d = dice(r)
        return f"{' / '.join(f'{100 * x:.1f}' for x in d)} ({100 * sum(d) / len(d):.1f})"

    def pseudo_cell(r):
        # SAM's pseudo-labels of the unlabelled cases against their true labels (recorded by
        # train_and_score since it scores them; older runs have none).
        p = (r or {}).get("pseudo_label_dice")
        if p is None:
            return "—"
        d = [p["classes"][k] for k in sorted(p["classes"], key=int)]
        return f"{' / '.join(f'{x:.1f}' for x in d)} ({p['mean']:.1f})"

    # The pseudo-labels of the first SFR row's runs, a column only once some run has them.
    first = SFR_ROWS[0][0]
    pseudo = any("pseudo_label_dice" in runs.get((first, *k), {}) for k in keys)
    lines = [f"| labelled | set | seed | supervised: {both} (mean) | " + " | ".join(f"{t}: {both} (mean)" for _, t in SFR_ROWS)
             + (f" | SAM's pseudo-labels (cpu-small): {both} (mean)" if pseudo else "") + " |",
             "|---|---|---|---|" + "---|" * (len(SFR_ROWS) + pseudo)]
    for n, s, seed in keys:
        lines.append(f"| {n} | {s} | {seed} | {cell(runs.get(('supervised', n, s, seed)))} | "
                     + " | ".join(cell(runs.get((row, n, s, seed))) for row, _ in SFR_ROWS)
                     + (f" | {pseudo_cell(runs.get((first, n, s, seed)))}" if pseudo else "") + " |")
    # Per labelled set with two or more seeds: mean ± std over its seeds of the mean Dice.
    mean_dice = lambda r: 100 * sum(dice(r)) / len(dice(r))
    for n, s in sorted({(n, s) for n, s, _ in keys}):
        seeds = [seed for (m, t, seed) in keys if (m, t) == (n, s)]
        if len(seeds) < 2:
            continue

        def summary(row):
            v = [mean_dice(runs[(row, n, s, seed)]) for seed in seeds if (row, n, s, seed) in runs]
            return "—" if len(v) < 2 else f"{st.mean(v):.1f} ± {st.stdev(v):.1f} ({len(v)} seeds)"

        lines.append(f"| {n} | {s} | **all** | {summary('supervised')} | " + " | ".join(summary(row) for row, _ in SFR_ROWS) + (" | |" if pseudo else " |"))
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


LA_RUN = re.compile(r"(supervised|mean-teacher-sfr)-(\d+)-(native|default|[0-9.]+)-(\d+)\.json")


def model_meta(path):
    """The `sfr` metadata of a .sfrmodel (a safetensors file: an 8-byte header length, then a
    JSON header whose __metadata__ holds it), or None when the file is missing."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return json.loads(header["__metadata__"]["sfr"])


def la_runs(out):
    """{(row, labelled, spacing, seed): run} of scripts/la.sh's runs."""
    return {(k[0], int(k[1]), k[2], int(k[3])): r for k, r in load(os.path.join(out, "la"), LA_RUN).items()}


def spacing_words(k, rs):
    if k == "native":
        return "0.625 (native)"
    if k == "default":
        sp = {tuple(m["spacing"]) for m in (model_meta(r["_model"]) for r in rs) if m}
        return "preset's choice" + (f": {', '.join(' × '.join(f'{v:g}' for v in s) for s in sorted(sp))}" if sp else "")
    return k


def la_row(label, rs):
    d = [r["summary"][0]["dice_mean"] for r in rs]
    hd = [r["summary"][0]["hd95_mean"] for r in rs if r["summary"][0].get("hd95_mean") is not None]
    low = min(min(c["classes"][0]["dice"] for c in r["cases"]) for r in rs)
    return f"| {label} | {len(rs)} | {pct(d)} | {st.mean(hd):.1f} | {100 * low:.1f} | {st.mean(r['train_s'] for r in rs):.0f} |"


def la_spacing(out):
    """The left atrium, supervised with 4 labelled cases, at native, coarser and the preset's
    own training spacing (scripts/la.sh)."""
    groups = {}
    for (row, n, spacing, _seed), r in la_runs(out).items():
        if (row, n) == ("supervised", 4):
            groups.setdefault(spacing, []).append(r)
    if not groups:
        return None
    lines = ["| training spacing (mm) | seeds | Dice | HD95 (mm) | lowest case Dice of any run | train s |", "|---|---|---|---|---|---|"]
    for k in sorted(groups, key=lambda k: (k == "default", 0.0 if k in ("native", "default") else float(k))):
        lines.append(la_row(spacing_words(k, groups[k]), groups[k]))
    return lines


LA_PATCH_RUN = re.compile(r"supervised-4-patch-(\d+)x(\d+)x(\d+)-([0-9.]+)-(\d+)\.json")


def la_patch(out):
    """The left atrium, supervised with 4 labelled cases: the preset's 32×48×32 patch at its own
    spacing against the patch `patch_budget` plans from the foreground's shape (scripts/la.sh's
    patch-XxYxZ-S runs)."""
    groups = {}
    for (row, n, spacing, _seed), r in la_runs(out).items():
        if (row, n, spacing) == ("supervised", 4, "default"):
            groups.setdefault(("32 × 48 × 32 (the preset's)", spacing_words("default", [r]).split(": ")[-1]), []).append(r)
    for k, r in load(os.path.join(out, "la"), LA_PATCH_RUN).items():
        groups.setdefault((f"{k[0]} × {k[1]} × {k[2]} (the shape planned within 32·48·32 voxels)", f"{k[3]} × {k[3]} × {k[3]}"), []).append(r)
    if len(groups) < 2:
        return None
    lines = ["| patch (x × y × z voxels) | training spacing (mm) | seeds | Dice | HD95 (mm) | lowest case Dice of any run | train s |", "|---|---|---|---|---|---|---|"]
    for (patch, spacing), rs in sorted(groups.items()):
        lines.append("| " + patch + " " + la_row(spacing, rs))
    return lines


# The SFR paper's Table I on LA (GPU, full resolution, its own 20 test volumes): V-Net with N
# labelled cases, and SFR(MT) with N labelled + the rest unlabelled.
PAPER_LA = {("supervised", 1): 17.99, ("supervised", 4): None, ("supervised", 16): 86.03, ("mean-teacher-sfr", 1): 74.40, ("mean-teacher-sfr", 16): 90.86}


def la(out):
    """The left atrium at the preset's own spacing: labelled counts × rows (scripts/la.sh), and
    for SFR rows the difference to supervised training on the same seeds."""
    groups = {}
    for (row, n, spacing, seed), r in la_runs(out).items():
        if spacing == "default":
            groups.setdefault((n, row), {})[seed] = r
    if not groups:
        return None
    lines = ["| labelled | row | training spacing (mm) | seeds | Dice | HD95 (mm) | lowest case Dice of any run | train s | − supervised, per seed | the paper (GPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
    dice = lambda r: 100 * r["summary"][0]["dice_mean"]
    for (n, row) in sorted(groups, key=lambda g: (g[0], g[1] != "supervised")):
        runs = [groups[(n, row)][k] for k in sorted(groups[(n, row)])]
        paper = PAPER_LA.get((row, n))
        spacing = spacing_words("default", runs).replace("preset's choice: ", "")
        sup = groups.get((n, "supervised"), {})
        diffs = [f"{dice(r) - dice(sup[k]):+.1f}" for k, r in sorted(groups[(n, row)].items()) if k in sup] if row != "supervised" else []
        lines.append(la_row(f"{n} | {row} | {spacing}", runs) + f" {', '.join(diffs) or '–'} | {paper if paper is not None else '–'} |")
    return lines


def sfr(out):
    return sfr_table(out, (4,))


def sfr_few(out):
    return sfr_table(out, (1, 2))


def demo_results(out):
    path = os.path.join(out, "demo", "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def machine_words(m):
    if not m:
        return "an unrecorded CPU"
    bf16 = "with AVX512-BF16" if m.get("avx512_bf16") else "without AVX512-BF16"
    return f"{m.get('cpu_model') or 'an unnamed CPU'}, {m.get('logical_cpus')} logical CPUs, {bf16}"


def probe_seconds(row):
    return sum(x["seconds"] for x in row.get("stage_seconds") or [] if x["stage"] == "sam_probe")


# The pipeline's stages in the order they run (any other stage follows).
STAGES = ["load", "encode", "finetune", "pseudolabel", "retrain", "validate", "fit"]


def demo(out):
    r = demo_results(out)
    if r is None:
        return None
    cls = [c["name"] for c in r["rows"][0]["classes"]]
    lines = [
        f"`sfr demo --pseudo-label-curve 7` on {machine_words(r.get('machine'))}: {len(r['labeled'])} labelled + "
        f"{len(r['unlabeled'])} unlabelled cases, {len(r['test'])} test cases, seed {r['seed']}, "
        f"{r['vnet_iterations']} V-Net iterations per row. Dice (%) mean ± std over the test cases.",
        "",
        "| row | " + " | ".join(f"{c} Dice" for c in cls) + " | mean Dice | train s |",
        "|---|" + "---|" * (len(cls) + 2),
    ]
    probed = 0.0
    for row in r["rows"]:
        cells = [f"{100 * c['dice_mean']:.1f} ± {100 * c['dice_std']:.1f}" for c in row["classes"]]
        probe = probe_seconds(row)
        probed += probe
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {100 * row['mean_dice']:.1f} | {row['train_seconds'] - probe:.0f} |")
    if probed:
        lines += ["", f"Train s: the training's wall clock, without the {probed:.0f} s the pseudo-label curve's scoring took (`sam_probe`)."]
    lines += ["", f"The whole demo: {r['total_seconds'] - probed:.0f} s of training and scoring" + (" (without the curve's scoring)." if probed else ".")]
    curve = r.get("pseudo_label_curve") or []
    if curve:
        pts = ", ".join(f"{p['mean_dice']:.1f} at step {p['step']}" for p in curve)
        lines += ["", f"SAM's pseudo-labels of the {len(r['unlabeled'])} unlabelled cases against their true labels, mean Dice over the classes: {pts}."]
    lines += [""] + [f"- {m}" for m in r.get("meaning", [])]
    return lines


TABLES = {"demo": demo, "robustness": robustness, "sfr": sfr, "few-labels": few_labels, "sfr-few": sfr_few, "ablation": ablation, "la-spacing": la_spacing, "la-patch": la_patch, "la": la}

PLOT = "results-dice.svg"
# Rows in the order of scripts/robustness.sh; any other row follows, alphabetically.
ROW_ORDER = ["supervised", "mean-teacher-sfr", "mean-teacher-sfr-lora"]


def plot(out, path):
    """Writes the plot of OUT/runs to PATH. Returns what it did, in words, or None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = load(os.path.join(out, "runs"))
    if not runs:
        return f"no runs in {out}; plot left as it is"
    groups = sorted({(n, s) for (_, n, s, _) in runs})
    rows = sorted({row for (row, _, _, _) in runs}, key=lambda r: (r not in ROW_ORDER, ROW_ORDER.index(r) if r in ROW_ORDER else 0, r))
    # A group's place on the x axis: one unit per set, half a unit more between labelled counts.
    xs, x = {}, 0.0
    for i, g in enumerate(groups):
        if i and g[0] != groups[i - 1][0]:
            x += 0.5
        xs[g] = x
        x += 1.0
    tests = {len(r.get("cases", [])) for r in runs.values()}
    cls = names(next(iter(runs.values())))
    step = 0.8 / len(rows)
    style = {"svg.hashsalt": "sfr-results", "svg.fonttype": "path", "font.size": 9}
    with plt.rc_context(style):
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * x + 2.0), 4.2))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        legend = set()
        for j, row in enumerate(rows):
            colour = colours[j % len(colours)]
            for g in groups:
                seeds = sorted(seed for (r, n, s, seed) in runs if (r, n, s) == (row, *g))
                if not seeds:
                    continue
                vals = [100 * st.mean(dice(runs[(row, *g, seed)])) for seed in seeds]
                cx = xs[g] + (j - (len(rows) - 1) / 2) * step
                ax.scatter([cx] * len(vals), vals, s=22, color=colour, edgecolors="white", linewidths=0.5, zorder=3,
                           label=None if row in legend else row)
                legend.add(row)
                ax.hlines(st.mean(vals), cx - 0.4 * step, cx + 0.4 * step, colors=colour, linewidths=2.5, zorder=2)
        ax.plot([], [], color="black", linewidth=2.5, label="mean of the seeds")
        ax.set_xticks([xs[g] for g in groups], [f"set {s}" for _, s in groups])
        for n in sorted({n for n, _ in groups}):
            centre = st.mean(xs[g] for g in groups if g[0] == n)
            ax.text(centre, -0.1, f"{n} labelled case{'s' if n != 1 else ''}", transform=ax.get_xaxis_transform(), ha="center", va="top")
        for a, b in zip(groups, groups[1:]):
            if a[0] != b[0]:
                ax.axvline((xs[a] + xs[b]) / 2, color="0.8", linewidth=0.8)
        ax.set_xlim(-0.6, x - 0.4)
        ax.set_ylabel(f"Dice on the {tests.pop()} test cases (%)" if len(tests) == 1 else "Dice on the test cases (%)")
        ax.set_title(f"Each run's mean Dice over the classes ({', '.join(cls)}): a dot per seed", fontsize=9)
        ax.grid(axis="y", color="0.9")
        ax.set_axisbelow(True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.savefig(path + ".tmp", format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
    os.replace(path + ".tmp", path)
    return f"plot of {len(runs)} runs written to {path}"


def demo_figures(out, docdir):
    """The demo's curve and stage-time plots and its pictures, beside DOC. Returns what it did."""
    r = demo_results(out)
    if r is None:
        return f"no demo run in {out}/demo; its figures left as they are"
    import shutil

    for key, name in (("views", "demo-views.png"), ("sam_pseudo_label", "demo-pseudo-label.png")):
        src = r["pictures"].get(key)
        if src:
            # The picture as the run wrote it (the run folder may have moved with OUT).
            src = src if os.path.isfile(src) else os.path.join(out, "demo", "pictures", os.path.basename(src))
            shutil.copyfile(src, os.path.join(docdir, name + ".tmp"))
            os.replace(os.path.join(docdir, name + ".tmp"), os.path.join(docdir, name))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "demo pictures copied; plots skipped: matplotlib is missing"
    style = {"svg.hashsalt": "sfr-results", "svg.fonttype": "path", "font.size": 9}
    machine = machine_words(r.get("machine"))
    done = ["demo pictures copied"]
    curve = r.get("pseudo_label_curve") or []
    if curve:
        path = os.path.join(docdir, "demo-pseudo-label-curve.svg")
        with plt.rc_context(style):
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            steps = [p["step"] for p in curve]
            for name in curve[0]["dice"]:
                ax.plot(steps, [p["dice"][name] for p in curve], marker="o", markersize=3.5, label=name)
            ax.plot(steps, [p["mean_dice"] for p in curve], marker="o", markersize=3.5, color="black", linewidth=2, label="mean")
            sup = r["rows"][0]
            ax.axhline(100 * sup["mean_dice"], color="0.5", linestyle="--", linewidth=1, label=f"{sup['name']}:\nthe V-Net's mean Dice\non the test cases")
            ax.set_xlabel("SAM fine-tuning steps")
            ax.set_ylabel(f"Dice on the {len(r['unlabeled'])} unlabelled cases (%)")
            ax.set_title("SAM's pseudo-labels against the true labels along its fine-tuning", fontsize=9)
            ax.grid(color="0.9")
            ax.set_axisbelow(True)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            fig.text(0.01, -0.05, f"sfr demo --pseudo-label-curve {len(curve)}, seed {r['seed']}; {machine}", fontsize=7, color="0.4")
            fig.savefig(path + ".tmp", format="svg", bbox_inches="tight", metadata={"Date": None})
            plt.close(fig)
        os.replace(path + ".tmp", path)
        done.append(f"curve of {len(curve)} points written to {path}")
    rows = [row for row in r["rows"] if row.get("stage_seconds")]
    if rows:
        path = os.path.join(docdir, "demo-stage-times.svg")
        stages = [x for x in STAGES if any(x == s_["stage"] for row in rows for s_ in row["stage_seconds"])]
        for row in rows:
            for st_ in row["stage_seconds"]:
                if st_["stage"] not in stages and st_["stage"] != "sam_probe":
                    stages.append(st_["stage"])
        with plt.rc_context(style):
            fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(rows) + 1.6))
            colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            legend = set()
            for j, row in enumerate(rows):
                secs = {s_["stage"]: s_["seconds"] for s_ in row["stage_seconds"]}
                left = 0.0
                for k, stage in enumerate(stages):
                    w = secs.get(stage, 0.0)
                    if w <= 0:
                        continue
                    ax.barh(j, w, left=left, color=colours[k % len(colours)], label=None if stage in legend else stage)
                    legend.add(stage)
                    left += w
                ax.text(left + 2, j, f"{left:.0f} s", va="center", fontsize=8)
            ax.set_yticks(range(len(rows)), [row["name"] for row in rows])
            ax.invert_yaxis()
            ax.set_xlabel("seconds (wall clock)")
            ax.set_title("Where each row's training time goes, stage by stage", fontsize=9)
            handles, names_ = ax.get_legend_handles_labels()
            order = sorted(range(len(names_)), key=lambda i: stages.index(names_[i]))
            ax.legend([handles[i] for i in order], [names_[i] for i in order], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            ax.grid(axis="x", color="0.9")
            ax.set_axisbelow(True)
            probed = sum(probe_seconds(row) for row in rows)
            left_out = f"; the curve's scoring ({probed:.0f} s, not training) left out" if probed else ""
            fig.text(0.01, -0.08, f"sfr demo, seed {r['seed']}; {machine}{left_out}", fontsize=7, color="0.4")
            fig.savefig(path + ".tmp", format="svg", bbox_inches="tight", metadata={"Date": None})
            plt.close(fig)
        os.replace(path + ".tmp", path)
        done.append(f"stage times written to {path}")
    return "; ".join(done)


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
    if "demo" in names_:
        print(f"[results] {demo_figures(out, os.path.dirname(os.path.abspath(doc)))}", file=sys.stderr)
    done = plot(out, os.path.join(os.path.dirname(os.path.abspath(doc)), PLOT))
    print(f"[results] {done or f'plot skipped: matplotlib is missing (pip install matplotlib); {PLOT} left as it is'}", file=sys.stderr)


if __name__ == "__main__":
    main()
