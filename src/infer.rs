//! Sliding-window inference: class probabilities of a whole volume from a network that sees
//! fixed-size patches. Windows overlap (stride < patch), their softmax outputs are averaged
//! (uniformly, or with nnU-Net's Gaussian importance weights so that window borders count
//! less), and windows are batched. A volume smaller than the patch is zero-padded (the images
//! are z-scored, so 0 is the mean intensity) and the padding is cropped away again.
//!
//! Shapes are ndarray/tch order: a volume `[nz, ny, nx]`, a patch `[pz, py, px]`.
use crate::error::{Error, Result};
use crate::job::Reporter;
use ndarray::{s, Array3, Array4, ArrayView3};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    Mean,
    Gaussian,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlidingWindow {
    /// Patch size [pz, py, px].
    pub patch: [usize; 3],
    /// Step between windows [sz, sy, sx]; ≤ patch.
    pub stride: [usize; 3],
    pub weighting: Weighting,
    /// Windows per forward pass.
    pub batch: usize,
}

/// The inference section of a training run's config (`"inference"`), kept in the model file:
/// the sliding window's step, weighting and batch; the patch comes from the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Window step `[x, y, z]`.
    pub stride: [usize; 3],
    pub weighting: Weighting,
    pub batch: usize,
}

/// Start positions along one axis of length `n` (≥ `p`): every `stride`, plus a last window
/// flush with the end so that every voxel is covered.
fn starts(n: usize, p: usize, stride: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..=n - p).step_by(stride.max(1)).collect();
    if *v.last().unwrap() != n - p {
        v.push(n - p);
    }
    v
}

/// Windows a sliding window visits over a volume `[z, y, x]` (an axis shorter than the patch
/// is padded to it: one window along it).
pub fn window_count(volume: [usize; 3], patch: [usize; 3], stride: [usize; 3]) -> usize {
    (0..3).map(|a| starts(volume[a].max(patch[a]), patch[a], stride[a]).len()).product()
}

/// nnU-Net's Gaussian importance map: sigma = patch/8 per axis, normalised to max 1, with a
/// floor so that no voxel gets zero weight.
fn gaussian(patch: [usize; 3]) -> Array3<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let c = (n as f64 - 1.0) / 2.0;
        let sigma = n as f64 / 8.0;
        (0..n).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp()).collect()
    };
    let (z, y, x) = (axis(patch[0]), axis(patch[1]), axis(patch[2]));
    let mut g = Array3::from_shape_fn((patch[0], patch[1], patch[2]), |(k, j, i)| (z[k] * y[j] * x[i]) as f32);
    let max = g.iter().cloned().fold(0f32, f32::max);
    let floor = g.iter().cloned().filter(|&v| v > 0.0).fold(f32::MAX, f32::min) / max;
    g.mapv_inplace(|v| (v / max).max(floor));
    g
}

impl SlidingWindow {
    pub fn validate(&self) -> Result<()> {
        if self.patch.contains(&0) || self.stride.contains(&0) || self.batch == 0 {
            return Err(Error::invalid(format!("sliding window: patch {:?}, stride {:?} and batch must be positive", self.patch, self.stride)));
        }
        if self.stride.iter().zip(&self.patch).any(|(s, p)| s > p) {
            return Err(Error::invalid(format!("sliding window: stride {:?} larger than patch {:?} leaves gaps", self.stride, self.patch)));
        }
        Ok(())
    }

