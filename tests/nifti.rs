//! NIfTI I/O against nibabel on every real volume, geometry on oblique synthetic volumes, and
//! bad input (truncated, corrupt, lying headers, 4D, unsupported dtypes).
mod common;

use sfr::io::nifti;
use sfr::volume::{AnyVolume, Geometry, Volume};
use std::path::{Path, PathBuf};

fn checksums(v: &AnyVolume) -> (f64, f64) {
    let f: Volume<f64> = v.cast();
    let flat = f.data.as_slice().unwrap(); // standard layout: x fastest
    let sum = flat.iter().sum();
    let wsum = flat.iter().enumerate().map(|(n, x)| x * (n % 1009) as f64).sum();
    (sum, wsum)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0)
}

fn nibabel_json(py: &PathBuf, files: &[PathBuf]) -> Vec<serde_json::Value> {
    let args: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let out = common::run_python(py, "nifti_reference.py", &args);
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn assert_agrees(ours: &AnyVolume, reference: &serde_json::Value, what: &Path) {
    let arr = |k: &str| -> Vec<f64> { reference[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let dims: Vec<usize> = arr("dims").iter().map(|&d| d as usize).collect();
    assert_eq!(ours.dims().to_vec(), dims, "{}", what.display());
    let g = ours.geometry();
    for (name, mine, theirs) in [("spacing", g.spacing.to_vec(), arr("spacing")), ("origin", g.origin.to_vec(), arr("origin")), ("direction", g.direction.to_vec(), arr("direction"))] {
        for (a, b) in mine.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{}: {name} {mine:?} vs nibabel {theirs:?}", what.display());
        }
    }
    let (min, max) = ours.min_max().unwrap();
    assert!(close(min, reference["min"].as_f64().unwrap(), 1e-9), "{}: min", what.display());
    assert!(close(max, reference["max"].as_f64().unwrap(), 1e-9), "{}: max", what.display());
    let (sum, wsum) = checksums(ours);
    assert!(close(sum, reference["sum"].as_f64().unwrap(), 1e-9), "{}: voxel sum {sum} vs {}", what.display(), reference["sum"]);
    assert!(close(wsum, reference["wsum"].as_f64().unwrap(), 1e-9), "{}: weighted voxel sum (layout) differs", what.display());
}

fn all_real_volumes(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![];
    for ds in ["la2018", "hippocampus"] {
        for sub in ["imagesTr", "labelsTr"] {
            let dir = root.join(ds).join(sub);
            let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".nii.gz")).collect();
            v.sort();
            files.extend(v);
        }
    }
    files
}

/// Every volume of ../shared/data: our reader agrees with nibabel; our writer's output, read by
/// nibabel, agrees too (convert keeps voxels bit-exact and geometry within 1e-5).
#[test]
fn every_real_volume_agrees_with_nibabel_read_and_write() {
    let (Some(root), Some(py)) = (common::shared_data(), common::python()) else { return };
    let files = all_real_volumes(&root);
    assert!(files.len() >= 500, "expected the 560 volumes of ../shared/data, found {}", files.len());
    let reference = nibabel_json(&py, &files);
    let out = tempfile::tempdir().unwrap();
    let mut written = vec![];
    let mut ours = vec![];
    for (n, (f, r)) in files.iter().zip(&reference).enumerate() {
        let v = nifti::read(f).unwrap_or_else(|e| panic!("{e}"));
        assert_agrees(&v, r, f);
        // Converting every file would take a minute of gzip; every 7th covers both datasets,
        // images and labels, u8 and f32.
        if n % 7 == 0 {
            let p = out.path().join(format!("{n}.nii.gz"));
            nifti::write_any(&p, &v).unwrap();
            let back = nifti::read(&p).unwrap();
            assert_eq!(back, v, "{}: round trip changed voxels or geometry", f.display());
            written.push(p);
            ours.push(v);
        }
    }
    for ((p, r), v) in written.iter().zip(nibabel_json(&py, &written)).zip(&ours) {
        assert_agrees(v, &r, p);
    }
}

fn oblique_geometry() -> Geometry {
    let (s, c) = (0.6f64, 0.8f64);
    // rotation about z then x, with a flipped third axis (negative qfac)
    let d = [c, -s * c, -s * s, s, c * c, c * s, 0.0, s, -c];
    Geometry { origin: [-100.5, 42.25, 17.0], spacing: [0.8, 1.1, 3.0], direction: d }
}

