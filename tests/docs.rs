//! Keeps the documentation honest where that is cheap to check:
//! * every relative link in README.md, docs/**/*.md and slicer_module/README.md points at a file
//!   that exists, and a `#anchor` at a heading (or an `id`/`name` anchor) of its target;
//! * every `sfr <subcommand> ...` command shown in README.md, docs/*.md and
//!   slicer_module/README.md (code blocks and inline code) names a subcommand the built `sfr`
//!   has, and every `--flag` in it is one that subcommand's `--help` lists; every preset and
//!   method those commands name is one the binary accepts;
//! * every preset the binary knows appears in docs/cli.md, and its synopsis shows every long
//!   flag of every subcommand (the reference promises every flag);
//! * every preset the documents name (`--preset X`, `"preset": "X"`, a `cpu-…`/`gpu-…`/
//!   `paper-…`/`test-…` name in inline code) is one the binary knows;
//! * no user document points into `../shared/` (the development folder beside the repository,
//!   which a user of the repository does not have), except `../shared/data` in a paragraph that
//!   calls it the development data. docs/experiments/ (dated lab notes) is exempt from this rule
//!   and from the command check, not from the link check.
//!
//! Only std and the built binary (`CARGO_BIN_EXE_sfr`); no network, no data, a few seconds.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// README.md, docs/**/*.md and slicer_module/README.md.
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let r = root();
    let mut docs = vec![r.join("README.md")];
    walk(&r.join("docs"), &mut docs);
    let slicer = r.join("slicer_module/README.md");
    if slicer.exists() {
        docs.push(slicer);
    }
    docs
}

/// User documents: not the dated lab notes under docs/experiments/.
fn user_documents() -> Vec<PathBuf> {
    let lab = root().join("docs/experiments");
    documents().into_iter().filter(|p| !p.starts_with(&lab)).collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One line of a document: its number (1-based), its text, and whether it is inside a fenced
/// code block.
struct Line<'a> {
    no: usize,
    text: &'a str,
    fenced: bool,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut fence: Option<&str> = None;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let t = l.trim_start();
        let marker = if t.starts_with("```") { Some("```") } else if t.starts_with("~~~") { Some("~~~") } else { None };
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m => fence = None,
            _ => out.push(Line { no: i + 1, text: l, fenced: fence.is_some() }),
        }
    }
    out
}

/// Splits a line outside code into (is_code, text) pieces at backtick code spans.
fn spans(line: &str) -> Vec<(bool, &str)> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let delim = &rest[start..start + ticks];
        let after = &rest[start + ticks..];
        match after.find(delim) {
            Some(end) => {
                out.push((false, &rest[..start]));
                out.push((true, &after[..end]));
                rest = &after[end + ticks..];
            }
            None => break,
        }
    }
    out.push((false, rest));
    out
}

