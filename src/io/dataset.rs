//! Dataset folders in the Medical Segmentation Decathlon layout, as nnU-Net and MONAI users
//! have them: `dataset.json`, `imagesTr/`, `labelsTr/`, optional `imagesTs/`.
//!
//! Which cases are labelled is the caller's choice (`first(n)`, the LA benchmark's convention,
//! or an explicit list); the label of an unlabelled case is never opened.
use crate::error::{Error, Result};
use crate::limits::Classes;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// File name without `.nii.gz` / `.nii`, e.g. `hippocampus_001`.
    pub id: String,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub name: String,
    /// Class index -> name, background (0) included.
    pub labels: Classes,
    /// Cases of `training`, in the order of dataset.json.
    pub training: Vec<Case>,
    /// Images of `test` (no labels).
    pub test: Vec<PathBuf>,
    /// The imaging modality of channel 0, as `modality` (Decathlon) or `channel_names`
    /// (nnU-Net v2) names it: "CT" decides the intensity normalisation.
    pub modality: Option<String>,
}

#[derive(Deserialize)]
struct Pair {
    image: String,
    label: Option<String>,
}

#[derive(Deserialize)]
struct DatasetJson {
    name: Option<String>,
    labels: BTreeMap<String, String>,
    #[serde(default)]
    training: Vec<Pair>,
    #[serde(default)]
    test: Vec<serde_json::Value>,
    modality: Option<BTreeMap<String, String>>,
    channel_names: Option<BTreeMap<String, String>>,
}

/// `hippocampus_001.nii.gz` -> `hippocampus_001`.
pub fn case_id(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.trim_end_matches(".gz").trim_end_matches(".nii").to_string()
}

impl Dataset {
    /// Opens `dir/dataset.json` and checks that every listed file exists.
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let root = dir.as_ref().to_path_buf();
        let json_path = root.join("dataset.json");
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let parsed: DatasetJson =
            serde_json::from_str(&text).map_err(|e| Error::format(&json_path, format!("not a Decathlon dataset.json: {e}")))?;
        let mut labels = BTreeMap::new();
        for (k, v) in parsed.labels {
            let idx: u16 = k.parse().map_err(|_| Error::format(&json_path, format!("label key '{k}' is not a class index")))?;
            labels.insert(idx, v);
        }
        let labels = Classes::new("labels", labels).map_err(|e| Error::format(&json_path, e.to_string()))?;
        let path_of = |rel: &str| root.join(rel.trim_start_matches("./"));
        let resolve = |rel: &str| -> Result<PathBuf> {
            let p = path_of(rel);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::format(&json_path, format!("listed file {} does not exist", p.display())))
            }
        };
        let mut training: Vec<Case> = Vec::with_capacity(parsed.training.len());
        for pair in &parsed.training {
            let image = resolve(&pair.image)?;
            // A label is checked only when its case is made labelled (split_first/split_by_ids):
            // an unlabelled case needs none, so a missing label file is no error for it.
            let label = pair.label.as_deref().map(path_of);
            let id = case_id(&image);
            if let Some(first) = training.iter().find(|c| c.id == id) {
                return Err(Error::format(
                    &json_path,
                    format!("case '{id}' is listed twice in \"training\" ({} and {}): every case must appear once", first.image.display(), image.display()),
                ));
            }
            training.push(Case { id, image, label });
        }
        let mut test = vec![];
        for t in &parsed.test {
            // Decathlon lists test images as plain strings; some tools write {"image": ...}.
            let rel = t.as_str().or_else(|| t.get("image").and_then(|v| v.as_str()));
            if let Some(rel) = rel {
                test.push(resolve(rel)?);
            }
        }
        let modality = parsed.modality.or(parsed.channel_names).and_then(|m| m.get("0").cloned());
        Ok(Dataset { root, name: parsed.name.unwrap_or_default(), labels, training, test, modality })
    }

    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    /// The label file of a case that is to be labelled: listed and present, else a clear error.
    fn labelled(&self, c: &Case) -> Result<Case> {
        match &c.label {
            None => Err(Error::invalid(format!("case {} is to be labelled but dataset.json lists no label for it", c.id))),
            Some(p) if !p.is_file() => Err(Error::format(
                self.root.join("dataset.json"),
                format!("case {} is to be labelled but its label file {} does not exist", c.id, p.display()),
            )),
            Some(_) => Ok(c.clone()),
        }
    }

    /// A case by id, or a clear error.
    pub fn case(&self, id: &str) -> Result<&Case> {
        self.training.iter().find(|c| c.id == id).ok_or_else(|| Error::invalid(format!("case '{id}' is not in {}", self.root.display())))
    }

    /// Splits `training` into (labelled, unlabelled): the first `n` cases are labelled (the
    /// LA benchmark's convention). Unlabelled cases lose their label path, so nothing
    /// downstream can read it by accident.
    pub fn split_first(&self, n: usize) -> Result<(Vec<Case>, Vec<Case>)> {
        if n == 0 {
            return Err(Error::invalid("at least one labelled case is needed (--labeled 0)"));
        }
        if n > self.training.len() {
            return Err(Error::invalid(format!("--labeled {n}: the dataset has only {} training cases", self.training.len())));
        }
        let labelled: Vec<Case> = self.training[..n].iter().map(|c| self.labelled(c)).collect::<Result<_>>()?;
        let unlabelled = self.training[n..].iter().map(|c| Case { label: None, ..c.clone() }).collect();
        Ok((labelled, unlabelled))
    }

    /// Splits by an explicit list of labelled case ids (one per line in `--labeled-list`).
    pub fn split_by_ids(&self, ids: &[String]) -> Result<(Vec<Case>, Vec<Case>)> {
        let mut labelled: Vec<Case> = vec![];
        for id in ids {
            if labelled.iter().any(|c| &c.id == id) {
                return Err(Error::invalid(format!("case '{id}' is in the labelled list twice")));
            }
            labelled.push(self.labelled(self.case(id)?)?);
        }
        if labelled.is_empty() {
            return Err(Error::invalid("the labelled list is empty"));
        }
        let unlabelled = self.training.iter().filter(|c| !ids.contains(&c.id)).map(|c| Case { label: None, ..c.clone() }).collect();
        Ok((labelled, unlabelled))
    }
}

