//! `sfr segment --manifest FILE.csv [--shard i/n]`: an archive of volumes segmented by one
//! model, split across the tasks of a job array (Slurm, SGE, a shell loop).
//!
//! The manifest has one `input,output` pair per line (CSV: quote a path that holds a comma; an
//! optional header `input,output`; blank lines and lines starting with `#` are skipped; relative
//! paths are relative to the manifest's folder, so a manifest travels with its archive). Row
//! *k* (counting data rows from 0) belongs to shard *k mod n*: every row to exactly one shard,
//! whatever the order the shards run in.
//!
//! Each output is written whole or not at all (temporary file, then rename), so an output that
//! exists is a finished one: a rerun skips it, and a killed task resumes where it stopped. A row
//! that fails (unreadable input, output not writable, ...) is reported and the task goes on with
//! the next; the task then exits non-zero so that the scheduler marks it failed.
use sfr::io::nifti;
use sfr::job::Reporter;
use sfr::model::SfrModel;
use sfr::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Line of the manifest (1-based), for messages.
    pub line: usize,
    pub input: PathBuf,
    pub output: PathBuf,
}

/// `i/n` with 0 ≤ i < n (Slurm: `$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT` with `--array=0-(n-1)`).
pub fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or_else(|| format!("--shard {s:?}: expected i/n, e.g. 0/4"))?;
    let i: usize = i.trim().parse().map_err(|_| format!("--shard {s:?}: {i:?} is not a number"))?;
    let n: usize = n.trim().parse().map_err(|_| format!("--shard {s:?}: {n:?} is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!("--shard {s:?}: needs 0 <= i < n (shards are numbered from 0)"));
    }
    Ok((i, n))
}

/// Every data row of the manifest, checked as a whole before any work: two rows writing the
/// same output, or a row whose output is its own input, are errors naming the lines.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::ReaderBuilder::new().has_headers(false).comment(Some(b'#')).flexible(true).trim(csv::Trim::All).from_reader(text.as_bytes());
    let mut rows = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| Error::format(path, format!("not a valid CSV manifest: {e}")))?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        if rec.iter().all(str::is_empty) {
            continue;
        }
        if rows.is_empty() && rec.len() == 2 && rec[0].eq_ignore_ascii_case("input") && rec[1].eq_ignore_ascii_case("output") {
            continue; // header
        }
        if rec.len() != 2 || rec[0].is_empty() || rec[1].is_empty() {
            return Err(Error::format(path, format!("line {line}: expected two fields `input,output`, found {}", rec.len())));
        }
        let resolve = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
        rows.push(Row { line, input: resolve(&rec[0]), output: resolve(&rec[1]) });
    }
    if rows.is_empty() {
        return Err(Error::format(path, "the manifest lists no volumes"));
    }
    let mut outputs: HashMap<&Path, usize> = HashMap::new();
    for r in &rows {
        if r.input == r.output {
            return Err(Error::format(path, format!("line {}: the output is the input ({})", r.line, r.input.display())));
        }
        if let Some(first) = outputs.insert(&r.output, r.line) {
            return Err(Error::format(path, format!("lines {first} and {}: both write {}", r.line, r.output.display())));
        }
    }
    Ok(rows)
}

/// The rows of shard `i` of `n`.
pub fn shard(rows: Vec<Row>, (i, n): (usize, usize)) -> Vec<Row> {
    rows.into_iter().enumerate().filter(|(k, _)| k % n == i).map(|(_, r)| r).collect()
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Segmented,
    /// The output exists: a finished earlier run.
    Skipped,
    Failed(String),
}

/// Segments `rows` in order; a failing row is recorded and the next one taken. Only
/// cancellation stops early (what was written stays, whole).
pub fn run(model: &SfrModel, rows: &[Row], reporter: &Reporter) -> Result<Vec<(Row, Outcome)>> {
    let mut done = Vec::with_capacity(rows.len());
    for (k, row) in rows.iter().enumerate() {
        reporter.message(&format!("{}/{}: {}", k + 1, rows.len(), row.input.display()));
        let outcome = if row.output.exists() {
            Outcome::Skipped
        } else {
            match segment_one(model, row, reporter) {
                Ok(()) => Outcome::Segmented,
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        };
        done.push((row.clone(), outcome));
    }
    Ok(done)
}

fn segment_one(model: &SfrModel, row: &Row, reporter: &Reporter) -> Result<()> {
    sfr::io::check_output(&row.output, &[&row.input])?;
    nifti::check_output_name(&row.output)?;
    let img = nifti::read(&row.input)?.cast::<f32>();
    let (seg, _) = model.segment(&img, Some(reporter))?;
    write_labels(&row.output, &seg, &model.meta.classes)
}

/// A label map as `sfr segment` writes it: uint8, or uint16 when a class index passes 255.
pub fn write_labels(path: &Path, seg: &sfr::volume::Volume<u8>, classes: &sfr::limits::Classes) -> Result<()> {
    if classes.keys().max().copied().unwrap_or(0) > 255 {
        nifti::write(path, &seg.cast::<u16>())
    } else {
        nifti::write(path, seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_rows() {
        let rows: Vec<Row> = (0..10).map(|k| Row { line: k + 1, input: format!("i{k}").into(), output: format!("o{k}").into() }).collect();
        let mut seen: Vec<usize> = (0..3).flat_map(|i| shard(rows.clone(), (i, 3))).map(|r| r.line).collect();
        seen.sort();
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        assert_eq!(parse_shard("2/3"), Ok((2, 3)));
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.csv");
        std::fs::write(&m, "input,output\n# a comment\n\na.nii.gz, out/a.nii.gz\n\"/abs/b,1.nii\",b.nii.gz\n").unwrap();
        let rows = read(&m).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input, dir.path().join("a.nii.gz"));
        assert_eq!(rows[0].output, dir.path().join("out/a.nii.gz"));
        assert_eq!(rows[1].input, PathBuf::from("/abs/b,1.nii"));
        std::fs::write(&m, "a.nii,x.nii\nb.nii,x.nii\n").unwrap();
        assert!(read(&m).unwrap_err().to_string().contains("lines 1 and 2"));
        std::fs::write(&m, "a.nii\n").unwrap();
        assert!(read(&m).unwrap_err().to_string().contains("line 1"));
        std::fs::write(&m, "# nothing\n").unwrap();
        assert!(read(&m).unwrap_err().to_string().contains("no volumes"));
    }
}
