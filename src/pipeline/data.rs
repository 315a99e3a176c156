//! Training data: loading and checking cases, intensity normalisation, patch sampling
//! and augmentation (3D rot90/flip, random crop, Bezier intensity curve).
//!
//! Arrays are `[nz, ny, nx]` (x fastest), patches `[pz, py, px]`.
use crate::error::{Error, Result};
use crate::io::dataset::Case;
use crate::io::nifti;
use crate::volume::{resize_linear, Geometry, Volume, Voxel};
use ndarray::{s, Array3, ArrayView3, Axis};
use rand::RngExt;
use std::borrow::Cow;
use std::sync::Arc;

pub type Rng = rand_chacha::ChaCha8Rng;

/// A loaded case: image (normalised by `load_source`; as read by `load_source_raw`, until
/// training normalises it), optional label, and the image's geometry.
#[derive(Clone, Debug)]
pub struct Sample {
    pub id: String,
    pub image: Array3<f32>,
    pub label: Option<Array3<u8>>,
    pub geometry: Geometry,
}

// The z-score belongs to the volume layer (the model file's inference uses it too).
pub use crate::volume::zscore;

/// Checks a label volume: integral values in `0..num_classes`, returned as u8. Generic over the
/// voxel type as given, so a label is never widened first (as f64, a 512²×300 label took 629 MB
/// instead of 79 MB).
pub fn check_label<T: Voxel>(label: &Volume<T>, num_classes: usize, what: &str) -> Result<Array3<u8>> {
    check_label_values(label, num_classes, what)?;
    Ok(label.data.mapv(|v| v.to_f64() as u8))
}

/// [`check_label`] without making the u8 copy (for a label that is u8 already, or that is
/// converted afterwards).
pub fn check_label_values<T: Voxel>(label: &Volume<T>, num_classes: usize, what: &str) -> Result<()> {
    let n = num_classes as f64;
    let bad = label.data.iter().map(|v| v.to_f64()).find(|v| v.fract() != 0.0 || *v < 0.0 || *v >= n);
    if let Some(v) = bad {
        return Err(Error::invalid(format!(
            "{what}: label value {v} is outside the declared classes 0..{} (dataset.json labels)",
            num_classes - 1
        )));
    }
    Ok(())
}

/// A case as the pipeline receives it: files on disk (CLI), or volumes in memory (C ABI,
/// Slicer). Labels of unlabelled cases are simply absent.
///
/// In-memory volumes are shared (`Arc`), never copied, by every clone of the source: a job
/// started from a dataset trains on the dataset's own voxels (volumes are immutable once
/// added), and the dataset may still be freed while the job runs.
#[derive(Clone, Debug)]
pub enum CaseSource {
    Files(Case),
    Memory { id: String, image: Arc<Volume<f32>>, label: Option<Arc<Volume<u8>>> },
}

/// Classes are stored as u8 ([`Sample::label`]): a label value outside 0..=255 can never be a
/// class.
const MAX_LABEL_CLASSES: usize = 256;

impl CaseSource {
    /// An in-memory case (the label already checked, or checked by `load_source`).
    pub fn memory(id: impl Into<String>, image: Volume<f32>, label: Option<Volume<u8>>) -> CaseSource {
        CaseSource::Memory { id: id.into(), image: Arc::new(image), label: label.map(Arc::new) }
    }
    pub fn id(&self) -> &str {
        match self {
            CaseSource::Files(c) => &c.id,
            CaseSource::Memory { id, .. } => id,
        }
    }
    pub fn has_label(&self) -> bool {
        match self {
            CaseSource::Files(c) => c.label.is_some(),
            CaseSource::Memory { label, .. } => label.is_some(),
        }
    }
    /// The same case with its label dropped, so nothing downstream can read it.
    pub fn without_label(&self) -> CaseSource {
        match self {
            CaseSource::Files(c) => CaseSource::Files(Case { label: None, ..c.clone() }),
            CaseSource::Memory { id, image, .. } => CaseSource::Memory { id: id.clone(), image: image.clone(), label: None },
        }
    }
    /// How messages name the case's image.
    pub fn image_name(&self) -> String {
        match self {
            CaseSource::Files(c) => c.image.display().to_string(),
            CaseSource::Memory { id, .. } => format!("case {id} (image)"),
        }
    }

