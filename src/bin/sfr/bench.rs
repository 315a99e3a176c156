//! `sfr bench --json`: throughput numbers, one JSON object. Never asserted on: machines differ.
//!
//! Sections: `stitch` (stitch/unstitch beside memcpy), `sam` (SAM vit_b image encoder) and
//! `vnet` (V-Net training step and inference), the last two each beside PyTorch eager
//! (see `bench_models.rs`); `segment` (a whole volume through `sfr segment`'s path beside
//! MONAI's sliding_window_inference and the reference code's per-window loop, same file);
//! `retrain` (iterations per second of each method, the mean
//! teacher's cost, contention; `bench_retrain.rs`; `--only contention` runs the last alone);
//! `machine` describes where the numbers came from.
use ndarray::{s, Array2, Array3};
use serde_json::{json, Value};
use sfr::stitch::{self, StitchLayout};
use sfr::{Error, Result};
use std::hint::black_box;
use std::time::Instant;

#[path = "bench_models.rs"]
mod models;
#[path = "bench_retrain.rs"]
mod retrain;

/// Sections `--only` accepts (besides the names of single model cases).
pub const SECTIONS: [&str; 6] = ["stitch", "sam", "vnet", "segment", "retrain", "contention"];

/// What `sfr bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// CI-sized run: leaves out SAM at 1024 and the 112×112×80 training step (each minutes and
    /// gigabytes on a small CPU) and takes fewer repetitions.
    pub quick: bool,
    /// Threads of libtorch (both sides) and of the stitch's rayon pool; `None`: libtorch's default.
    pub threads: Option<usize>,
    /// Sections (`stitch`, `sam`, `vnet`) or single cases (`sam_encoder_1024`, ...) to run;
    /// empty: all. A case named here runs even under `quick`.
    pub only: Vec<String>,
    /// `cpu`, `cuda` or `auto` (CUDA when present).
    pub device: String,
    /// Timed repetitions per side of each model case; `None`: 5 (3 for the heavy cases and
    /// under `quick`).
    pub reps: Option<usize>,
    /// Runs the PyTorch eager reference beside each model case (needs a Python with torch).
    pub pytorch: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { quick: false, threads: None, only: Vec::new(), device: "auto".into(), reps: None, pytorch: true }
    }
}

/// Every benchmark section with the default options.
#[allow(dead_code)] // kept for callers that take no options

