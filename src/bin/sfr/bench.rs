//! `sfr bench --json`: throughput numbers, one JSON object. Never asserted on: machines differ.
use ndarray::{s, Array2, Array3};
use serde_json::{json, Value};
use sfr::stitch::{self, StitchLayout};
use std::hint::black_box;
use std::time::Instant;

/// Every benchmark section, keyed by module.
pub fn run() -> Value {
    json!({ "stitch": stitch_bench() })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Median seconds of `reps` timed runs after one untimed run (which faults in the pages of
/// every buffer involved, so they are not charged to whichever method happens to run first).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
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