    /// The image and label (label values checked to be integers in 0..=255, not yet against
    /// the classes), and names for messages. In-memory volumes are borrowed, not copied.
    #[allow(clippy::type_complexity)]
    pub fn read(&self) -> Result<(Cow<'_, Volume<f32>>, Option<Cow<'_, Volume<u8>>>, String, String)> {
        match self {
            CaseSource::Files(c) => {
                let img = nifti::read(&c.image)?;
                let lname = c.label.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                let lab = c.label.as_deref().map(read_label_file).transpose()?.map(Cow::Owned);
                Ok((Cow::Owned(img.cast::<f32>()), lab, self.image_name(), lname))
            }
            CaseSource::Memory { id, image, label } => {
                Ok((Cow::Borrowed(&**image), label.as_deref().map(Cow::Borrowed), self.image_name(), format!("case {id} (label)")))
            }
        }
    }
}

/// Loads a case: image (z-scored) and, when the case has one, its label, which must have the
/// image's shape and geometry and only declared classes.
pub fn load_source(src: &CaseSource, num_classes: usize) -> Result<Sample> {
    let mut s = load_source_raw(src, num_classes)?;
    crate::volume::Normalization::ZscorePerVolume.apply_in_place(&mut s.image, &src.image_name())?;
    Ok(s)
}

/// [`load_source`] with the image's intensities as they are, for a normalisation that needs
/// every case first (`volume::Normalization::ct_from_foreground`).
pub fn load_source_raw(src: &CaseSource, num_classes: usize) -> Result<Sample> {
    let (img, lab, iname, lname) = src.read()?;
    let geometry = img.geometry;
    // A file's image moves in; an in-memory one is copied (to be normalised in place).
    let image = img.into_owned().data;
    let label = match lab {
        None => None,
        Some(lab) => {
            check_label_fits(&lab, image.shape(), &geometry, num_classes, &lname, &iname)?;
            // A file's label moves in; an in-memory one is copied (u8: 1 byte per voxel).
            let l = lab.into_owned().data;
            if l.iter().all(|&v| v == 0) {
                log::warn!("{lname}: the label is empty (background only)");
            }
            Some(l)
        }
    };
    Ok(Sample { id: src.id().to_string(), image, label, geometry })
}

impl Sample {
    /// Voxels (i, j, k).
    pub fn dims(&self) -> [usize; 3] {
        let s = self.image.shape();
        [s[2], s[1], s[0]]
    }

    /// The sample on the grid of the same field of view at `spacing` (mm, x y z); itself when
    /// that grid has the same voxels. The image is resampled trilinearly; the label class by
    /// class — each class's indicator trilinearly, the largest wins, ties to the later class —
    /// so that a thin structure is kept where nearest-neighbour sampling could skip it.
    pub fn at_spacing(self, spacing: [f64; 3], num_classes: usize) -> Sample {
        let dims = self.dims();
        let to = self.geometry.dims_at_spacing(dims, spacing);
        if to == dims {
            return self;
        }
        let zyx = [to[2], to[1], to[0]];
        let image = resize_linear(&self.image.view(), zyx);
        let label = self.label.map(|l| {
            let mut best = Array3::<f32>::from_elem(zyx, f32::NEG_INFINITY);
            let mut out = Array3::<u8>::zeros(zyx);
            for c in 0..num_classes.max(1) {
                let indicator = l.mapv(|v| if v as usize == c { 1.0f32 } else { 0.0 });
                let r = resize_linear(&indicator.view(), zyx);
                // A tie goes to the later class: a structure half inside a voxel keeps it
                // rather than losing it to the background.
                ndarray::Zip::from(&mut out).and(&mut best).and(&r).for_each(|o, b, &x| {
                    if x >= *b {
                        *b = x;
                        *o = c as u8;
                    }
                });
            }
            out
        });
        Sample { id: self.id, image, label, geometry: self.geometry.resized(dims, to) }
    }
}

/// A label must have its image's shape and geometry (within 1e-3 of the largest spacing) and
/// only declared classes.
fn check_label_fits(lab: &Volume<u8>, shape: &[usize], geometry: &Geometry, num_classes: usize, lname: &str, iname: &str) -> Result<()> {
    if lab.data.shape() != shape {
        // Said in ITK's i, j, k order, as `Volume::dims`.
        return Err(Error::invalid(format!("{lname}: label dims {:?} differ from image dims {:?} ({iname})", lab.dims(), [shape[2], shape[1], shape[0]])));
    }
    let tol = 1e-3 * geometry.spacing.iter().cloned().fold(1.0, f64::max);
    if lab.geometry.max_abs_diff(geometry) > tol {
        return Err(Error::invalid(format!("{lname}: label geometry {:?} differs from the image's {:?}", lab.geometry, geometry)));
    }
    check_label_values(lab, num_classes, lname)
}