/// The benchmarks `opts` selects, keyed by section. A process started by the model benchmarks
/// as their worker (see `bench_models.rs`) runs its case instead and never returns.
pub fn run_with(opts: &BenchOptions) -> Result<Value> {
    if let Ok(spec) = std::env::var(models::WORKER_ENV) {
        models::worker_main(&spec);
    }
    if std::env::var_os(retrain::BUSY_ENV).is_some() {
        retrain::busy_main();
    }
    let all_cases = models::cases();
    for name in &opts.only {
        if !SECTIONS.contains(&name.as_str()) && !all_cases.iter().any(|c| c.name == name) {
            let cases: Vec<&str> = all_cases.iter().map(|c| c.name).collect();
            return Err(Error::invalid(format!(
                "sfr bench --only {name}: unknown section or case (sections: {}; cases: {})",
                SECTIONS.join(", "),
                cases.join(", ")
            )));
        }
    }
    if opts.threads == Some(0) {
        return Err(Error::invalid("sfr bench --threads: must be at least 1"));
    }
    let device = sfr::nn::parse_device(&opts.device)?;
    let device_name = if device == tch::Device::Cpu { "cpu" } else { "cuda" };
    sfr::threads::default_threads(); // read before --threads changes it
    if let Some(n) = opts.threads {
        tch::set_num_threads(n as i32);
    }
    let threads = tch::get_num_threads().max(1) as usize;
    let wanted = |section: &str, case: Option<&str>| {
        opts.only.is_empty() || opts.only.iter().any(|o| o == section || Some(o.as_str()) == case)
    };

    let load_start = loadavg();
    let mut out = serde_json::Map::new();
    if wanted("stitch", None) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads.unwrap_or_else(rayon::current_num_threads))
            .build()
            .map_err(|e| Error::invalid(format!("cannot build a thread pool: {e}")))?;
        out.insert("stitch".into(), pool.install(stitch_bench));
    }
    let retrain_reps = opts.reps.unwrap_or(if opts.quick { 3 } else { 10 });
    if wanted("retrain", None) {
        out.insert("retrain".into(), retrain::retrain_bench(retrain_reps)?);
    } else if opts.only.iter().any(|o| o == "contention") {
        out.insert("retrain".into(), retrain::contention_only(retrain_reps)?);
    }
    let chosen: Vec<&models::Case> = all_cases
        .iter()
        .filter(|c| {
            let named = opts.only.iter().any(|o| o == c.name);
            named || (wanted(c.section, None) && !(opts.quick && c.heavy))
        })
        .collect();
    if !chosen.is_empty() {
        let python = if opts.pytorch { models::find_python() } else { Err("skipped (--no-pytorch)".to_string()) };
        let runner = models::ModelRun {
            threads,
            device: device_name.to_string(),
            python: python.clone(),
            reps: opts.reps,
            quick: opts.quick,
        };
        for case in chosen {
            let result = runner.case(case);
            let section = out.entry(case.section).or_insert_with(|| {
                let mut head = json!({
                    "note": "seconds = median of the timed repetitions after one warm-up, each side in a fresh process; \
                             sfr and PyTorch eager reps interleaved (ABBA) in the same run, same threads, device, dtype (f32), \
                             weights and inputs (PyTorch loads what the sfr worker saved). *_vs_pytorch = sfr / pytorch \
                             (seconds or peak RSS; <= 1.0: sfr no slower / no bigger). peak_rss_bytes = the worker's VmHWM, \
                             reset once its model was built, so model + activations of warm-up and reps; \
                             rss_after_setup_bytes = resident size at that reset (runtime + model); \
                             peak_rss_growth_bytes = the difference (activations, gradients, optimizer state).",
                    "threads": threads,
                    "device": device_name,
                    "python": match &python { Ok(p) => json!(p), Err(e) => json!({ "unavailable": e }) },
                });
                if case.section == "segment" {
                    head["note"] = json!(
                        "seconds = median of the timed repetitions (the warm-up segments one patch-sized corner), each side \
                         in a fresh process, sides' turns rotating in the same run; same threads, weights and volume (the \
                         Python sides load what the sfr worker saved). segment_volume_vs_monai / _vs_per_window = sfr time / \
                         their time per volume (<= 1.0: sfr faster); *_peak_rss_* likewise for the workers' peak RSS (VmHWM, \
                         reset once the model and volume were loaded); label_agreement_vs_* = fraction of voxels with the \
                         same label as sfr's."
                    );
                }
                head
            });
            if case.section == "segment" {
                for r in &result.ratios {
                    section[format!("segment_volume_vs_{}", r.against)][case.ratio_key] = json!(r.time);
                    section[format!("segment_volume_peak_rss_vs_{}", r.against)][case.ratio_key] = json!(r.peak_rss);
                }
            } else if let Some(r) = result.ratios.first() {
                section[case.ratio_key] = json!(r.time);
                section[format!("{}_peak_rss", case.ratio_key.trim_end_matches("_vs_pytorch")) + "_vs_pytorch"] = json!(r.peak_rss);
            } else {
                section[case.ratio_key] = Value::Null;
            }
            section[case.name] = result.json;
        }
    }
    if let Some(sam) = out.get_mut("sam") {
        bf16_speed_up(sam);
    }
    out.insert(
        "machine".into(),
        machine_info(threads, device_name, load_start, opts.quick),
    );
    Ok(Value::Object(out))
}