    /// Class probabilities [C, nz, ny, nx] of `image` [nz, ny, nx] (already normalised).
    /// `predict` maps a batch [B, 1, pz, py, px] to logits [B, C, pz, py, px].
    pub fn run(
        &self,
        image: &ArrayView3<f32>,
        device: Device,
        reporter: Option<&Reporter>,
        mut predict: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Array4<f32>> {
        self.validate()?;
        let shape = [image.shape()[0], image.shape()[1], image.shape()[2]];
        if shape.contains(&0) {
            return Err(Error::invalid("cannot segment an empty volume"));
        }
        // Pad (centred) to at least the patch size; a volume that holds a whole patch is used
        // as it is (no copy: a CT volume is hundreds of megabytes).
        let padded_shape: Vec<usize> = (0..3).map(|a| shape[a].max(self.patch[a])).collect();
        let before: Vec<usize> = (0..3).map(|a| (padded_shape[a] - shape[a]) / 2).collect();
        let needs_pad = padded_shape[..] != shape[..];
        let padded_owned = needs_pad.then(|| {
            let mut padded = Array3::<f32>::zeros((padded_shape[0], padded_shape[1], padded_shape[2]));
            padded
                .slice_mut(s![before[0]..before[0] + shape[0], before[1]..before[1] + shape[1], before[2]..before[2] + shape[2]])
                .assign(image);
            padded
        });
        let padded = match &padded_owned {
            Some(p) => p.view(),
            None => image.view(),
        };

        let sz = starts(padded_shape[0], self.patch[0], self.stride[0]);
        let sy = starts(padded_shape[1], self.patch[1], self.stride[1]);
        let sx = starts(padded_shape[2], self.patch[2], self.stride[2]);
        let mut windows = Vec::with_capacity(sz.len() * sy.len() * sx.len());
        for &z in &sz {
            for &y in &sy {
                for &x in &sx {
                    windows.push([z, y, x]);
                }
            }
        }
        let weight = match self.weighting {
            Weighting::Mean => Array3::<f32>::ones((self.patch[0], self.patch[1], self.patch[2])),
            Weighting::Gaussian => gaussian(self.patch),
        };
        let weight_t = Tensor::from_slice(weight.as_slice().unwrap())
            .view([1, 1, self.patch[0] as i64, self.patch[1] as i64, self.patch[2] as i64])
            .to_device(device);
        let [pz, py, px] = self.patch;
        let mut acc: Option<Array4<f32>> = None;
        let mut norm = Array3::<f32>::zeros(padded.raw_dim());
        if let Some(r) = reporter {
            r.stage("segment", windows.len() as u64, &format!("{} windows of {:?}", windows.len(), self.patch))?;
        }
        let mut done = 0u64;
        crate::threads::fixed_for_inference();
        let mut buf: Vec<f32> = Vec::with_capacity(self.batch.min(windows.len()) * pz * py * px);
        let mut host: Vec<f32> = Vec::new();
        for chunk in windows.chunks(self.batch) {
            buf.clear();
            for w in chunk {
                let v = padded.slice(s![w[0]..w[0] + pz, w[1]..w[1] + py, w[2]..w[2] + px]);
                buf.extend(v.iter());
            }
            let input = Tensor::from_slice(&buf).view([chunk.len() as i64, 1, pz as i64, py as i64, px as i64]).to_device(device);
            let probs = tch::no_grad(|| -> Result<Tensor> {
                let logits = predict(&input)?;
                Ok((logits.softmax(1, Kind::Float) * &weight_t).to_device(Device::Cpu).contiguous())
            })?;
            let c = probs.size()[1] as usize;
            let acc = acc.get_or_insert_with(|| Array4::zeros((c, padded_shape[0], padded_shape[1], padded_shape[2])));
            let n = probs.numel();
            host.resize(n, 0.0);
            probs.copy_data(&mut host, n);
            drop(probs);
            let win = ndarray::ArrayView4::from_shape((chunk.len() * c, pz, py, px), &host[..]).map_err(|e| Error::invalid(e.to_string()))?;
            for (b, w) in chunk.iter().enumerate() {
                // Classes are disjoint slabs of the accumulator: added in parallel.
                acc.outer_iter_mut().into_par_iter().enumerate().for_each(|(ci, mut class)| {
                    let mut dst = class.slice_mut(s![w[0]..w[0] + pz, w[1]..w[1] + py, w[2]..w[2] + px]);
                    dst += &win.slice(s![b * c + ci, .., .., ..]);
                });
                let mut nd = norm.slice_mut(s![w[0]..w[0] + pz, w[1]..w[1] + py, w[2]..w[2] + px]);
                nd += &weight;
            }
            done += chunk.len() as u64;
            if let Some(r) = reporter {
                r.step(done, f64::NAN)?;
            }
        }
        drop((buf, host));
        let mut acc = acc.expect("at least one window");
        acc.outer_iter_mut().into_par_iter().for_each(|mut class| {
            ndarray::Zip::from(&mut class).and(&norm).par_for_each(|v, &w| *v /= w);
        });
        if !needs_pad {
            return Ok(acc);
        }
        Ok(acc
            .slice(s![.., before[0]..before[0] + shape[0], before[1]..before[1] + shape[1], before[2]..before[2] + shape[2]])
            .to_owned())
    }
}

/// Per-voxel argmax over classes of probabilities [C, nz, ny, nx].
/// Ties go to the lower class. Runs over z-slices in parallel.
pub fn argmax(probs: &Array4<f32>) -> Array3<u8> {
    let (c, z, y, x) = probs.dim();
    let mut labels = Array3::<u8>::zeros((z, y, x));
    labels.outer_iter_mut().into_par_iter().enumerate().for_each(|(k, mut slice)| {
        let mut best = probs.slice(s![0, k, .., ..]).to_owned();
        for ci in 1..c {
            ndarray::Zip::from(&mut slice).and(&mut best).and(probs.slice(s![ci, k, .., ..])).for_each(|l, b, &v| {
                if v > *b {
                    *b = v;
                    *l = ci as u8;
                }
            });
        }
    });
    labels
}

/// Keeps, of the voxels where `mask` is true, only its largest face-connected (6-neighbour)
/// component, as nnU-Net's "remove all but the largest component" does. Ties go to the
/// component met first in memory order. Returns how many voxels were removed.
pub fn keep_largest_component(mask: &mut Array3<bool>) -> usize {
    let (nz, ny, nx) = mask.dim();
    let flat = mask.as_slice_mut().expect("an owned Array3 is contiguous");
    // Component id per voxel (0 = outside the mask); ids start at 1.
    let mut id = vec![0u32; flat.len()];
    let mut sizes: Vec<usize> = vec![0];
    let mut stack = Vec::new();
    for start in 0..flat.len() {
        if !flat[start] || id[start] != 0 {
            continue;
        }
        let c = sizes.len() as u32;
        let mut size = 0;
        id[start] = c;
        stack.push(start);
        while let Some(v) = stack.pop() {
            size += 1;
            let (k, j, i) = (v / (ny * nx), v / nx % ny, v % nx);
            let mut visit = |n: usize| {
                if flat[n] && id[n] == 0 {
                    id[n] = c;
                    stack.push(n);
                }
            };
            if i > 0 { visit(v - 1); }
            if i + 1 < nx { visit(v + 1); }
            if j > 0 { visit(v - nx); }
            if j + 1 < ny { visit(v + nx); }
            if k > 0 { visit(v - ny * nx); }
            if k + 1 < nz { visit(v + ny * nx); }
        }
        sizes.push(size);
    }
    let Some(largest) = (1..sizes.len()).max_by_key(|&c| (sizes[c], std::cmp::Reverse(c))) else {
        return 0;
    };
    let mut removed = 0;
    for (m, &c) in flat.iter_mut().zip(&id) {
        if c != 0 && c as usize != largest {
            *m = false;
            removed += 1;
        }
    }
    removed
}

/// Label post-processing for structures that are one connected piece (the hippocampus, the
/// left atrium): first only the largest component of the foreground as a whole is kept, then of
/// each foreground class only its largest component; removed voxels become background.
/// Returns how many voxels were removed.
pub fn keep_largest_components(label: &mut Array3<u8>, num_classes: usize) -> usize {
    let mut removed = 0;
    let mut fg = label.mapv(|l| l != 0);
    removed += keep_largest_component(&mut fg);
    ndarray::Zip::from(&mut *label).and(&fg).for_each(|l, &f| if !f { *l = 0 });
    for c in 1..num_classes.min(256) {
        let mut m = label.mapv(|l| l as usize == c);
        removed += keep_largest_component(&mut m);
        ndarray::Zip::from(&mut *label).and(&m).for_each(|l, &keep| if *l as usize == c && !keep { *l = 0 });
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_cover_everything() {
        assert_eq!(window_count([32, 53, 74], [40, 48, 32], [20, 24, 16]), 1 * 2 * 4);
        assert_eq!(starts(10, 4, 3), vec![0, 3, 6]);
        assert_eq!(starts(11, 4, 3), vec![0, 3, 6, 7]);
        assert_eq!(starts(4, 4, 2), vec![0]);
    }

    /// A "network" that outputs logits from the voxel values themselves must give, after
    /// windowing, padding and averaging, exactly the per-voxel softmax of those values:
    /// any misplaced window or wrong crop shows up.
    #[test]
    fn pointwise_model_is_reproduced_exactly() {
        // x = 7 is smaller than the patch (padded path); (6, 9, 10) holds whole patches (no copy).
        for dims in [(5, 9, 7), (6, 9, 10)] {
        let img = Array3::from_shape_fn(dims, |(k, j, i)| ((k * 31 + j * 7 + i * 3) % 11) as f32 / 5.0 - 1.0);
        for weighting in [Weighting::Mean, Weighting::Gaussian] {
            let sw = SlidingWindow { patch: [4, 6, 8], stride: [2, 3, 3], weighting, batch: 3 };
            let probs = sw.run(&img.view(), Device::Cpu, None, |x| Ok(Tensor::cat(&[x.zeros_like(), x.shallow_clone()], 1))).unwrap();
            assert_eq!(probs.dim(), (2, dims.0, dims.1, dims.2));
            for ((k, j, i), &v) in img.indexed_iter() {
                let p1 = 1.0 / (1.0 + (-v).exp());
                assert!((probs[[1, k, j, i]] - p1).abs() < 1e-5);
                assert!((probs[[0, k, j, i]] + probs[[1, k, j, i]] - 1.0).abs() < 1e-5);
            }
            let lab = argmax(&probs);
            for ((k, j, i), &v) in img.indexed_iter() {
                assert_eq!(lab[[k, j, i]], u8::from(v > 0.0), "at {:?}", (k, j, i));
            }
        }
        }
    }

    #[test]
    fn largest_component_is_kept_with_face_connectivity() {
        let mut m = Array3::from_elem((3, 4, 5), false);
        // A 4-voxel bar, a 2-voxel pair, and a voxel touching the bar only by an edge.
        for i in 0..4 { m[[0, 0, i]] = true; }
        m[[2, 3, 3]] = true;
        m[[2, 3, 4]] = true;
        m[[1, 1, 0]] = true;
        assert_eq!(keep_largest_component(&mut m), 3);
        assert_eq!(m.iter().filter(|&&b| b).count(), 4);
        assert!((0..4).all(|i| m[[0, 0, i]]));
        // Along z and y too: a column through all slices beats a 2×2 square.
        let mut m = Array3::from_elem((4, 4, 4), false);
        for k in 0..4 { m[[k, 3, 3]] = true; }
        for (j, i) in [(0, 0), (0, 1), (1, 0)] { m[[1, j, i]] = true; }
        assert_eq!(keep_largest_component(&mut m), 3);
        assert!((0..4).all(|k| m[[k, 3, 3]]));
        let mut empty = Array3::from_elem((2, 2, 2), false);
        assert_eq!(keep_largest_component(&mut empty), 0);
    }

    #[test]
    fn largest_components_per_foreground_then_per_class() {
        let mut l = Array3::<u8>::zeros((1, 3, 9));
        // Foreground piece A: class 1 (3 voxels) touching class 2 (2 voxels); piece B: class 2 (3 voxels).
        for i in 0..3 { l[[0, 0, i]] = 1; }
        for i in 3..5 { l[[0, 0, i]] = 2; }
        for i in 6..9 { l[[0, 2, i]] = 2; }
        // A lone class-1 voxel inside piece A's reach only diagonally: its own component.
        l[[0, 1, 5]] = 1;
        let mut out = l.clone();
        assert_eq!(keep_largest_components(&mut out, 3), 4);
        // Piece A (5 voxels) is the largest foreground piece: B and the lone voxel go.
        let mut want = Array3::<u8>::zeros((1, 3, 9));
        for i in 0..3 { want[[0, 0, i]] = 1; }
        for i in 3..5 { want[[0, 0, i]] = 2; }
        assert_eq!(out, want);
    }

    #[test]
    fn bad_windows_are_errors() {
        let img = Array3::<f32>::zeros((4, 4, 4));
        let sw = SlidingWindow { patch: [2, 2, 2], stride: [3, 1, 1], weighting: Weighting::Mean, batch: 1 };
        assert!(sw.run(&img.view(), Device::Cpu, None, |x| Ok(x.shallow_clone())).is_err());
    }
}
