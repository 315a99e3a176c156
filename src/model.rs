//! The product of training: a `.sfrmodel` file — one safetensors file holding the V-Net's
//! weights and, under the metadata key `sfr`, the JSON of everything needed to use it (classes,
//! patch, normalisation, training spacing, method, data summary, validation metrics, library
//! version). SAM is not part of it: only the re-trained V-Net segments new scans.
use crate::error::{Error, Result};
use crate::infer::{argmax, InferenceConfig, SlidingWindow};
use crate::job::Reporter;
use crate::limits::Classes;
use crate::nn::vnet::{VNet, VNetConfig};
use crate::nn::weights::{read_safetensors_with_metadata, save_safetensors};
use crate::volume::{resize_linear, CtWindow, Normalization, Volume};
use ndarray::{Array4, ArrayView3};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Device};

pub const FORMAT: &str = "sfrmodel";
pub const FORMAT_VERSION: u32 = 1;
const META_KEY: &str = "sfr";

/// The metadata of a `.sfrmodel` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub format: String,
    pub format_version: u32,
    pub library_version: String,
    /// Class index -> name, background (0) included.
    pub classes: Classes,
    /// Patch `[x, y, z]` the network was trained on (and inference windows).
    pub patch: [usize; 3],
    /// Intensity normalisation applied to every input volume: "zscore-per-volume" (or
    /// "zscore", as the first models wrote it) or "ct-foreground" with its window
    /// (`volume::Normalization`).
    pub normalization: String,
    /// The CT window ("ct-foreground" only). Absent from per-volume z-score models, whose files
    /// stay as they were; a library that does not know the key refuses a CT model rather than
    /// z-scoring its inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalization_window: Option<CtWindow>,
    /// Median voxel spacing (mm) of the training images; inputs far from it are warned about.
    pub spacing: [f64; 3],
    pub vnet: VNetConfig,
    pub inference: InferenceConfig,
    /// Method, SFR on/off, preset, seed, data summary: free-form, for people and tools.
    pub training: serde_json::Value,
    /// Validation metrics (per class and mean Dice...), when a validation split existed.
    pub validation: Option<serde_json::Value>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Largest safetensors header read for the metadata: real models have a few kB.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The `sfr` metadata of a safetensors file, from its header only (8-byte little-endian
/// length, then that many bytes of JSON), without reading the tensors. Not yet validated.
fn read_meta_unchecked(path: &Path) -> Result<ModelMeta> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let md = f.metadata().map_err(|e| Error::io(path, e))?;
    if md.is_dir() {
        return Err(Error::format(path, "is a folder, not a model file"));
    }
    let file_len = md.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| Error::format(path, format!("not an SFR model: {file_len} bytes, too short for a safetensors header")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > file_len.saturating_sub(8) {
        return Err(Error::format(path, format!("not an SFR model: the safetensors header claims {n} bytes, the file has {file_len}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::format(path, format!("not an SFR model: the safetensors header is not valid JSON ({e})")))?;
    // The tensors' byte ranges must end where the file does: a cut file is found here too,
    // without reading the weights (safetensors checks the ranges in detail when they are read).
    let data_len = file_len - 8 - n;
    let end = json
        .as_object()
        .map(|o| o.iter().filter(|(k, _)| *k != "__metadata__").filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0))
        .unwrap_or(0);
    if end != data_len {
        return Err(Error::format(path, format!("truncated or corrupt model file: its header describes {end} bytes of weights, the file holds {data_len}")));
    }
    let text = json
        .get("__metadata__")
        .and_then(|m| m.get(META_KEY))
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::format(path, "not an SFR model: the safetensors metadata has no 'sfr' entry"))?;
    let meta: ModelMeta = serde_json::from_str(text).map_err(|e| Error::format(path, format!("bad model metadata: {e}")))?;
    if meta.format != FORMAT || meta.format_version > FORMAT_VERSION {
        return Err(Error::format(
            path,
            format!("model format {} v{} is not readable by this library (sfrmodel v{FORMAT_VERSION})", meta.format, meta.format_version),
        ));
    }
    Ok(meta)
}

impl ModelMeta {
    /// Checks every field that sizes work or memory against [`crate::limits`] (the same bounds
    /// as a training config), so that a corrupt or tampered file cannot make a load or a
    /// segmentation allocate without bound or index out of range.
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{self as lim, check_batch, check_positive, check_range};
        // The classes were checked when parsed or made (`Classes`).
        let n = self.classes.len();
        let v = &self.vnet;
        if v.num_classes != n as i64 {
            return Err(Error::invalid(format!("vnet.num_classes {} differs from the {n} classes listed", v.num_classes)));
        }
        check_range("vnet.in_channels", v.in_channels, 1, 1)?;
        check_range("vnet.n_filters", v.n_filters, 1, lim::MAX_N_FILTERS)?;
        v.validate()?;
        lim::check_patch("patch", self.patch)?;
        let s = self.inference.stride;
        if s.contains(&0) || s.iter().zip(&self.patch).any(|(s, p)| s > p) {
            return Err(Error::invalid(format!("inference stride {s:?} must be in 1..=patch {:?}", self.patch)));
        }
        check_batch("inference.batch", self.inference.batch, self.patch.iter().product())?;
        for (a, &sp) in self.spacing.iter().enumerate() {
            check_positive(&format!("spacing[{a}]"), sp)?;
        }
        self.normalization()?;
        Ok(())
    }

    /// The normalisation every input volume gets.
    pub fn normalization(&self) -> Result<Normalization> {
        Normalization::from_parts(&self.normalization, self.normalization_window)
    }
}

pub struct SfrModel {
    pub meta: ModelMeta,
    net: VNet,
    // Owns the network's variables.
    _vs: nn::VarStore,
    device: Device,
}

impl SfrModel {
    /// Wraps a trained network. `net` must live in `vs`.
    pub fn new(vs: nn::VarStore, net: VNet, meta: ModelMeta) -> SfrModel {
        let device = vs.device();
        SfrModel { meta, net, _vs: vs, device }
    }

    pub fn net(&self) -> &VNet {
        &self.net
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn num_classes(&self) -> usize {
        self.meta.vnet.num_classes as usize
    }

    /// Writes the model (atomically: temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let meta = serde_json::to_string(&self.meta).map_err(|e| Error::invalid(e.to_string()))?;
        let metadata: HashMap<String, String> = [(META_KEY.to_string(), meta)].into();
        save_safetensors(path, &self.net.state_dict(), &metadata)
    }

    /// Reads only the metadata of a `.sfrmodel` file (the safetensors header, not the weights),
    /// checked by [`ModelMeta::validate`].
    pub fn read_meta(path: impl AsRef<Path>) -> Result<ModelMeta> {
        let path = path.as_ref();
        let meta = read_meta_unchecked(path)?;
        meta.validate().map_err(|e| Error::format(path, format!("refusing this model: {e}")))?;
        Ok(meta)
    }

    fn read(path: &Path) -> Result<(Vec<(String, tch::Tensor)>, ModelMeta)> {
        // The metadata is read and checked first, from the header alone, so that a tampered
        // file claiming (say) a 4096³ patch is refused before any tensor is allocated.
        let meta = Self::read_meta(path)?;
        let (tensors, _) = read_safetensors_with_metadata(path)?;
        Ok((tensors, meta))
    }

    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<SfrModel> {
        let path = path.as_ref();
        let (tensors, meta) = Self::read(path)?;
        let vs = nn::VarStore::new(device);
        let mut net = VNet::new(&vs.root(), &meta.vnet).map_err(|e| Error::format(path, e.to_string()))?;
        net.load_state_dict(tensors, &path.display().to_string())?;
        Ok(SfrModel { meta, net, _vs: vs, device })
    }

    pub fn sliding_window(&self) -> SlidingWindow {
        let p = self.meta.patch;
        let s = self.meta.inference.stride;
        SlidingWindow { patch: [p[2], p[1], p[0]], stride: [s[2], s[1], s[0]], weighting: self.meta.inference.weighting, batch: self.meta.inference.batch }
    }

    /// Class probabilities [C, nz, ny, nx] of a raw (not yet normalised) image, on the
    /// image's own grid. An image whose spacing differs from the model's (by more than half a
    /// voxel over its extent) is resampled (trilinear) onto the grid of the same field of view
    /// at the model's spacing, predicted there, and the probabilities resampled back onto the
    /// image's grid: the network sees structures at the size it learnt them.
    pub fn predict(&self, image: &Volume<f32>, reporter: Option<&Reporter>) -> Result<Array4<f32>> {
        let dims = image.dims();
        let model_dims = image.geometry.dims_at_spacing(dims, self.meta.spacing);
        self.check_size(dims)?;
        if model_dims == dims || dims.contains(&0) {
            return self.predict_on_grid(&image.data.view(), reporter);
        }
        self.check_size(model_dims)?;
        log::info!(
            "resampling the input from spacing {:?} mm ({dims:?} voxels) to the model's {:?} mm ({model_dims:?} voxels), and the result back",
            image.geometry.spacing,
            self.meta.spacing
        );
        let zyx = |d: [usize; 3]| [d[2], d[1], d[0]];
        let resampled = resize_linear(&image.data.view(), zyx(model_dims));
        let probs = self.predict_on_grid(&resampled.view(), reporter)?;
        let sh = image.data.shape();
        let mut back = Array4::<f32>::zeros((probs.shape()[0], sh[0], sh[1], sh[2]));
        for (mut to, p) in back.outer_iter_mut().zip(probs.outer_iter()) {
            to.assign(&resize_linear(&p, zyx(dims)));
        }
        Ok(back)
    }

    /// The probabilities of every class for every voxel are held in memory: refuse sizes
    /// that cannot be held (an allocation failure would abort the host process).
    fn check_size(&self, dims: [usize; 3]) -> Result<()> {
        let voxels = dims.iter().fold(1usize, |a, &d| a.saturating_mul(d));
        let values = voxels.saturating_mul(self.num_classes());
        if voxels > crate::limits::MAX_VOXELS || values > crate::limits::MAX_PROBABILITY_VALUES {
            return Err(Error::invalid(format!(
                "input image of {dims:?} voxels × {} classes is too large to segment in one piece (limit {} voxels, {} class probabilities)",
                self.num_classes(),
                crate::limits::MAX_VOXELS,
                crate::limits::MAX_PROBABILITY_VALUES
            )));
        }
        Ok(())
    }

    /// Class probabilities of a raw image already at the model's spacing.
    fn predict_on_grid(&self, image: &ArrayView3<f32>, reporter: Option<&Reporter>) -> Result<Array4<f32>> {
        let norm = self.meta.normalization()?.apply(image, "input image")?;
        // BatchNorm folded, channels-last: the same logits up to rounding, ~half the time on a CPU.
        let folded = self.net.folded();
        self.sliding_window().run(&norm.view(), self.device, reporter, |x| folded.f_forward(&self.net, x))
    }

    /// Label map with exactly the input's geometry, and the class probabilities.
    pub fn segment(&self, image: &Volume<f32>, reporter: Option<&Reporter>) -> Result<(Volume<u8>, Array4<f32>)> {
        let probs = self.predict(image, reporter)?;
        let labels = argmax(&probs);
        Ok((image.with_data(labels)?, probs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Axis};
    use crate::infer::Weighting;
    use crate::volume::Geometry;

    pub fn tiny_model() -> SfrModel {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VNetConfig { n_filters: 2, num_classes: 3, ..VNetConfig::default() };
        let net = VNet::new(&vs.root(), &cfg).unwrap();
        // Its random weights from a generator of its own, not libtorch's global one: tests run
        // on parallel threads, and another test's draws between a `manual_seed` here and the
        // initialisation changed these weights (and a test's margin) by scheduling.
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if t.dim() >= 2 || name.ends_with("bias") {
                    let fan_in = if t.dim() >= 2 { (t.numel() / t.size()[0] as usize) as f32 } else { 8.0 };
                    let b = fan_in.sqrt().recip();
                    let v: Vec<f32> = (0..t.numel()).map(|_| rng.random_range(-b..b)).collect();
                    t.copy_(&tch::Tensor::from_slice(&v).view(t.size().as_slice()));
                }
            }
        });
        let meta = ModelMeta {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            library_version: crate::VERSION.into(),
            classes: Classes::new("classes", [(0, "background".into()), (1, "a".into()), (2, "b".into())].into()).unwrap(),
            patch: [16, 16, 16],
            normalization: "zscore".into(),
            normalization_window: None,
            spacing: [1.0, 1.0, 1.0],
            vnet: cfg,
            inference: InferenceConfig { stride: [8, 8, 8], weighting: Weighting::Gaussian, batch: 2 },
            // A float serde_json's fast (default) parser reads one ulp off: metadata must
            // come back from a file exactly as it was written (CI caught this in the guard's
            // recorded class fractions).
            training: serde_json::json!({"method": "supervised", "fraction": 0.24918154761904762_f64}),
            validation: None,
            created_unix: 0,
        };
        SfrModel::new(vs, net, meta)
    }

    #[test]
    fn an_input_at_another_spacing_is_predicted_at_the_models() {
        // A smooth image at the model's 1 mm, and the same field of view sampled at 2 mm along
        // x (half the voxels). Resampled, the coarse input's probabilities are those of the
        // fine one sampled at its voxels; fed as it is, the network sees everything half as
        // wide along x and answers otherwise.
        let m = tiny_model();
        let fine = Array3::from_shape_fn((24, 24, 32), |(k, j, i)| {
            let (z, y, x) = (k as f32 / 24.0, j as f32 / 24.0, i as f32 / 32.0);
            (6.0 * x).sin() + (5.0 * y).cos() * (4.0 * z).sin()
        });
        let coarse = resize_linear(&fine.view(), [24, 24, 16]);
        // Oblique (30° about z) and off the origin: only the spacing decides the resampling,
        // and the output keeps the whole geometry.
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        let g = Geometry { origin: [-12.5, 40.0, 7.25], spacing: [2.0, 1.0, 1.0], direction: [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0] };
        let img = Volume::new(coarse.clone(), g);
        let (labels, probs) = m.segment(&img, None).unwrap();
        assert_eq!(labels.geometry, g);
        assert_eq!(probs.shape(), &[3, 24, 24, 16]);
        let fine_probs = m.predict(&Volume::new(fine, Geometry::default()), None).unwrap();
        let want: Vec<Array3<f32>> = fine_probs.outer_iter().map(|p| resize_linear(&p, [24, 24, 16])).collect();
        let as_is = m.predict_on_grid(&coarse.view(), None).unwrap();
        let diff = |p: &Array4<f32>| -> f32 {
            let d: f32 = p.outer_iter().zip(&want).map(|(a, b)| (&a - b).mapv(f32::abs).sum()).sum();
            d / p.len() as f32
        };
        let (resampled, unresampled) = (diff(&probs), diff(&as_is));
        assert!(resampled < 0.5 * unresampled, "resampled {resampled} vs as is {unresampled}");
        // Probabilities stay probabilities.
        for s in probs.sum_axis(Axis(0)).iter() {
            assert!((s - 1.0).abs() < 1e-4, "{s}");
        }
    }

    #[test]
    fn save_load_segment_keeps_geometry() {
        let m = tiny_model();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sfrmodel");
        m.save(&p).unwrap();
        let back = SfrModel::load(&p, Device::Cpu).unwrap();
        assert_eq!(back.meta, m.meta);
        let g = Geometry { origin: [1.0, 2.0, 3.0], spacing: [0.9, 1.1, 1.0], direction: [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0] };
        let img = Volume::new(ndarray::Array3::from_shape_fn((10, 20, 18), |(k, j, i)| (k + j * i) as f32), g);
        let (a, pa) = m.segment(&img, None).unwrap();
        let (b, pb) = back.segment(&img, None).unwrap();
        assert_eq!(a.geometry, g);
        assert_eq!(a.dims(), [18, 20, 10]);
        assert_eq!(a, b);
        assert_eq!(pa, pb);
        assert!(a.data.iter().all(|&l| l < 3));
    }

    #[test]
    fn not_a_model_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.sfrmodel");
        std::fs::write(&p, b"garbage").unwrap();
        let e = SfrModel::load(&p, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("x.sfrmodel"), "{e}");
    }
}