/// What `sam.bf16` buys in the LoRA fine-tuning step: bf16 seconds / float32 seconds (median),
/// for each side, when both LoRA-step cases ran (one after the other in this run).
fn bf16_speed_up(sam: &mut Value) {
    let (f32_case, bf16_case) = ("lite_medsam_lora_step_256", "lite_medsam_lora_step_256_bf16");
    let mut ratios = serde_json::Map::new();
    for side in ["sfr", "pytorch"] {
        let secs = |case: &str| sam[case][side]["seconds_median"].as_f64().filter(|s| *s > 0.0);
        if let (Some(f), Some(b)) = (secs(f32_case), secs(bf16_case)) {
            ratios.insert(side.into(), json!(b / f));
        }
    }
    if !ratios.is_empty() {
        sam["lite_medsam_lora_step_bf16_vs_f32"] = Value::Object(ratios);
    }
}

/// /proc/loadavg's 1, 5 and 15 minute averages.
fn loadavg() -> Option<Vec<f64>> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().take(3).map(|x| x.parse().ok()).collect()
}

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo.lines().find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
}

fn machine_info(threads: usize, device: &str, load_start: Option<Vec<f64>>, quick: bool) -> Value {
    let cpu_model = cpu_model();
    let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    json!({
        "cpu_model": cpu_model,
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "mem_total_bytes": mem_total,
        "threads": threads,
        "device": device,
        "cuda_devices": tch::Cuda::device_count(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "quick": quick,
        "sfr_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Median seconds of `reps` timed runs after one untimed run (which faults in the pages of
/// every buffer involved, so they are not charged to whichever method happens to run first).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    models::median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
    .unwrap_or(f64::NAN)
}

/// Stitch and unstitch throughput of an `nx × ny × nz` f32 volume cut into slabs that each fit
/// one `canvas × canvas` image, beside a plain memcpy of the same bytes.
fn stitch_case(nx: usize, ny: usize, nz: usize, canvas: usize, reps: usize) -> Value {
    let slabs = stitch::slab_ranges(nz, ny, nx, canvas).expect("bench shapes fit their canvas");
    let layouts: Vec<StitchLayout> = slabs
        .iter()
        .map(|r| StitchLayout::new(ny, nx, r.len(), canvas).expect("slab fits by construction"))
        .collect();
    // Content does not change copy speed; distinct values make the round-trip check meaningful.
    let vol = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| ((k * 7919 + j * 131 + i) % 65_521) as f32 + 1.0);
    let bytes = vol.len() * std::mem::size_of::<f32>();
    let gbps = |secs: f64| bytes as f64 / secs / 1e9;

    let src = vol.as_slice().expect("standard layout");
    let mut dst = vec![0f32; src.len()];
    let memcpy = time(reps, || {
        dst.copy_from_slice(black_box(src));
        black_box(&dst);
    });
    drop(dst);

    let mut canvases: Vec<Array2<f32>> = slabs.iter().map(|_| Array2::zeros((canvas, canvas))).collect();
    let stitch_all = |canvases: &mut [Array2<f32>]| {
        for ((r, l), c) in slabs.iter().zip(&layouts).zip(canvases.iter_mut()) {
            stitch::stitch_into(&vol.slice(s![r.clone(), .., ..]), l, stitch::IMAGE_PAD, &mut c.view_mut())
                .expect("shapes match");
        }
        black_box(&canvases);
    };
    let stitch_t = time(reps, || stitch_all(&mut canvases));
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    let stitch_1t = one_thread.install(|| time(reps, || stitch_all(&mut canvases)));
    let stitch_alloc = time(reps, || {
        for (r, l) in slabs.iter().zip(&layouts) {
            black_box(stitch::stitch_image(&vol.slice(s![r.clone(), .., ..]), l).expect("shapes match"));
        }
    });

    let mut out = Array3::<f32>::zeros((nz, ny, nx));
    let unstitch_t = time(reps, || {
        for ((r, l), c) in slabs.iter().zip(&layouts).zip(&canvases) {
            stitch::unstitch_into(&c.view(), l, &mut out.slice_mut(s![r.clone(), .., ..])).expect("shapes match");
        }
        black_box(&out);
    });
    let round_trip_exact = out == vol;
    let unstitch_alloc = time(reps, || {
        for (l, c) in layouts.iter().zip(&canvases) {
            black_box(stitch::unstitch(&c.view(), l).expect("shapes match"));
        }
    });
    let first = layouts[0];
    json!({
        "dims_xyz": [nx, ny, nz],
        "canvas": canvas,
        "grid": [first.n_row, first.n_col],
        "canvases": slabs.len(),
        "slices_per_canvas_min": slabs.iter().map(|r| r.len()).min(),
        "slices_per_canvas_max": slabs.iter().map(|r| r.len()).max(),
        "bytes": bytes,
        "reps": reps,
        "memcpy_gbps": gbps(memcpy),
        "stitch_gbps": gbps(stitch_t),
        "stitch_1thread_gbps": gbps(stitch_1t),
        "stitch_alloc_gbps": gbps(stitch_alloc),
        "unstitch_gbps": gbps(unstitch_t),
        "unstitch_alloc_gbps": gbps(unstitch_alloc),
        "stitch_vs_memcpy": stitch_t.recip() / memcpy.recip(),
        "stitch_1thread_vs_memcpy": stitch_1t.recip() / memcpy.recip(),
        "unstitch_vs_memcpy": unstitch_t.recip() / memcpy.recip(),
        "round_trip_exact": round_trip_exact,
    })
}

/// The stitch section: the LA training patch on SAM's 1024 canvas, and a 512×512×300 CT volume
/// on the same canvas (2×2 slices per canvas, 75 canvases), as pseudo-labelling would stitch it.
pub fn stitch_bench() -> Value {
    json!({
        "note": "GB/s = f32 volume bytes moved per second (1e9 bytes), median of `reps` runs after one warm-up; \
                 stitch/unstitch write into preallocated canvases/volumes like memcpy into a preallocated Vec \
                 (`*_alloc_gbps` include allocating the output); memcpy is one thread's copy_from_slice, \
                 stitch uses the rayon pool (`threads`), `stitch_1thread_gbps` a single thread",
        "threads": rayon::current_num_threads(),
        "la_patch_112x112x80": stitch_case(112, 112, 80, stitch::DEFAULT_CANVAS, 31),
        "volume_512x512x300": stitch_case(512, 512, 300, stitch::DEFAULT_CANVAS, 7),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A left-atrium volume at 1.7 mm is 32×53×74 voxels (z, y, x): cpu-small's 40×48×32 SAM
    /// patch at half stride covers it in 1 × 2 × 4 canvases.
    #[test]
    fn an_la_volume_is_eight_canvases_for_cpu_small() {
        assert_eq!(models::la_pseudo_label_windows(), 8);
    }

    /// bf16 / float32 per side, from the two LoRA-step cases' medians; nothing when one is missing.
    #[test]
    fn bf16_speed_up_is_the_ratio_of_the_lora_step_medians() {
        let side = |s: f64| json!({ "seconds_median": s });
        let mut sam = json!({
            "lite_medsam_lora_step_256": { "sfr": side(1.2), "pytorch": side(2.0) },
            "lite_medsam_lora_step_256_bf16": { "sfr": side(0.6), "pytorch": { "error": "failed" } },
        });
        bf16_speed_up(&mut sam);
        assert_eq!(sam["lite_medsam_lora_step_bf16_vs_f32"], json!({ "sfr": 0.5 }));
        let mut only_f32 = json!({ "lite_medsam_lora_step_256": { "sfr": side(1.2) } });
        bf16_speed_up(&mut only_f32);
        assert!(only_f32.get("lite_medsam_lora_step_bf16_vs_f32").is_none());
    }

    #[test]
    fn unknown_sections_and_zero_threads_are_errors() {
        let only = BenchOptions { only: vec!["nonsense".into()], ..Default::default() };
        let e = run_with(&only).unwrap_err().to_string();
        assert!(e.contains("nonsense") && e.contains("vnet_train_112x112x80"), "{e}");
        let zero = BenchOptions { threads: Some(0), only: vec!["stitch".into()], ..Default::default() };
        assert!(run_with(&zero).unwrap_err().to_string().contains("--threads"));
    }
}