/// The pseudo-label file of an unlabelled case in a folder written by `--write-pseudo-labels`
/// (or by any other tool): `<id>_pseudo.nii.gz`, checked like a label against the case's image.
pub fn pseudo_label_path(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    dir.join(format!("{id}_pseudo.nii.gz"))
}

/// Reads the pseudo-label of `sample` (an unlabelled case) from `dir`.
pub fn read_pseudo_label(dir: &std::path::Path, sample: &Sample, num_classes: usize) -> Result<Array3<u8>> {
    let path = pseudo_label_path(dir, &sample.id);
    if !path.is_file() {
        return Err(Error::invalid(format!(
            "{}: no pseudo-label for the unlabelled case {} (the folder must hold <id>_pseudo.nii.gz for every unlabelled case, as --write-pseudo-labels writes them)",
            path.display(),
            sample.id
        )));
    }
    let lab = read_label_file(&path)?;
    check_label_fits(&lab, sample.image.shape(), &sample.geometry, num_classes, &path.display().to_string(), &format!("the image of case {}", sample.id))?;
    Ok(lab.data)
}

/// A label file: values checked in the file's own voxel type to be integers in 0..=255, then
/// narrowed to u8 (not yet checked against the classes).
fn read_label_file(path: &std::path::Path) -> Result<Volume<u8>> {
    let any = nifti::read(path)?;
    crate::with_volume!(&any, v => check_label_values(v, MAX_LABEL_CLASSES, &path.display().to_string()))?;
    Ok(any.cast::<u8>())
}

/// Pads `a` (centred, with `value`) so that every axis is at least `min`.
pub fn pad_to_min<T: Copy>(a: &ArrayView3<T>, min: [usize; 3], value: T) -> Array3<T> {
    let sh = a.shape();
    let new = [sh[0].max(min[0]), sh[1].max(min[1]), sh[2].max(min[2])];
    if new == [sh[0], sh[1], sh[2]] {
        return a.to_owned();
    }
    let b = [(new[0] - sh[0]) / 2, (new[1] - sh[1]) / 2, (new[2] - sh[2]) / 2];
    let mut out = Array3::from_elem((new[0], new[1], new[2]), value);
    out.slice_mut(s![b[0]..b[0] + sh[0], b[1]..b[1] + sh[1], b[2]..b[2] + sh[2]]).assign(a);
    out
}

/// Where a random crop of `patch` starts in an array of `shape` (≥ patch on every axis).
pub fn random_corner(rng: &mut Rng, shape: &[usize], patch: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| rng.random_range(0..=shape[a] - patch[a]))
}

/// Random crop of an image and any label maps aligned with it (label, pseudo-labels), padding
/// first when the volume is smaller than the patch (image with 0 = the mean after z-scoring,
/// labels with background).
pub fn random_crop(rng: &mut Rng, image: &ArrayView3<f32>, labels: &[&ArrayView3<u8>], patch: [usize; 3]) -> (Array3<f32>, Vec<Array3<u8>>) {
    let img = pad_to_min(image, patch, 0.0);
    let c = random_corner(rng, img.shape(), patch);
    let sl = s![c[0]..c[0] + patch[0], c[1]..c[1] + patch[1], c[2]..c[2] + patch[2]];
    let labs = labels.iter().map(|l| pad_to_min(l, patch, 0u8).slice(sl).to_owned()).collect();
    (img.slice(sl).to_owned(), labs)
}

/// Random rot90 in the axial (y, x) plane — only when the patch is square there, so the shape
/// is kept — and a random flip along y or x, the same for the image and its label maps
/// (UA-MT's RandomRotFlip, in our axis order).
pub fn random_rot_flip(rng: &mut Rng, image: &mut Array3<f32>, labels: &mut [Array3<u8>]) {
    let square = image.shape()[1] == image.shape()[2];
    let k = if square { rng.random_range(0..4usize) } else { 2 * rng.random_range(0..2usize) };
    let flip_axis = 1 + rng.random_range(0..2usize);
    fn apply<T: Clone>(a: &Array3<T>, k: usize, flip_axis: usize) -> Array3<T> {
        let mut v = a.view();
        for _ in 0..k {
            // rot90 in (y, x): transpose the plane, then flip the new y axis
            v.swap_axes(1, 2);
            v.invert_axis(Axis(1));
        }
        v.invert_axis(Axis(flip_axis));
        v.as_standard_layout().into_owned()
    }
    *image = apply(image, k, flip_axis);
    for l in labels.iter_mut() {
        *l = apply(l, k, flip_axis);
    }
}