/// Inline links `[text](target)` and images `![alt](target)` in prose (not in code).
fn links(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (code, text) in spans(line) {
        if code {
            continue;
        }
        let mut rest = text;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let mut depth = 0;
            let mut end = None;
            for (k, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = Some(k);
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            // `[text](target "title")`: the target is the first word.
            let target = after[..end].split_whitespace().next().unwrap_or("").trim_matches(|c| c == '<' || c == '>');
            out.push(target.to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: inline markup removed, lower case, every character that is
/// not a letter, digit, space, `-` or `_` dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    // [text](url) -> text
    let mut rest = heading;
    while let Some(i) = rest.find("](") {
        let Some(open) = rest[..i].rfind('[') else { break };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..i]);
        let close = rest[i..].find(')').map(|k| i + k + 1).unwrap_or(rest.len());
        rest = &rest[close..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a Markdown file offers: its headings' slugs (duplicates numbered as GitHub
/// does) and explicit `id="…"` / `name="…"` attributes.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for l in lines(text) {
        if l.fenced {
            continue;
        }
        let t = l.text.trim_start();
        let hashes = t.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && t[hashes..].starts_with(' ') {
            let s = slug(t[hashes..].trim().trim_end_matches('#').trim());
            let n = seen.entry(s.clone()).or_insert(0);
            out.insert(if *n == 0 { s.clone() } else { format!("{s}-{n}") });
            *n += 1;
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = l.text;
            while let Some(i) = rest.find(attr) {
                let after = &rest[i + attr.len()..];
                if let Some(end) = after.find('"') {
                    out.insert(after[..end].to_string());
                }
                rest = after;
            }
        }
    }
    out
}

#[test]
fn relative_links_resolve() {
    let mut bad = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = read(&doc);
        for l in lines(&text) {
            if l.fenced {
                continue;
            }
            for target in links(l.text) {
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let file = if path.is_empty() { doc.clone() } else { doc.parent().unwrap().join(path) };
                if !file.exists() {
                    bad.push(format!("{}:{}: link to {target}: {} does not exist", rel(&doc), l.no, file.display()));
                    continue;
                }
                if let Some(a) = anchor {
                    if file.extension().is_none_or(|e| e != "md") {
                        bad.push(format!("{}:{}: link to {target}: an anchor into a file that is not Markdown", rel(&doc), l.no));
                    } else if !anchors(&read(&file)).contains(a) {
                        bad.push(format!("{}:{}: link to {target}: no heading '#{a}' in {}", rel(&doc), l.no, rel(&file)));
                    }
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} relative links found: is the link parser broken?");
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
}

/// Exit success and output of one `sfr` run.
type Outcome = (bool, String);

/// The built `sfr`'s success and output for an argument list, cached.
fn sfr(args: &[&str]) -> Outcome {
    static CACHE: OnceLock<Mutex<HashMap<Vec<String>, Outcome>>> = OnceLock::new();
    let key: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap().get(&key) {
        return hit.clone();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sfr")).args(args).output().expect("run sfr");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let r = (out.status.success(), text);
    cache.lock().unwrap().insert(key, r.clone());
    r
}

/// Every `--long` flag in a text (as in a `--help` output).
fn long_flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-');
        if boundary && b[i] == b'-' && b[i + 1] == b'-' && b[i + 2].is_ascii_lowercase() {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'-') {
                j += 1;
            }
            out.insert(text[i..j].trim_end_matches('-').to_string());
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The subcommands of `sfr --help` ("Commands:" section).
fn subcommands() -> BTreeSet<String> {
    let (_, help) = sfr(&["--help"]);
    let section = help.split("Commands:").nth(1).expect("sfr --help lists Commands:");
    let section = section.split("\n\n").next().unwrap();
    section.lines().filter_map(|l| l.split_whitespace().next()).filter(|w| *w != "help").map(String::from).collect()
}

fn flags_of(sub: Option<&str>) -> BTreeSet<String> {
    let args: Vec<&str> = sub.into_iter().chain(["--help"]).collect();
    let (ok, help) = sfr(&args);
    assert!(ok, "sfr {} failed:\n{help}", args.join(" "));
    let mut f = long_flags(&help);
    f.insert("--help".into());
    f
}

fn preset_known(name: &str) -> bool {
    sfr(&["train", "--data", "/nonexistent", "--preset", name, "--print-config"]).0
}

fn method_known(name: &str) -> bool {
    sfr(&["train", "--data", "/nonexistent", "--method", name, "--print-config"]).0
}

/// Splits a command line into words as a shell would for this purpose: quotes group words
/// (and are dropped), an unquoted `#` after a blank starts a comment.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                any = true;
            }
            None if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            None if c == '#' && cur.is_empty() && !any => break,
            None => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `sfr ...` commands of a document with their line numbers: lines of fenced code blocks
/// (joining `\` continuations) and inline code spans that start with `sfr`.
fn commands(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for l in lines(text) {
        if l.fenced {
            let (no, mut acc) = pending.take().unwrap_or((l.no, String::new()));
            let t = l.text.trim_end();
            if let Some(head) = t.strip_suffix('\\') {
                acc.push_str(head);
                acc.push(' ');
                pending = Some((no, acc));
            } else {
                acc.push_str(t);
                out.push((no, acc));
            }
            continue;
        }
        if let Some(p) = pending.take() {
            out.push(p);
        }
        for (code, span) in spans(l.text) {
            if code && (span.starts_with("sfr ") || span.contains("/sfr ")) {
                out.push((l.no, span.to_string()));
            }
        }
    }
    out.extend(pending);
    out
}

/// What is wrong with one line's `sfr` command, if it holds one.
fn check_command(line: &str, subs: &BTreeSet<String>) -> Vec<String> {
    let w = words(line);
    let Some(at) = w.iter().position(|t| t == "sfr" || t.ends_with("/sfr")) else { return vec![] };
    let Some(next) = w.get(at + 1) else { return vec![] };
    let mut problems = Vec::new();
    let sub = if next.starts_with("--") {
        None
    } else if next.chars().all(|c| c.is_ascii_lowercase()) && !next.is_empty() {
        if !subs.contains(next) {
            return vec![format!("`sfr {next}`: no such subcommand (sfr --help lists {subs:?})")];
        }
        Some(next.as_str())
    } else {
        return vec![];
    };
    let known = flags_of(sub);
    let name = sub.map(|s| format!("sfr {s}")).unwrap_or_else(|| "sfr".into());
    let rest = &w[at + 1 + usize::from(sub.is_some())..];
    let mut k = 0;
    while k < rest.len() {
        let t = rest[k].as_str();
        // The end of the command: a shell pipe into another program, a redirection, `;`, `&&`.
        if matches!(t, ";" | "&&" | "||" | ">" | "2>" | ">>") {
            break;
        }
        if t == "|" {
            match rest.get(k + 1) {
                Some(n) if n.starts_with('-') || n.starts_with('[') || n.contains('.') => {}
                _ => break,
            }
        }
        let bare = t.trim_start_matches(['[', '(']).trim_end_matches([']', ')', ',']);
        for piece in bare.split('|') {
            if !piece.starts_with("--") {
                continue;
            }
            let flag = piece.split('=').next().unwrap();
            if !known.contains(flag) {
                problems.push(format!("`{name}`: no flag {flag} in `{name} --help`"));
            }
            let value = piece.split_once('=').map(|(_, v)| v.to_string()).or_else(|| rest.get(k + 1).cloned());
            let values = || -> Vec<String> {
                value.as_deref().unwrap_or("").trim_matches(['[', ']', '(', ')']).split('|').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            };
            if flag == "--preset" {
                for v in values() {
                    if !preset_known(&v) {
                        problems.push(format!("`{name} --preset {v}`: the binary knows no such preset"));
                    }
                }
            }
            if flag == "--method" && sub == Some("train") {
                for v in values() {
                    if !method_known(&v) {
                        problems.push(format!("`{name} --method {v}`: the binary knows no such method"));
                    }
                }
            }
        }
        k += 1;
    }
    problems
}

#[test]
fn sfr_commands_in_the_docs_parse() {
    let subs = subcommands();
    assert!(subs.contains("train") && subs.contains("segment"), "subcommands: {subs:?}");
    let mut bad = Vec::new();
    let mut seen = 0;
    for doc in user_documents() {
        for (no, cmd) in commands(&read(&doc)) {
            if words(&cmd).iter().any(|t| t == "sfr" || t.ends_with("/sfr")) {
                seen += 1;
            }
            for p in check_command(&cmd, &subs) {
                bad.push(format!("{}:{no}: {p}\n    {}", rel(&doc), cmd.trim()));
            }
        }
    }
    assert!(seen > 20, "only {seen} sfr commands found: is the command parser broken?");
    // A flag shown on its own in prose (`--labeled-list FILE`) in README.md and docs/ is one of
    // some sfr subcommand, unless it belongs to the few other tools these docs quote. (The
    // Slicer module's README also quotes its own test scripts' flags: there only its `sfr ...`
    // commands are checked.)
    const OTHER_TOOLS: [&str; 2] = [
        "--no-as-needed", // the linker's, in c-api.md
        "--bn",           // tests/reference/retrain_reference.py's, in results.md
    ];
    let mut all = flags_of(None);
    for sub in &subs {
        all.extend(flags_of(Some(sub)));
    }
    let slicer = root().join("slicer_module");
    for doc in user_documents().into_iter().filter(|d| !d.starts_with(&slicer)) {
        for l in lines(&read(&doc)) {
            if l.fenced {
                continue;
            }
            for (code, span) in spans(l.text) {
                let Some(first) = span.split_whitespace().next() else { continue };
                let flag = first.split('=').next().unwrap();
                if code && flag.starts_with("--") && !all.contains(flag) && !OTHER_TOOLS.contains(&flag) {
                    bad.push(format!("{}:{}: `{span}`: no sfr subcommand has the flag {flag}", rel(&doc), l.no));
                }
            }
        }
    }
    assert!(bad.is_empty(), "commands in the docs that the binary does not accept:\n{}", bad.join("\n"));
}

/// The presets the binary knows, from its own error message for an unknown one.
fn known_presets() -> Vec<String> {
    let (ok, msg) = sfr(&["train", "--data", "/nonexistent", "--preset", "no-such-preset", "--print-config"]);
    assert!(!ok, "an unknown preset was accepted");
    let list = msg.split("(known: ").nth(1).and_then(|s| s.split(')').next()).unwrap_or_else(|| panic!("no preset list in: {msg}"));
    list.split(", ").map(String::from).collect()
}

#[test]
fn every_preset_named_in_the_docs_exists_and_every_preset_is_documented() {
    let presets = known_presets();
    assert!(presets.len() >= 3, "{presets:?}");
    let mut bad = Vec::new();
    for doc in user_documents() {
        let text = read(&doc);
        for l in lines(&text) {
            let mut named = Vec::new();
            let w = words(l.text);
            for (i, t) in w.iter().enumerate() {
                if t.trim_start_matches('[') == "--preset" {
                    if let Some(v) = w.get(i + 1) {
                        named.extend(v.trim_matches(['[', ']', '`']).split('|').map(String::from));
                    }
                }
            }
            let mut rest = l.text;
            while let Some(i) = rest.find("\"preset\":") {
                let after = rest[i + 9..].trim_start();
                if let Some(v) = after.strip_prefix('"').and_then(|a| a.split('"').next()) {
                    named.push(v.to_string());
                }
                rest = &rest[i + 9..];
            }
            if !l.fenced {
                for (code, span) in spans(l.text) {
                    let looks_like_preset = ["cpu-", "gpu-", "paper-", "test-"].iter().any(|p| span.starts_with(p))
                        && span.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                    if code && looks_like_preset {
                        named.push(span.to_string());
                    }
                }
            }
            for n in named {
                if !n.is_empty() && !n.contains('$') && !presets.contains(&n) {
                    bad.push(format!("{}:{}: preset '{n}' is not one the binary knows ({})", rel(&doc), l.no, presets.join(", ")));
                }
            }
        }
    }
    let cli = read(&root().join("docs/cli.md"));
    for p in &presets {
        if !cli.contains(&format!("`{p}`")) {
            bad.push(format!("docs/cli.md: the preset `{p}` is not described"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The flags docs/cli.md's synopsis (its code blocks) shows for each subcommand: a line that
/// starts with `sfr SUB` and the indented lines that continue it.
fn synopsis_flags() -> HashMap<String, BTreeSet<String>> {
    let cli = read(&root().join("docs/cli.md"));
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut current: Option<String> = None;
    for l in lines(&cli) {
        if !l.fenced {
            current = None;
            continue;
        }
        let w = words(l.text);
        if w.first().map(String::as_str) == Some("sfr") {
            current = w.get(1).filter(|s| !s.starts_with('-')).cloned();
        } else if !l.text.starts_with(char::is_whitespace) {
            current = None;
        }
        if let Some(sub) = &current {
            // Only the command, not its trailing comment.
            let text = w.iter().map(String::as_str).collect::<Vec<_>>().join(" ");
            out.entry(sub.clone()).or_default().extend(long_flags(&text));
        }
    }
    out
}

#[test]
fn every_flag_of_every_subcommand_is_in_the_cli_reference() {
    let synopsis = synopsis_flags();
    let mut missing = Vec::new();
    for sub in subcommands() {
        let shown = synopsis.get(&sub).cloned().unwrap_or_default();
        for f in flags_of(Some(&sub)) {
            if f != "--help" && !shown.contains(&f) {
                missing.push(format!("sfr {sub} {f}"));
            }
        }
    }
    assert!(missing.is_empty(), "flags that docs/cli.md's synopsis does not show for their subcommand:\n{}", missing.join("\n"));
}

#[test]
fn user_docs_do_not_point_into_the_development_folder() {
    let mut bad = Vec::new();
    for doc in user_documents() {
        let text = read(&doc);
        for para in text.split("\n\n") {
            let mut rest = para;
            while let Some(i) = rest.find("../shared/") {
                let after = &rest[i + "../shared/".len()..];
                if !(after.starts_with("data") && para.contains("development data")) {
                    let line = text[..text.find(para).unwrap()].lines().count() + para[..para.len() - rest.len() + i].lines().count();
                    bad.push(format!("{}:{line}: ../shared/{}", rel(&doc), after.split(|c: char| c.is_whitespace() || c == '`').next().unwrap()));
                }
                rest = after;
            }
        }
    }
    assert!(
        bad.is_empty(),
        "paths into ../shared/ (absent for a user of the repository; only ../shared/data is allowed, in a \
         paragraph that calls it the development data):\n{}",
        bad.join("\n")
    );
}

/// Every C code block of README.md compiles against the committed `include/sfr.h` (strict C11,
/// every warning an error): the front door's code is real code.
#[test]
fn the_readme_c_code_compiles_against_the_header() {
    let readme = read(&root().join("README.md"));
    let mut blocks = vec![];
    let mut cur: Option<String> = None;
    for l in readme.lines() {
        match (&mut cur, l.trim_end()) {
            (None, "```c") => cur = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), _) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert!(!blocks.is_empty(), "README.md has no ```c block");
    let dir = tempfile::tempdir().unwrap();
    for (i, code) in blocks.iter().enumerate() {
        let file = dir.path().join(format!("readme_{i}.c"));
        std::fs::write(&file, code).unwrap();
        let out = Command::new("cc")
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-I"])
            .arg(root().join("include"))
            .arg(&file)
            .output()
            .expect("cc (installed by scripts/setup.sh) runs");
        assert!(out.status.success(), "README.md's C block {i} does not compile:\n{}\n{code}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_parsers_of_this_test_work() {
    assert_eq!(slug("The training check"), "the-training-check");
    assert_eq!(slug("What runs on Slicer's GUI thread"), "what-runs-on-slicers-gui-thread");
    assert_eq!(slug("`sfr train`: flags"), "sfr-train-flags");
    assert_eq!(links("see [a](b.md#c) and `[x](y)` and ![p](img.svg)"), vec!["b.md#c", "img.svg"]);
    assert_eq!(words("sfr train --set '{\"a\": 1}' --out x # comment"), vec!["sfr", "train", "--set", "{\"a\": 1}", "--out", "x"]);
    assert_eq!(long_flags("  --data <DATA>  [--sfr | --no-sam] e.g. --set"), ["--data", "--no-sam", "--set", "--sfr"].map(String::from).into());
    let subs: BTreeSet<String> = ["train".to_string()].into();
    // No binary call for a command whose subcommand does not exist.
    assert_eq!(check_command("sfr trian --data D", &subs).len(), 1);
    assert!(check_command("pkg-config --cflags --libs sfr", &subs).is_empty());
}