/// Reads a list of case ids: one per line, blank lines and `#` comments ignored. An id given
/// twice is an error (it would count the case twice).
pub fn read_id_list(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut ids: Vec<String> = vec![];
    for (n, line) in text.lines().enumerate() {
        let l = line.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let id = case_id(Path::new(l));
        if ids.contains(&id) {
            return Err(Error::format(path, format!("line {}: case '{id}' is listed twice", n + 1)));
        }
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(dir: &Path) {
        std::fs::create_dir_all(dir.join("imagesTr")).unwrap();
        std::fs::create_dir_all(dir.join("labelsTr")).unwrap();
        for i in 0..4 {
            std::fs::write(dir.join(format!("imagesTr/c_{i}.nii.gz")), b"x").unwrap();
            std::fs::write(dir.join(format!("labelsTr/c_{i}.nii.gz")), b"x").unwrap();
        }
        let training: Vec<_> = (0..4).map(|i| serde_json::json!({"image": format!("./imagesTr/c_{i}.nii.gz"), "label": format!("./labelsTr/c_{i}.nii.gz")})).collect();
        let j = serde_json::json!({"name": "t", "labels": {"0": "background", "1": "a", "2": "b"}, "training": training, "test": []});
        std::fs::write(dir.join("dataset.json"), j.to_string()).unwrap();
    }

    #[test]
    fn splits_never_leak_labels() {
        let d = tempfile::tempdir().unwrap();
        make(d.path());
        let ds = Dataset::open(d.path()).unwrap();
        assert_eq!(ds.num_classes(), 3);
        let (l, u) = ds.split_first(1).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(u.len(), 3);
        assert!(u.iter().all(|c| c.label.is_none()));
        assert!(ds.split_first(0).is_err());
        assert!(ds.split_first(5).is_err());
        let (l, u) = ds.split_by_ids(&["c_2".into()]).unwrap();
        assert_eq!(l[0].id, "c_2");
        assert_eq!(u.len(), 3);
        assert!(ds.split_by_ids(&["nope".into()]).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn the_modality_of_channel_0_is_read_from_either_key() {
        let d = tempfile::tempdir().unwrap();
        make(d.path());
        assert_eq!(Dataset::open(d.path()).unwrap().modality, None);
        let jp = d.path().join("dataset.json");
        for (key, want) in [("modality", "CT"), ("channel_names", "T2")] {
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
            j.as_object_mut().unwrap().remove("modality");
            j[key] = serde_json::json!({"0": want, "1": "other"});
            std::fs::write(&jp, j.to_string()).unwrap();
            assert_eq!(Dataset::open(d.path()).unwrap().modality.as_deref(), Some(want), "{key}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        make(d.path());
        // A missing label only matters for a case that is to be labelled.
        std::fs::remove_file(d.path().join("labelsTr/c_3.nii.gz")).unwrap();
        let ds = Dataset::open(d.path()).unwrap();
        let (l, u) = ds.split_first(3).unwrap();
        assert_eq!((l.len(), u.len()), (3, 1));
        let e = ds.split_first(4).unwrap_err().to_string();
        assert!(e.contains("labelsTr/c_3.nii.gz") && e.contains("does not exist"), "{e}");
        let e = ds.split_by_ids(&["c_3".into()]).unwrap_err().to_string();
        assert!(e.contains("labelsTr/c_3.nii.gz"), "{e}");
        // A missing image is an error at once.
        std::fs::remove_file(d.path().join("imagesTr/c_1.nii.gz")).unwrap();
        let e = Dataset::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("imagesTr/c_1.nii.gz"), "{e}");
    }

    #[test]
    fn duplicates_and_class_gaps_are_errors() {
        let d = tempfile::tempdir().unwrap();
        make(d.path());
        let jp = d.path().join("dataset.json");
        let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
        let first = j["training"][0].clone();
        j["training"].as_array_mut().unwrap().push(first);
        std::fs::write(&jp, j.to_string()).unwrap();
        let e = Dataset::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("c_0") && e.contains("twice") && e.contains("dataset.json"), "{e}");

        make(d.path());
        let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
        j["labels"] = serde_json::json!({"0": "background", "2": "b"});
        std::fs::write(&jp, j.to_string()).unwrap();
        let e = Dataset::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("1 is missing") && e.contains("dataset.json"), "{e}");

        make(d.path());
        let ds = Dataset::open(d.path()).unwrap();
        assert!(ds.split_by_ids(&["c_1".into(), "c_1".into()]).unwrap_err().to_string().contains("twice"));
        let list = d.path().join("list.txt");
        std::fs::write(&list, "c_0\n# comment\nc_1.nii.gz\nc_0\n").unwrap();
        let e = read_id_list(&list).unwrap_err().to_string();
        assert!(e.contains("list.txt") && e.contains("line 4") && e.contains("c_0"), "{e}");
        std::fs::write(&list, "c_0\n\nc_1.nii.gz # second\n").unwrap();
        assert_eq!(read_id_list(&list).unwrap(), vec!["c_0".to_string(), "c_1".to_string()]);
    }
}
