//! Loading tensors (PyTorch `.pth`/`.pt` zip checkpoints, `.safetensors`) into models, and
//! writing safetensors with metadata (the `.sfrmodel` format is safetensors whose metadata holds
//! the model's JSON description).
//!
//! Loading is strict: a checkpoint that does not fit the model (missing or extra keys, other
//! shapes) is an error listing the keys, never a partial load with silently random weights. The
//! only exception is what a [`LoadPolicy`] names explicitly (SAM's per-class decoder heads), and
//! those are reported in the [`LoadReport`].
use crate::error::{Error, Result};
use crate::io::pytorch::{self, RawTensor, TensorDType};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Tensors with their names, in file order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// The tch kind of a checkpoint dtype.
pub fn kind_of(dtype: TensorDType) -> Kind {
    match dtype {
        TensorDType::F64 => Kind::Double,
        TensorDType::F32 => Kind::Float,
        TensorDType::F16 => Kind::Half,
        TensorDType::BF16 => Kind::BFloat16,
        TensorDType::I64 => Kind::Int64,
        TensorDType::I32 => Kind::Int,
        TensorDType::I16 => Kind::Int16,
        TensorDType::I8 => Kind::Int8,
        TensorDType::U8 => Kind::Uint8,
        TensorDType::Bool => Kind::Bool,
    }
}

/// A CPU tensor holding a copy of `raw`'s values. The bytes are little-endian, as is every
/// machine libtorch runs on here.
pub fn raw_to_tensor(raw: &RawTensor) -> Result<Tensor> {
    let expect = raw.shape.iter().try_fold(raw.dtype.size(), |a, &d| a.checked_mul(d));
    if expect != Some(raw.data.len()) {
        return Err(Error::invalid(format!(
            "raw tensor {:?} of {} has {} bytes, expected {:?}",
            raw.shape,
            raw.dtype.name(),
            raw.data.len(),
            expect
        )));
    }
    let shape = shape_i64(&raw.shape)?;
    Ok(Tensor::f_from_data_size(&raw.data, &shape, kind_of(raw.dtype))?)
}

fn shape_i64(shape: &[usize]) -> Result<Vec<i64>> {
    shape.iter().map(|&d| i64::try_from(d).map_err(|_| Error::invalid(format!("dimension {d} too large")))).collect()
}

/// Which file format a path holds, decided by its first bytes (the extension only chooses the
/// message when they say nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    PyTorchZip,
    SafeTensors,
}

fn sniff(path: &Path) -> Result<Format> {
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(|e| Error::io(path, e))? {
            0 => break,
            k => n += k,
        }
    }
    if n >= 4 && &head[..2] == b"PK" {
        return Ok(Format::PyTorchZip);
    }
    // safetensors: u64 little-endian header length, then the JSON header.
    if n == 9 && head[8] == b'{' {
        return Ok(Format::SafeTensors);
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        // the PyTorch reader explains legacy pickles and other non-zip files
        "pth" | "pt" | "bin" | "ckpt" => Ok(Format::PyTorchZip),
        "safetensors" | "sfrmodel" => Err(Error::format(path, "not a safetensors file (bad header)")),
        _ => Err(Error::format(
            path,
            "unknown weight file format (expected a PyTorch .pth/.pt checkpoint or .safetensors)",
        )),
    }
}

/// Named CPU tensors of a PyTorch checkpoint (`torch.save`d state dict, also nested as
/// `{"model": sd, ...}`) or a safetensors file, in the file's order.
pub fn load_tensors(path: impl AsRef<Path>) -> Result<NamedTensors> {
    let path = path.as_ref();
    match sniff(path)? {
        Format::PyTorchZip => pytorch::read_state_dict(path)?
            .into_iter()
            .map(|(name, raw)| {
                let t = raw_to_tensor(&raw).map_err(|e| Error::format(path, format!("tensor '{name}': {e}")))?;
                Ok((name, t))
            })
            .collect(),
        Format::SafeTensors => Ok(read_safetensors_with_metadata(path)?.0),
    }
}

