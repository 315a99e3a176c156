//! Smoke test of `sfr demo` on the real scans shipped in demo/hippocampus: the whole path (data
//! found beside the binary, every row trained through the library, scored on held-out cases,
//! model, segmentation, pictures, results) with a budget of seconds. It checks that the outputs
//! exist and are valid, not how good they are: the demo's numbers are a full run's business.
use std::path::Path;
use std::process::Command;

/// Decodes an RGB PNG; with `mixed`, also checks that it has overlay-coloured and plain grey
/// pixels (the views grid always has both: its image column and its ground-truth column).
fn decode_png(path: &Path, mixed: bool) -> png::OutputInfo {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = &buf[..info.buffer_size()];
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    if !mixed {
        return info;
    }
    let coloured = px.chunks(3).filter(|p| p[0] != p[1] || p[1] != p[2]).count();
    let grey_nonblack = px.chunks(3).filter(|p| p[0] == p[1] && p[1] == p[2] && p[0] > 0).count();
    assert!(coloured > 0 && grey_nonblack > 0, "{}: {coloured} coloured, {grey_nonblack} grey pixels", path.display());
    info
}

#[test]
fn demo_runs_end_to_end_on_the_shipped_hippocampus_scans() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(["demo", "--iterations", "3", "--sam-iterations", "2", "--sam-canvases", "2", "--labeled", "2", "--unlabeled", "2", "--test", "2"])
        .args(["--sfr-plus", "--pseudo-label-curve", "3", "--progress", "none", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "sfr demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    for row in ["supervised (labels only)", "mean teacher", "SFR (mean teacher)", "SFR+ (mean teacher)"] {
        assert!(stdout.lines().any(|l| l.starts_with(row)), "row '{row}' missing from the table:\n{stdout}");
    }
    assert!(stdout.contains("Anterior Dice") && stdout.contains("Posterior Dice"), "{stdout}");

    // results.json: the split, four rows of valid scores on the two test cases.
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["dataset"], "Hippocampus");
    assert!(results["data"].as_str().unwrap().ends_with("demo/hippocampus"), "{}", results["data"]);
    let ids = |k: &str| results[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (lab, unl, test) = (ids("labeled"), ids("unlabeled"), ids("test"));
    assert_eq!((lab.len(), unl.len(), test.len()), (2, 2, 2));
    assert_eq!(test, ["hippocampus_393", "hippocampus_394"], "test cases are the last of dataset.json");
    assert!(lab.iter().chain(&unl).all(|id| !test.contains(id)), "a test case was used in training");
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        let d = r["mean_dice"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&d), "{r}");
        assert_eq!(r["per_case"].as_array().unwrap().len(), 2);
        assert_eq!(r["classes"].as_array().unwrap().len(), 2);
    }
    assert!(rows[2]["sam"]["variant"].is_string(), "the SFR row records its SAM: {}", rows[2]["sam"]);
    // Where set-up has cached LiteMedSAM, the SFR rows use it (frozen encoder, here on 2
    // canvases; in bf16 where the CPU has it): the pretrained path runs end to end, and the
    // notes say how SAM was fine-tuned.
    if std::env::var_os("SFR_SAM_CHECKPOINT").is_none() && sfr::nn::sam::checkpoint::lite_medsam_path().is_some_and(|p| p.is_file()) {
        assert_eq!(rows[2]["sam"]["variant"], "lite_medsam", "{}", rows[2]["sam"]);
        assert!(stdout.contains("fine-tuning: frozen encoder, 2 cached canvases, 2 decoder steps of 1"), "{stdout}");
    }
    // The SAM stage scored on its own: one entry per unlabelled case, each Dice recomputed here
    // from the pseudo-label file and the true label by counting voxels.
    let pseudo = results["pseudo_labels"].as_array().unwrap();
    assert_eq!(pseudo.iter().map(|p| p["id"].as_str().unwrap().to_string()).collect::<Vec<_>>(), unl);
    assert!(stdout.contains("SAM's pseudo-labels of the 2 unlabelled cases against their true labels"), "{stdout}");
    let data = std::path::Path::new(results["data"].as_str().unwrap());
    for p in pseudo {
        let id = p["id"].as_str().unwrap();
        let pred = sfr::io::nifti::read(out.path().join(format!("work/mean-teacher/pseudo/{id}_pseudo.nii.gz"))).unwrap().cast::<u8>();
        let truth = sfr::io::nifti::read(data.join(format!("labelsTr/{id}.nii.gz"))).unwrap().cast::<u8>();
        let metrics = p["metrics"].as_array().unwrap();
        assert_eq!(metrics.len(), 2);
        for m in metrics {
            let c = m["class"].as_u64().unwrap() as u8;
            let (a, b) = (pred.data.iter().filter(|&&v| v == c).count(), truth.data.iter().filter(|&&v| v == c).count());
            let both = pred.data.iter().zip(truth.data.iter()).filter(|(&x, &y)| x == c && y == c).count();
            let dice = if a + b == 0 { 1.0 } else { 2.0 * both as f64 / (a + b) as f64 };
            assert!((m["dice"].as_f64().unwrap() - dice).abs() < 1e-9, "{id} class {c}: {m} against {dice}");
        }
    }
    assert!(out.path().join("results.txt").is_file());

    // The pseudo-label curve: 3 points over SAM's 2 fine-tuning steps. Its last point scores the
    // module that wrote the pseudo-labels, so it must equal their score above (per class, mean
    // over cases): the probe looked without changing the training.
    let curve = results["pseudo_label_curve"].as_array().unwrap();
    assert_eq!(curve.iter().map(|p| p["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2], "{curve:?}");
    let last = &curve[2]["dice"];
    for (k, name) in [(0, "Anterior"), (1, "Posterior")] {
        let from_files = 100.0 * pseudo.iter().map(|p| p["metrics"][k]["dice"].as_f64().unwrap()).sum::<f64>() / pseudo.len() as f64;
        let probed = last[name].as_f64().unwrap_or_else(|| panic!("{name} missing: {last}"));
        assert!((probed - from_files).abs() < 1e-6, "{name}: curve's last point {probed} against the written pseudo-labels' {from_files}");
    }
    assert!(stdout.contains("SAM's pseudo-labels along its fine-tuning (3 points)"), "{stdout}");

    // Time per stage, per row: every row loads and re-trains; the SFR rows fine-tune SAM and
    // pseudo-label; the probe's passes are timed apart from the fine-tuning they interrupt.
    let stages = |r: &serde_json::Value| r["stage_seconds"].as_array().unwrap().iter().map(|s| {
        assert!(s["seconds"].as_f64().unwrap() >= 0.0, "{s}");
        s["stage"].as_str().unwrap().to_string()
    }).collect::<Vec<_>>();
    assert_eq!(stages(&rows[0]), ["load", "retrain", "fit"], "{}", rows[0]);
    let sfr_stages = stages(&rows[2]);
    for st in ["load", "finetune", "sam_probe", "pseudolabel", "retrain", "fit"] {
        assert!(sfr_stages.iter().any(|s| s == st), "{st} missing: {sfr_stages:?}");
    }
    assert!(!stages(&rows[3]).iter().any(|s| s == "sam_probe"), "only the first SFR row is probed");

    // The model loads and says it is the SFR (mean teacher) one.
    let meta = sfr::model::SfrModel::read_meta(out.path().join("sfr_mean_teacher.sfrmodel")).unwrap();
    assert_eq!(meta.training["method"], "mean-teacher");
    assert_eq!(meta.training["sfr"], true);
    assert_eq!(meta.training["sfr_plus"], false);

    // The example segmentation has the test image's dims and geometry and only known labels.
    let img = sfr::io::nifti::read(format!("{}/imagesTr/hippocampus_393.nii.gz", results["data"].as_str().unwrap())).unwrap();
    let seg = sfr::io::nifti::read(out.path().join("hippocampus_393_sfr_segmentation.nii.gz")).unwrap().cast::<u8>();
    assert_eq!(seg.dims(), img.dims());
    assert!(seg.geometry.max_abs_diff(img.geometry()) < 1e-5);
    assert!(seg.data.iter().all(|&v| v <= 2));

    // Pictures: the views grid (3 rows of 6 tiles, each at least as large as a slice) and the
    // stitched pseudo-label canvas (square, under its title band of whole text lines).
    let views = decode_png(&out.path().join("pictures/hippocampus_393_views.png"), true);
    assert!(views.width > 6 * 30 && views.height > 3 * 24, "{}×{}", views.width, views.height);
    // A SAM trained for 2 iterations may label everything or nothing: only validity is checked.
    let canvas = decode_png(&out.path().join(format!("pictures/{}_sam_pseudo_label.png", unl[0])), false);
    use sfr::io::text::{LINE, MARGIN};
    let band = canvas.height as usize - canvas.width as usize;
    assert!(band > 2 * MARGIN && (band - 2 * MARGIN) % LINE == 0, "{}×{}", canvas.width, canvas.height);
    for p in [&results["pictures"]["views"], &results["pictures"]["sam_pseudo_label"]] {
        assert!(stdout.contains(p.as_str().unwrap()), "picture path {p} not printed:\n{stdout}");
    }
}

#[test]
fn demo_with_a_missing_data_folder_names_it() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(["demo", "--data", "/nonexistent/demo-data", "--progress", "none", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("/nonexistent/demo-data/dataset.json"), "{stderr}");
}

#[test]
fn demo_rejects_a_split_larger_than_the_data() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sfr"))
        .args(["demo", "--labeled", "30", "--unlabeled", "20", "--test", "12", "--progress", "none", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("dataset.json lists 36"), "{stderr}");
}