/// Random monotone Bezier intensity curve (Models Genesis' non-linear transformation): the
/// patch is mapped to [0, 1], passed through a cubic Bezier curve with random inner control
/// points (reversed half of the time), and mapped back to its range.
pub fn random_bezier(rng: &mut Rng, image: &mut Array3<f32>) {
    let (lo, hi) = image.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if hi <= lo {
        return;
    }
    let p1 = [rng.random::<f64>(), rng.random::<f64>()];
    let p2 = [rng.random::<f64>(), rng.random::<f64>()];
    let pts = [[0.0, 0.0], p1, p2, [1.0, 1.0]];
    const N: usize = 1000;
    let mut xs = Vec::with_capacity(N);
    let mut ys = Vec::with_capacity(N);
    for t in 0..N {
        let t = t as f64 / (N - 1) as f64;
        let b = [(1.0 - t).powi(3), 3.0 * t * (1.0 - t).powi(2), 3.0 * t * t * (1.0 - t), t.powi(3)];
        xs.push((0..4).map(|i| b[i] * pts[i][0]).sum::<f64>());
        ys.push((0..4).map(|i| b[i] * pts[i][1]).sum::<f64>());
    }
    if rng.random::<f64>() < 0.5 {
        ys.reverse(); // decreasing curve, as Models Genesis does half of the time
    }
    // x(t) need not be monotone for random control points: interpolate on the sorted pairs.
    let mut pairs: Vec<(f64, f64)> = xs.into_iter().zip(ys).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let range = (hi - lo) as f64;
    image.mapv_inplace(|v| {
        let x = (v - lo) as f64 / range;
        let i = pairs.partition_point(|p| p.0 < x);
        let y = if i == 0 {
            pairs[0].1
        } else if i >= pairs.len() {
            pairs[pairs.len() - 1].1
        } else {
            let (a, b) = (pairs[i - 1], pairs[i]);
            if b.0 > a.0 {
                a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0)
            } else {
                a.1
            }
        };
        (lo as f64 + y * range) as f32
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn labels_outside_classes_are_errors() {
        let v = Volume::new(Array3::from_shape_vec((1, 1, 3), vec![0.0, 1.0, 3.0]).unwrap(), Geometry::default());
        assert!(check_label(&v, 3, "lab").unwrap_err().to_string().contains("label value 3"));
        let v = Volume::new(Array3::from_shape_vec((1, 1, 2), vec![0.0, 1.5]).unwrap(), Geometry::default());
        assert!(check_label(&v, 3, "lab").is_err());
        let v = Volume::new(Array3::from_shape_vec((1, 1, 2), vec![0.0, 2.0]).unwrap(), Geometry::default());
        assert_eq!(check_label(&v, 3, "lab").unwrap().as_slice().unwrap(), &[0, 2]);
    }

    #[test]
    fn labels_are_checked_in_their_own_type() {
        // A u16 300 is reported as 300, not as the 255 or 44 a narrowing would make of it.
        let v = Volume::new(Array3::from_shape_vec((1, 1, 2), vec![0u16, 300]).unwrap(), Geometry::default());
        assert!(check_label(&v, 3, "lab").unwrap_err().to_string().contains("label value 300"));
        let v = Volume::new(Array3::from_shape_vec((1, 1, 2), vec![-1i16, 1]).unwrap(), Geometry::default());
        assert!(check_label_values(&v, 3, "lab").unwrap_err().to_string().contains("label value -1"));
        let v = Volume::new(Array3::from_shape_vec((1, 1, 3), vec![0u8, 2, 1]).unwrap(), Geometry::default());
        assert!(check_label_values(&v, 3, "lab").is_ok());
    }

    #[test]
    fn in_memory_cases_share_their_voxels() {
        let img = Volume::new(Array3::from_elem((2, 3, 4), 1.5f32), Geometry::default());
        let lab = Volume::new(Array3::from_elem((2, 3, 4), 1u8), Geometry::default());
        let a = CaseSource::memory("a", img, Some(lab));
        let b = a.clone();
        let c = a.without_label();
        match (&a, &b, &c) {
            (CaseSource::Memory { image: ia, label: Some(la), .. }, CaseSource::Memory { image: ib, label: Some(lb), .. }, CaseSource::Memory { image: ic, label: None, .. }) => {
                assert!(Arc::ptr_eq(ia, ib) && Arc::ptr_eq(ia, ic) && Arc::ptr_eq(la, lb), "a clone copied the voxels");
            }
            _ => panic!("not in-memory cases"),
        }
        let (img, lab, _, _) = a.read().unwrap();
        assert!(matches!(img, Cow::Borrowed(_)) && matches!(lab, Some(Cow::Borrowed(_))), "read() copied an in-memory case");
        let s = load_source(&b, 2).unwrap();
        assert_eq!(s.label.unwrap().sum(), 24);
        assert!(load_source(&b, 1).unwrap_err().to_string().contains("label value 1"));
    }

    #[test]
    fn crops_pad_and_keep_image_label_aligned() {
        let mut rng = Rng::seed_from_u64(1);
        let img = Array3::from_shape_fn((3, 5, 6), |(k, j, i)| (k * 100 + j * 10 + i) as f32);
        let lab = img.mapv(|v| (v as u32 % 7) as u8);
        for _ in 0..20 {
            let (ci, cl) = random_crop(&mut rng, &img.view(), &[&lab.view()], [4, 4, 4]);
            assert_eq!(ci.shape(), &[4, 4, 4]);
            let cl = &cl[0];
            for ((k, j, i), &v) in ci.indexed_iter() {
                // padding voxels are 0 in the image and 0 in the label; others keep the pairing
                assert_eq!(cl[[k, j, i]], (v as u32 % 7) as u8);
            }
        }
    }

    #[test]
    fn a_sample_at_another_spacing_keeps_its_field_of_view_and_thin_classes() {
        // 2 mm along z: a one-voxel-thick class-2 sheet at z = 5 and a class-1 block.
        let mut label = Array3::<u8>::zeros((10, 8, 8));
        label.slice_mut(s![2..8, 2..6, 2..6]).fill(1);
        label.slice_mut(s![5, .., ..]).fill(2);
        let image = label.mapv(|v| v as f32);
        let geometry = Geometry { origin: [0.0; 3], spacing: [1.0, 1.0, 2.0], direction: crate::volume::IDENTITY3 };
        let s0 = Sample { id: "c".into(), image, label: Some(label), geometry };
        let r = s0.clone().at_spacing([1.0, 1.0, 1.0], 3);
        assert_eq!(r.dims(), [8, 8, 20]);
        assert_eq!(r.geometry.spacing, [1.0, 1.0, 1.0]);
        // The first voxel's outer face stays where it was: z = -1 mm (2 mm voxel) = -0.5 mm - 0.5.
        assert!((r.geometry.origin[2] - -0.5).abs() < 1e-12, "{:?}", r.geometry.origin);
        let l = r.label.as_ref().unwrap();
        // Each class keeps its volume in mm³ (2 mm slices become two 1 mm slices).
        for c in 0..3u8 {
            let before = s0.label.as_ref().unwrap().iter().filter(|&&v| v == c).count() * 2;
            let after = l.iter().filter(|&&v| v == c).count();
            assert_eq!(before, after, "class {c}");
        }
        // Same spacing: the very same sample.
        let same = s0.clone().at_spacing([1.0, 1.0, 2.0], 3);
        assert_eq!(same.image, s0.image);
        // Down to 4 mm: the 2 mm sheet (1 voxel) still shows as class 2 somewhere.
        let coarse = s0.at_spacing([1.0, 1.0, 4.0], 3);
        assert_eq!(coarse.dims(), [8, 8, 5]);
        assert!(coarse.label.unwrap().iter().any(|&v| v == 2));
    }

    #[test]
    fn rot_flip_keeps_pairing_and_values() {
        let mut rng = Rng::seed_from_u64(3);
        let img = Array3::from_shape_fn((2, 4, 4), |(k, j, i)| (k * 16 + j * 4 + i) as f32);
        for _ in 0..10 {
            let mut a = img.clone();
            let mut l = [img.mapv(|v| v as u8)];
            random_rot_flip(&mut rng, &mut a, &mut l);
            assert_eq!(a.mapv(|v| v as u8), l[0]);
            let mut sorted: Vec<f32> = a.iter().cloned().collect();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, (0..32).map(|v| v as f32).collect::<Vec<_>>());
            // slices stay slices: z is never mixed with y/x
            for k in 0..2 {
                assert!(a.index_axis(Axis(0), k).iter().all(|&v| (v as usize) / 16 == k));
            }
        }
    }

    #[test]
    fn bezier_keeps_range() {
        let mut rng = Rng::seed_from_u64(5);
        let mut a = Array3::from_shape_fn((2, 3, 4), |(k, j, i)| (k * 12 + j * 4 + i) as f32 - 5.0);
        let (lo, hi) = (-5.0f32, 18.0f32);
        random_bezier(&mut rng, &mut a);
        assert!(a.iter().all(|&v| v >= lo - 1e-4 && v <= hi + 1e-4));
    }
}