fn kind_of_safetensors(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn safetensors_dtype(k: Kind) -> Option<Dtype> {
    Some(match k {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// Named CPU tensors of a safetensors file in the file's (data offset) order, and its
/// `__metadata__` (empty when absent).
pub fn read_safetensors_with_metadata(path: impl AsRef<Path>) -> Result<(NamedTensors, HashMap<String, String>)> {
    let path = path.as_ref();
    let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // read_metadata checks the header length, the JSON and that every tensor's byte range
    // matches its shape and lies inside the file.
    let (n, meta): (usize, Metadata) = SafeTensors::read_metadata(&buf)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let data = &buf[8 + n..];
    let mut out = Vec::new();
    for name in meta.offset_keys() {
        let info = meta.info(&name).expect("offset_keys lists known names");
        let kind = kind_of_safetensors(info.dtype).ok_or_else(|| {
            Error::format(path, format!("tensor '{name}' has the unsupported dtype {:?}", info.dtype))
        })?;
        let (a, b) = info.data_offsets;
        let bytes =
            data.get(a..b).ok_or_else(|| Error::format(path, format!("tensor '{name}' lies outside the file")))?;
        let shape = shape_i64(&info.shape)?;
        let t = Tensor::f_from_data_size(bytes, &shape, kind)
            .map_err(|e| Error::format(path, format!("tensor '{name}': {e}")))?;
        out.push((name, t));
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok((out, metadata.into_iter().collect()))
}

/// A tensor's bytes, copied to the CPU, in the shape safetensors serialises.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn owned_view(name: &str, t: &Tensor) -> Result<OwnedView> {
    let kind = t.f_kind()?;
    let dtype = safetensors_dtype(kind)
        .ok_or_else(|| Error::invalid(format!("tensor '{name}': {kind:?} cannot be written to safetensors")))?;
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel: usize = shape.iter().product();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    if numel > 0 {
        t.f_copy_data_u8(&mut data, numel)?;
    }
    Ok(OwnedView { dtype, shape, data })
}

/// Writes `tensors` (any device, any layout) as safetensors with `metadata` as its
/// `__metadata__`. The file appears under its name only when complete: it is written to a
/// temporary file in the same folder, synced, then renamed.
pub fn save_safetensors<S: AsRef<str>>(
    path: impl AsRef<Path>,
    tensors: &[(S, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut seen = HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let name = name.as_ref();
        if !seen.insert(name) {
            return Err(Error::invalid(format!("{}: tensor name '{name}' given twice", path.display())));
        }
        views.push((name, owned_view(name, t)?));
    }
    let tmp = crate::io::temp_sibling(path, ".partial");
    let meta = if metadata.is_empty() { None } else { Some(metadata.clone().into_iter().collect()) };
    let written = safetensors::serialize_to_file(views.iter().map(|(n, v)| (*n, v)), meta, &tmp)
        .map_err(|e| match e {
            // a failed write (full disk, missing folder, permissions) is an I/O error
            safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
            other => Error::format(path, format!("cannot write safetensors: {other}")),
        })
        .and_then(|_| {
            // rename is atomic, but only of data that reached the disk
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Which names may be left out of a strict load.
#[derive(Clone, Debug, Default)]
pub struct LoadPolicy {
    /// Name prefixes of model tensors that keep their initial values when the checkpoint lacks
    /// them or has them in another shape; checkpoint tensors under these prefixes that the model
    /// lacks are dropped. (SAM's per-class decoder: `mask_decoder.mask_tokens.`,
    /// `mask_decoder.output_hypernetworks_mlps.`, `mask_decoder.iou_prediction_head.`.)
    pub reinit: Vec<String>,
    /// Name prefixes of checkpoint tensors the model does not have and that are dropped
    /// (reported as unexpected), e.g. buffers a model recomputes.
    pub ignore_unexpected: Vec<String>,
}

impl LoadPolicy {
    /// Every model tensor must be in the checkpoint with its shape, and nothing else.
    pub fn strict() -> Self {
        LoadPolicy::default()
    }

    /// Strict except for the names under `prefixes`, which may be re-initialised.
    pub fn reinit<S: AsRef<str>>(prefixes: &[S]) -> Self {
        LoadPolicy { reinit: prefixes.iter().map(|p| p.as_ref().to_string()).collect(), ignore_unexpected: vec![] }
    }

    fn may_reinit(&self, name: &str) -> bool {
        self.reinit.iter().any(|p| name.starts_with(p.as_str()))
    }

    fn may_drop(&self, name: &str) -> bool {
        self.may_reinit(name) || self.ignore_unexpected.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// What a load did. Everything in `missing` and `mismatched` kept its initial value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Model tensors given their checkpoint values, in checkpoint order.
    pub loaded: Vec<String>,
    /// Model tensors the checkpoint lacks (sorted).
    pub missing: Vec<String>,
    /// Checkpoint tensors the model lacks, dropped (checkpoint order).
    pub unexpected: Vec<String>,
    /// (name, shape in the file, shape in the model), not loaded.
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl LoadReport {
    /// Names of the model tensors that were not loaded and keep their initial values.
    pub fn reinitialized(&self) -> Vec<String> {
        let mut v: Vec<String> = self.missing.clone();
        v.extend(self.mismatched.iter().map(|(n, _, _)| n.clone()));
        v.sort();
        v
    }
}

fn first_keys(names: &[String], n: usize) -> String {
    let mut s = names.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > n {
        s.push_str(&format!(", ... ({} in all)", names.len()));
    }
    s
}

/// Copies `tensors` into the variables of `vs` with the same names (converting dtype and
/// device: f16/bf16 checkpoints load into f32 models). Nothing is copied unless the whole
/// checkpoint fits under `policy`; otherwise the error lists the missing, unexpected and
/// mismatched keys (the first ten of each and their count).
pub fn load_into_varstore(
    vs: &mut tch::nn::VarStore,
    tensors: NamedTensors,
    policy: &LoadPolicy,
) -> Result<LoadReport> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let (mut bad_missing, mut bad_unexpected, mut bad_shape) = (vec![], vec![], vec![]);
    let mut in_file = HashSet::new();
    let mut to_copy = Vec::new();
    for (name, t) in tensors {
        if !in_file.insert(name.clone()) {
            return Err(Error::invalid(format!("the checkpoint holds '{name}' twice")));
        }
        match vars.get(&name) {
            None if policy.may_drop(&name) => report.unexpected.push(name),
            None => bad_unexpected.push(name),
            Some(var) => {
                let (fs, ms) = (t.size(), var.size());
                if fs == ms {
                    to_copy.push((name, var.shallow_clone(), t));
                } else if policy.may_reinit(&name) {
                    report.mismatched.push((name, fs, ms));
                } else {
                    bad_shape.push(format!("{name} (file {fs:?}, model {ms:?})"));
                }
            }
        }
    }
    let mut absent: Vec<&String> = vars.keys().filter(|k| !in_file.contains(*k)).collect();
    absent.sort();
    for name in absent {
        if policy.may_reinit(name) {
            report.missing.push(name.clone());
        } else {
            bad_missing.push(name.clone());
        }
    }
    if !(bad_missing.is_empty() && bad_unexpected.is_empty() && bad_shape.is_empty()) {
        let mut parts = vec![];
        if !bad_missing.is_empty() {
            parts.push(format!("{} missing: {}", bad_missing.len(), first_keys(&bad_missing, 10)));
        }
        if !bad_unexpected.is_empty() {
            parts.push(format!("{} unexpected: {}", bad_unexpected.len(), first_keys(&bad_unexpected, 10)));
        }
        if !bad_shape.is_empty() {
            parts.push(format!("{} with another shape: {}", bad_shape.len(), first_keys(&bad_shape, 10)));
        }
        return Err(Error::invalid(format!("the checkpoint does not fit the model: {}", parts.join("; "))));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut var, t) in to_copy {
            var.f_copy_(&t).map_err(|e| Error::invalid(format!("cannot copy '{name}': {e}")))?;
            report.loaded.push(name);
        }
        Ok(())
    })?;
    Ok(report)
}

/// [`load_tensors`] + [`load_into_varstore`], with errors naming the file.
pub fn load_file_into_varstore(
    vs: &mut tch::nn::VarStore,
    path: impl AsRef<Path>,
    policy: &LoadPolicy,
) -> Result<LoadReport> {
    let path = path.as_ref();
    let tensors = load_tensors(path)?;
    load_into_varstore(vs, tensors, policy).map_err(|e| match e {
        Error::Invalid(m) => Error::format(path, m),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sfr_weights_{tag}_{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn model(vs: &nn::VarStore, out: i64) -> impl Module {
        let root = vs.root();
        nn::seq().add(nn::linear(&root / "body", 3, 4, Default::default())).add(nn::linear(
            &root / "head",
            4,
            out,
            Default::default(),
        ))
    }

    #[test]
    fn safetensors_round_trip_with_metadata_and_dtypes() {
        let d = tmpdir("rt");
        let p = d.join("m.sfrmodel");
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]).transpose(0, 1);
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let c = Tensor::from_slice(&[0.5f32, 1.5]).to_kind(Kind::BFloat16);
        let e = Tensor::zeros([0, 2], (Kind::Half, Device::Cpu));
        let meta: HashMap<String, String> = [("sfr".to_string(), "{\"classes\":[\"bg\",\"la\"]}".to_string())].into();
        save_safetensors(
            &p,
            &[("a", a.shallow_clone()), ("b", b.shallow_clone()), ("c", c.shallow_clone()), ("e", e)],
            &meta,
        )
        .unwrap();
        let (ts, m) = read_safetensors_with_metadata(&p).unwrap();
        assert_eq!(m, meta);
        let get = |n: &str| ts.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        assert!(get("a").equal(&a));
        assert!(get("b").equal(&b));
        assert_eq!(get("c").kind(), Kind::BFloat16);
        assert!(get("c").equal(&c));
        assert_eq!(get("e").size(), [0, 2]);
        // no temporary file is left behind
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(save_safetensors(&p, &[("x", b.shallow_clone()), ("x", b)], &HashMap::new()).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn strict_load_names_the_keys_and_copies_nothing_on_error() {
        let src_vs = nn::VarStore::new(Device::Cpu);
        let _ = model(&src_vs, 2);
        let mut named: Vec<(String, Tensor)> = src_vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));

        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = model(&vs, 2);
        let r = load_into_varstore(
            &mut vs,
            named.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::Half))).collect(),
            &LoadPolicy::strict(),
        )
        .unwrap();
        assert_eq!(r.loaded.len(), 4);
        assert!(r.missing.is_empty() && r.unexpected.is_empty() && r.mismatched.is_empty());
        for (n, t) in vs.variables() {
            let src = &named.iter().find(|(k, _)| *k == n).unwrap().1;
            assert!(t.allclose(&src.to_kind(Kind::Half).to_kind(Kind::Float), 0.0, 0.0, false), "{n}");
        }

        // a model with a 3-class head: the head's weight and bias have other shapes
        let mut vs3 = nn::VarStore::new(Device::Cpu);
        let _ = model(&vs3, 3);
        let before = vs3.variables()["body.weight"].copy();
        let mut extra = named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        extra.push(("tail.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        let e = load_into_varstore(&mut vs3, extra, &LoadPolicy::strict()).unwrap_err().to_string();
        assert!(
            e.contains("head.weight (file [2, 4], model [3, 4])") && e.contains("1 unexpected: tail.weight"),
            "{e}"
        );
        assert!(vs3.variables()["body.weight"].equal(&before), "nothing may be copied on error");

        // the same under a policy that lets the head be re-initialised
        let mut policy = LoadPolicy::reinit(&["head."]);
        policy.ignore_unexpected.push("tail.".into());
        let mut extra = named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
        extra.push(("tail.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        let r = load_into_varstore(&mut vs3, extra, &policy).unwrap();
        assert_eq!(r.loaded, ["body.bias", "body.weight"]);
        assert_eq!(r.unexpected, ["tail.weight"]);
        assert_eq!(r.mismatched.len(), 2);
        assert_eq!(r.reinitialized(), ["head.bias", "head.weight"]);

        // missing keys outside the policy
        let only_body: Vec<_> =
            named.iter().filter(|(n, _)| n.starts_with("body")).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let e = load_into_varstore(&mut vs, only_body, &LoadPolicy::strict()).unwrap_err().to_string();
        assert!(e.contains("2 missing: head.bias, head.weight"), "{e}");
    }

    #[test]
    fn unknown_files_are_format_errors() {
        let d = tmpdir("bad");
        let p = d.join("w.safetensors");
        std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ").unwrap();
        let e = load_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("w.safetensors"), "{e}");
        let p = d.join("w.txt");
        std::fs::write(&p, b"hello").unwrap();
        let e = load_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("w.txt") && e.contains("unknown weight file format"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