/// Oblique, anisotropic, left-handed geometry written by us reads back in nibabel with the
/// same LPS geometry, through both the sform and (with sform removed) the qform.
#[test]
fn oblique_geometry_agrees_with_nibabel() {
    let Some(py) = common::python() else { return };
    let g = oblique_geometry();
    g.validate().unwrap();
    let data = ndarray::Array3::from_shape_fn((5, 6, 7), |(k, j, i)| (i * 100 + j * 10 + k) as i16);
    let v = Volume::new(data, g);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("oblique.nii.gz");
    nifti::write(&p, &v).unwrap();
    let r = &nibabel_json(&py, &[p.clone()])[0];
    assert_agrees(&AnyVolume::I16(v.clone()), r, &p);

    // Same file with sform_code = 0 so that readers must use the qform.
    let q = dir.path().join("qform_only.nii");
    let script = format!(
        "import nibabel as nib; i = nib.load('{}'); i.header.set_sform(None, code=0); nib.save(nib.Nifti1Image(i.get_fdata().astype('int16'), None, i.header), '{}')",
        p.display(),
        q.display()
    );
    let st = std::process::Command::new(&py).args(["-c", &script]).status().unwrap();
    assert!(st.success());
    let back = nifti::read(&q).unwrap();
    assert!(back.geometry().max_abs_diff(&g) < 1e-5, "qform path: {:?} vs {:?}", back.geometry(), g);
    let r = &nibabel_json(&py, &[q.clone()])[0];
    assert_agrees(&back, r, &q);
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn valid_nii_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.nii");
    let v = Volume::new(ndarray::Array3::<f32>::from_elem((4, 5, 6), 1.5), Geometry::default());
    nifti::write(&p, &v).unwrap();
    std::fs::read(&p).unwrap()
}

fn expect_err(p: &Path, needle: &str) {
    let e = nifti::read(p).expect_err("must fail").to_string();
    assert!(e.contains(p.file_name().unwrap().to_str().unwrap()), "error does not name the file: {e}");
    assert!(e.to_lowercase().contains(needle), "error '{e}' does not mention '{needle}'");
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_nii_bytes();
    assert!(nifti::read(write_bytes(dir.path(), "good.nii", &good)).is_ok());

    expect_err(&dir.path().join("missing.nii.gz"), "no such file");
    expect_err(&write_bytes(dir.path(), "empty.nii", &[]), "not a nifti");
    expect_err(&write_bytes(dir.path(), "short.nii", &good[..200]), "not a nifti");
    expect_err(&write_bytes(dir.path(), "truncated.nii", &good[..good.len() - 10]), "truncated");

    let mut magic = good.clone();
    magic[344..348].copy_from_slice(b"xyz\0");
    expect_err(&write_bytes(dir.path(), "magic.nii", &magic), "magic");

    let mut pair = good.clone();
    pair[344..348].copy_from_slice(b"ni1\0");
    expect_err(&write_bytes(dir.path(), "pair.nii", &pair), ".hdr/.img");

    // dim[4] = 3: a 4D file
    let mut four = good.clone();
    four[40..42].copy_from_slice(&4i16.to_le_bytes());
    four[48..50].copy_from_slice(&3i16.to_le_bytes());
    expect_err(&write_bytes(dir.path(), "fourd.nii", &four), "4d");

    // dims of 0
    let mut zero = good.clone();
    zero[44..46].copy_from_slice(&0i16.to_le_bytes());
    expect_err(&write_bytes(dir.path(), "zero.nii", &zero), "dimension is 0");

    // a header that claims 1000^3 f32 voxels (4 GB, within the limits): must fail fast without allocating it
    let mut lying = good.clone();
    for off in [42, 44, 46] {
        lying[off..off + 2].copy_from_slice(&1000i16.to_le_bytes());
    }
    expect_err(&write_bytes(dir.path(), "lying.nii", &lying), "truncated");
    // and 32767^3 voxels is refused from the header alone
    for off in [42, 44, 46] {
        lying[off..off + 2].copy_from_slice(&i16::MAX.to_le_bytes());
    }
    expect_err(&write_bytes(dir.path(), "absurd.nii", &lying), "beyond any supported size");

    // datatype complex64 (32)
    let mut cplx = good.clone();
    cplx[70..72].copy_from_slice(&32i16.to_le_bytes());
    cplx[72..74].copy_from_slice(&64i16.to_le_bytes());
    expect_err(&write_bytes(dir.path(), "complex.nii", &cplx), "unsupported");

    // gzip stream cut in the middle
    let gz_path = dir.path().join("g.nii.gz");
    nifti::write(&gz_path, &Volume::new(ndarray::Array3::<f32>::from_shape_fn((20, 20, 20), |(k, j, i)| (i * j + k) as f32), Geometry::default())).unwrap();
    let gz = std::fs::read(&gz_path).unwrap();
    expect_err(&write_bytes(dir.path(), "cut.nii.gz", &gz[..gz.len() / 2]), "truncated");
    let mut garbage = gz.clone();
    for b in garbage.iter_mut().skip(30).take(200) {
        *b ^= 0x5a;
    }
    expect_err(&write_bytes(dir.path(), "garbage.nii.gz", &garbage), "corrupt");
}

#[test]
fn failed_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let v = Volume::new(ndarray::Array3::<u8>::zeros((2, 2, 2)), Geometry { spacing: [1.0, -1.0, 1.0], ..Geometry::default() });
    let p = dir.path().join("bad.nii.gz");
    assert!(nifti::write(&p, &v).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
