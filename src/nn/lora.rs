//! LoRA on the fused qkv projection of SAM image-encoder blocks, as SAMed's `_LoRA_qkv`:
//! `qkv(x) + [B_q·A_q·x, 0, B_v·A_v·x]` — rank-r updates of the q and v thirds of every block's
//! qkv output, nothing on k. A TinyViT (LiteMedSAM, MobileSAM) lays its fused qkv out per head
//! (`[q_h | k_h | v_h]` for each head h), so there the q and v updates go to each head's q and v
//! slices; its blocks are the attention blocks of stages 1–3 in order (10 for LiteMedSAM), each
//! with its stage's width. A is kaiming-uniform (`a = √5`, `nn.Linear`'s default, i.e.
//! U(±1/√dim)), B is zero, and there is no scaling factor, so a fresh LoRA leaves the model
//! unchanged.
//!
//! Tensor names (in the VarStore below the path given to [`Lora::new`], and in files with a
//! `lora.` prefix): `blocks.{i}.linear_a_q.weight` [r, dim], `blocks.{i}.linear_b_q.weight`
//! [dim, r], `blocks.{i}.linear_a_v.weight`, `blocks.{i}.linear_b_v.weight` — SAMed's module
//! names. [`Lora::load`] also reads SAMed's own files, whose keys are `w_a_{n:03}` /
//! `w_b_{n:03}` with n = 2·block for q and 2·block + 1 for v.
use crate::error::{Error, Result};
use crate::nn::sam::common::{InitRule, ParamEntry, Params};
use crate::nn::sam::{ImageEncoder, Sam, SamConfig};
use crate::nn::weights::{load_tensors, save_safetensors};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Tensor};

/// Prefix of LoRA keys in files (so they can sit beside SAM's own keys in a fine-tuned file).
pub const FILE_PREFIX: &str = "lora.";

/// The LoRA tensors of one encoder block.
#[derive(Debug)]
pub struct LoraBlock {
    pub linear_a_q: Tensor,
    pub linear_b_q: Tensor,
    pub linear_a_v: Tensor,
    pub linear_b_v: Tensor,
    dim: i64,
    /// Some(heads): the qkv output is laid out per head (TinyViT), else [q | k | v] (ViT).
    per_head: Option<i64>,
}

impl LoraBlock {
    /// qkv(x) [..., 3·dim] plus the q and v updates. The update is added in place on the q and v
    /// slices (as SAMed does), which autograd handles and which avoids a second full-size qkv.
    pub fn add_to_qkv(&self, qkv: Tensor, x: &Tensor) -> Tensor {
        let new_q = x.linear(&self.linear_a_q, None::<Tensor>).linear(&self.linear_b_q, None::<Tensor>);
        let new_v = x.linear(&self.linear_a_v, None::<Tensor>).linear(&self.linear_b_v, None::<Tensor>);
        match self.per_head {
            None => {
                let mut q = qkv.narrow(-1, 0, self.dim);
                let _ = q.g_add_(&new_q);
                let mut v = qkv.narrow(-1, 2 * self.dim, self.dim);
                let _ = v.g_add_(&new_v);
            }
            Some(h) => {
                // [..., 3·dim] seen as [..., heads, 3, head_dim]: q is slot 0, v slot 2.
                let mut lead = qkv.size();
                lead.pop();
                let hd = self.dim / h;
                let per_head = |t: &Tensor, extra: &[i64]| {
                    let mut s = lead.clone();
                    s.push(h);
                    s.extend_from_slice(extra);
                    t.view(s.as_slice())
                };
                let view = per_head(&qkv, &[3, hd]);
                let _ = view.select(-2, 0).g_add_(&per_head(&new_q, &[hd]));
                let _ = view.select(-2, 2).g_add_(&per_head(&new_v, &[hd]));
            }
        }
        qkv
    }
}

/// Rank-r LoRA on q and v of every image-encoder block.
#[derive(Debug)]
pub struct Lora {
    pub rank: i64,
    pub blocks: Vec<LoraBlock>,
    /// (width, heads) of each block, as `SamConfig::attention_blocks`.
    spec: Vec<(i64, i64)>,
    tiny_vit: bool,
    entries: Vec<ParamEntry>,
}

impl Lora {
    /// Creates LoRA tensors for `sam`'s encoder in `path` (best in a VarStore of its own, so the
    /// SAM VarStore keeps exactly the official keys) and, like SAMed's `LoRA_Sam`, freezes the
    /// image encoder: afterwards the trainable tensors are the LoRA's, the prompt encoder's and
    /// the mask decoder's.
    pub fn new(path: &nn::Path, sam: &Sam, rank: i64) -> Result<Lora> {
        let lora = Self::for_config(path, &sam.cfg, rank)?;
        sam.set_image_encoder_trainable(false);
        Ok(lora)
    }

    /// The LoRA tensors alone, for a model of configuration `cfg` (no freezing).
    pub fn for_config(path: &nn::Path, cfg: &SamConfig, rank: i64) -> Result<Lora> {
        if rank < 1 {
            return Err(Error::invalid(format!("LoRA rank must be at least 1 (got {rank})")));
        }
        let spec = cfg.attention_blocks();
        let tiny_vit = cfg.tiny_vit.is_some();
        let p = Params::root(path);
        let blocks = spec
            .iter()
            .enumerate()
            .map(|(i, &(dim, heads))| {
                let a = InitRule::Uniform(1.0 / (dim as f64).sqrt());
                let b = p.sub("blocks").sub(i);
                LoraBlock {
                    linear_a_q: b.sub("linear_a_q").param("weight", &[rank, dim], a),
                    linear_b_q: b.sub("linear_b_q").param("weight", &[dim, rank], InitRule::Zeros),
                    linear_a_v: b.sub("linear_a_v").param("weight", &[rank, dim], a),
                    linear_b_v: b.sub("linear_b_v").param("weight", &[dim, rank], InitRule::Zeros),
                    dim,
                    per_head: tiny_vit.then_some(heads),
                }
            })
            .collect();
        Ok(Lora { rank, blocks, spec, tiny_vit, entries: p.take_entries() })
    }

    /// Number of LoRA parameters: depth · 4 · r · dim (147,456 for vit_b at r = 4).
    pub fn num_parameters(&self) -> i64 {
        self.entries.iter().map(|e| e.tensor.numel() as i64).sum()
    }

    /// The LoRA tensors (for an optimizer).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.entries.iter().map(|e| e.tensor.shallow_clone()).collect()
    }

    /// Every tensor with its key (without the file prefix).
    pub fn named_tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|e| (e.key.as_str(), &e.tensor))
    }

    pub(crate) fn check_fits(&self, cfg: &SamConfig) -> Result<()> {
        let want = cfg.attention_blocks();
        if self.spec != want || self.tiny_vit != cfg.tiny_vit.is_some() {
            let widths = |s: &[(i64, i64)]| s.iter().map(|b| b.0).collect::<Vec<_>>();
            return Err(Error::invalid(format!(
                "LoRA for {} blocks of widths {:?} does not fit SAM '{}' ({} blocks of widths {:?})",
                self.blocks.len(),
                widths(&self.spec),
                cfg.name,
                want.len(),
                widths(&want)
            )));
        }
        Ok(())
    }

    /// Writes the LoRA tensors (keys `lora.blocks.{i}.linear_{a,b}_{q,v}.weight`) as safetensors,
    /// with `lora_rank`, `lora_blocks` and `lora_dim` in the metadata.
    pub fn save(&self, file: &Path) -> Result<()> {
        save_safetensors(file, &self.file_tensors(), &self.metadata())
    }

    fn file_tensors(&self) -> Vec<(String, Tensor)> {
        self.entries.iter().map(|e| (format!("{FILE_PREFIX}{}", e.key), e.tensor.detach())).collect()
    }

    fn metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("lora_rank".to_string(), self.rank.to_string()),
            ("lora_blocks".to_string(), self.blocks.len().to_string()),
            ("lora_dim".to_string(), self.spec.iter().map(|b| b.0.to_string()).collect::<Vec<_>>().join(",")),
        ])
    }

    /// Reads LoRA tensors from a file written by [`Lora::save`] / [`save_finetuned`] or by SAMed
    /// (`w_a_000`, ... ; `.pth` or `.safetensors`). Other keys in the file are ignored. Every LoRA
    /// tensor must be present with this LoRA's shape (same rank and encoder), else nothing is
    /// changed and the error names the keys.
    pub fn load(&self, file: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = load_tensors(file)?.into_iter().collect();
        self.load_from(&tensors, file)
    }

    fn load_from(&self, tensors: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
        let samed = !tensors.keys().any(|k| k.starts_with(FILE_PREFIX)) && tensors.contains_key("w_a_000");
        let mut plan = Vec::new();
        let mut problems = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let key = if samed { samed_key(i) } else { format!("{FILE_PREFIX}{}", e.key) };
            match tensors.get(&key) {
                Some(t) if t.size() == e.tensor.size() && t.is_floating_point() => plan.push((e, t)),
                Some(t) => problems.push(format!("{key}: {:?} {:?} in the file, {:?} expected (rank {})", t.kind(), t.size(), e.tensor.size(), self.rank)),
                None => problems.push(format!("{key}: missing")),
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(8);
            return Err(Error::format(file, format!("LoRA weights do not fit ({n} problems): {}", problems.join("; "))));
        }
        tch::no_grad(|| -> Result<()> {
            for (e, t) in plan {
                e.tensor.shallow_clone().f_copy_(&t.to_kind(e.tensor.kind()).to_device(e.tensor.device()))?;
            }
            Ok(())
        })
    }

    /// Folds B·A into the q and v rows of every block's `qkv.weight`, for inference without the
    /// LoRA branch. Consumes the LoRA so the update cannot be applied twice.
    pub fn merge(self, sam: &Sam) -> Result<()> {
        self.check_fits(&sam.cfg)?;
        let weights: Vec<&Tensor> = match &sam.image_encoder {
            ImageEncoder::Vit(e) => e.blocks.iter().map(|b| &b.attn.qkv.weight).collect(),
            ImageEncoder::TinyVit(t) => t.attentions().into_iter().map(|a| &a.qkv.weight).collect(),
        };
        tch::no_grad(|| -> Result<()> {
            for (w, l) in weights.into_iter().zip(&self.blocks) {
                let d = l.dim;
                let dq = l.linear_b_q.matmul(&l.linear_a_q).to_kind(w.kind());
                let dv = l.linear_b_v.matmul(&l.linear_a_v).to_kind(w.kind());
                match l.per_head {
                    None => {
                        let _ = w.narrow(0, 0, d).f_add_(&dq)?;
                        let _ = w.narrow(0, 2 * d, d).f_add_(&dv)?;
                    }
                    Some(h) => {
                        // Rows of head h: [q_h | k_h | v_h], each head_dim rows.
                        let rows = w.view([h, 3, d / h, d]);
                        let _ = rows.select(1, 0).f_add_(&dq.view([h, d / h, d]))?;
                        let _ = rows.select(1, 2).f_add_(&dv.view([h, d / h, d]))?;
                    }
                }
            }
            Ok(())
        })
    }
}

/// SAMed's key of entry `i` of our order (block-major: a_q, b_q, a_v, b_v): its `w_As` list
/// holds q then v per block, and `w_Bs` likewise.
fn samed_key(i: usize) -> String {
    let (block, which) = (i / 4, i % 4);
    let (ab, n) = match which {
        0 => ("a", 2 * block),
        1 => ("b", 2 * block),
        2 => ("a", 2 * block + 1),
        _ => ("b", 2 * block + 1),
    };
    format!("w_{ab}_{n:03}")
}

/// Writes everything fine-tuning changes — the LoRA tensors (`lora.*`) and the prompt encoder
/// and mask decoder under their official keys (`prompt_encoder.*`, `mask_decoder.*`) — in one
/// safetensors file, the content SAMed saves.
pub fn save_finetuned(file: &Path, sam: &Sam, lora: &Lora) -> Result<()> {
    let mut named = lora.file_tensors();
    for (k, t) in sam.named_tensors() {
        if k.starts_with("prompt_encoder.") || k.starts_with("mask_decoder.") {
            named.push((k.to_string(), t.detach()));
        }
    }
    let mut meta = lora.metadata();
    meta.extend(sam.metadata());
    save_safetensors(file, &named, &meta)
}

/// Reads a file written by [`save_finetuned`] (or a SAMed LoRA checkpoint): the LoRA tensors and
/// every prompt-encoder and mask-decoder tensor of `sam`, which must all be present with the
/// model's shapes (same number of classes). Nothing is changed on error.
pub fn load_finetuned(file: &Path, sam: &Sam, lora: &Lora) -> Result<()> {
    let tensors: HashMap<String, Tensor> = load_tensors(file)?.into_iter().collect();
    let mut plan = Vec::new();
    let mut problems = Vec::new();
    for (k, t) in sam.named_tensors() {
        if !(k.starts_with("prompt_encoder.") || k.starts_with("mask_decoder.")) {
            continue;
        }
        match tensors.get(k) {
            Some(f) if f.size() == t.size() && f.is_floating_point() => plan.push((t, f)),
            Some(f) => problems.push(format!("{k}: {:?} in the file, {:?} in the model", f.size(), t.size())),
            None => problems.push(format!("{k}: missing")),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(8);
        return Err(Error::format(file, format!("fine-tuned SAM weights do not fit SAM '{}' with {} classes ({n} problems): {}", sam.cfg.name, sam.cfg.num_classes, problems.join("; "))));
    }
    lora.load_from(&tensors, file)?;
    tch::no_grad(|| -> Result<()> {
        for (t, f) in plan {
            t.shallow_clone().f_copy_(&f.to_kind(t.kind()).to_device(t.device()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::sam::SamConfig;
    use tch::{Device, Kind};

    fn tiny() -> (nn::VarStore, Sam) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let sam = Sam::new(&vs.root(), &SamConfig::tiny().with_num_classes(2)).unwrap();
        // Non-zero relative tables and position embedding, so every term of the encoder counts.
        tch::no_grad(|| {
            for (k, t) in sam.named_tensors() {
                if k.contains("rel_pos") || k.ends_with("pos_embed") {
                    t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.5));
                }
            }
        });
        (vs, sam)
    }

    fn randomise_b(lora: &Lora) {
        tch::no_grad(|| {
            for (k, t) in lora.named_tensors() {
                if k.contains("linear_b") {
                    t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
                }
            }
        });
    }

    fn images() -> Tensor {
        Tensor::randn([2, 3, 128, 128], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn vit_b_rank_4_has_147456_parameters() {
        let vs = nn::VarStore::new(Device::Cpu);
        let lora = Lora::for_config(&vs.root(), &SamConfig::vit_b(), 4).unwrap();
        assert_eq!(lora.num_parameters(), 147_456);
        assert_eq!(lora.blocks.len(), 12);
        assert!(Lora::for_config(&vs.root(), &SamConfig::vit_b(), 0).is_err());
    }

    #[test]
    fn fresh_lora_is_identity_and_init_is_kaiming_uniform() {
        let (_vs, sam) = tiny();
        let lvs = nn::VarStore::new(Device::Cpu);
        let lora = Lora::new(&lvs.root(), &sam, 4).unwrap();
        let x = images();
        let plain = tch::no_grad(|| sam.forward(&x, None).unwrap());
        let with = tch::no_grad(|| sam.forward(&x, Some(&lora)).unwrap());
        assert!(plain.low_res_logits.equal(&with.low_res_logits));
        assert!(plain.iou_predictions.equal(&with.iou_predictions));
        let bound = 1.0 / 64f64.sqrt();
        for (k, t) in lora.named_tensors() {
            let m = f64::try_from(t.abs().max()).unwrap();
            if k.contains("linear_b") {
                assert_eq!(m, 0.0, "{k}");
            } else {
                assert!(m > 0.5 * bound && m <= bound, "{k}: max |A| {m} vs bound {bound}");
            }
        }
        let names: Vec<String> = lvs.variables().into_keys().collect();
        assert!(names.contains(&"blocks.3.linear_a_v.weight".to_string()), "{names:?}");
    }

    #[test]
    fn nonzero_lora_changes_output_and_merge_matches() {
        let (_vs, sam) = tiny();
        let lvs = nn::VarStore::new(Device::Cpu);
        let lora = Lora::new(&lvs.root(), &sam, 4).unwrap();
        randomise_b(&lora);
        let x = images();
        let plain = tch::no_grad(|| sam.forward(&x, None).unwrap()).low_res_logits;
        let unmerged = tch::no_grad(|| sam.forward(&x, Some(&lora)).unwrap()).low_res_logits;
        let change = f64::try_from((&unmerged - &plain).abs().max()).unwrap();
        assert!(change > 1e-3, "a non-zero LoRA must change the output (max change {change})");
        lora.merge(&sam).unwrap();
        let merged = tch::no_grad(|| sam.forward(&x, None).unwrap()).low_res_logits;
        let err = f64::try_from((&merged - &unmerged).abs().max()).unwrap();
        let scale = f64::try_from(unmerged.abs().max()).unwrap();
        assert!(err <= 1e-5 * scale.max(1.0), "merged vs unmerged: max abs err {err}");
    }

    #[test]
    fn only_lora_prompt_encoder_and_decoder_get_gradients() {
        let (_vs, sam) = tiny();
        let lvs = nn::VarStore::new(Device::Cpu);
        let lora = Lora::new(&lvs.root(), &sam, 2).unwrap();
        let loss = sam.forward(&images(), Some(&lora)).unwrap().low_res_logits.pow_tensor_scalar(2).mean(Kind::Float);
        loss.backward();
        for (k, t) in sam.named_tensors() {
            if k.starts_with("image_encoder.") {
                assert!(!t.requires_grad() && !t.grad().defined(), "{k} must be frozen");
            }
        }
        assert!(sam.tensor("mask_decoder.mask_tokens.weight").unwrap().grad().defined());
        assert!(sam.tensor("prompt_encoder.no_mask_embed.weight").unwrap().grad().defined());
        // With B = 0 the gradient reaches B (A's is zero until B moves).
        let gb = lora.blocks[0].linear_b_q.grad();
        assert!(gb.defined() && f64::try_from(gb.abs().max()).unwrap() > 0.0);
        assert!(lora.blocks[0].linear_a_v.grad().defined());
        let trainable = sam.trainable_tensors();
        assert!(!trainable.is_empty());
        assert_eq!(trainable.len(), sam.named_tensors().filter(|(k, _)| k.starts_with("mask_decoder.") || (k.starts_with("prompt_encoder.") && !k.contains("gaussian"))).count());
        sam.set_image_encoder_trainable(true);
        assert!(sam.tensor("image_encoder.pos_embed").unwrap().requires_grad());
    }

    #[test]
    fn save_load_roundtrip_and_samed_names() {
        let (_vs, sam) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let a = Lora::new(&nn::VarStore::new(Device::Cpu).root(), &sam, 4).unwrap();
        randomise_b(&a);
        let f = dir.path().join("lora.safetensors");
        a.save(&f).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files, vec![std::ffi::OsString::from("lora.safetensors")]);
        let (_, meta) = crate::nn::weights::read_safetensors_with_metadata(&f).unwrap();
        assert_eq!(meta.get("lora_rank").map(String::as_str), Some("4"));
        let b = Lora::for_config(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg, 4).unwrap();
        b.load(&f).unwrap();
        for ((ka, ta), (kb, tb)) in a.named_tensors().zip(b.named_tensors()) {
            assert_eq!(ka, kb);
            assert!(ta.equal(tb), "{ka}");
        }
        let keys: Vec<String> = Tensor::read_safetensors(&f).unwrap().into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"lora.blocks.0.linear_a_q.weight".to_string()), "{keys:?}");

        // SAMed's naming: w_a_{2i} / w_b_{2i} for q of block i, w_a_{2i+1} / w_b_{2i+1} for v.
        let mut samed = Vec::new();
        for (i, blk) in a.blocks.iter().enumerate() {
            samed.push((format!("w_a_{:03}", 2 * i), blk.linear_a_q.detach()));
            samed.push((format!("w_b_{:03}", 2 * i), blk.linear_b_q.detach()));
            samed.push((format!("w_a_{:03}", 2 * i + 1), blk.linear_a_v.detach()));
            samed.push((format!("w_b_{:03}", 2 * i + 1), blk.linear_b_v.detach()));
        }
        let fs = dir.path().join("samed.safetensors");
        Tensor::write_safetensors(&samed, &fs).unwrap();
        let c = Lora::for_config(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg, 4).unwrap();
        c.load(&fs).unwrap();
        for (ta, tc) in a.tensors().iter().zip(c.tensors()) {
            assert!(ta.equal(&tc));
        }

        // Another rank: a clear error, nothing changed.
        let d = Lora::for_config(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg, 2).unwrap();
        let before: Vec<Tensor> = d.tensors().iter().map(|t| t.copy()).collect();
        let err = d.load(&f).unwrap_err().to_string();
        assert!(err.contains("lora.blocks.0.linear_a_q.weight") && err.contains("rank 2"), "{err}");
        for (t, b) in d.tensors().iter().zip(&before) {
            assert!(t.equal(b));
        }
    }

    #[test]
    fn finetuned_file_restores_lora_and_decoder() {
        let (_vs, sam) = tiny();
        let lora = Lora::new(&nn::VarStore::new(Device::Cpu).root(), &sam, 4).unwrap();
        randomise_b(&lora);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("finetuned.safetensors");
        save_finetuned(&f, &sam, &lora).unwrap();
        let x = images();
        let want = tch::no_grad(|| sam.forward(&x, Some(&lora)).unwrap()).low_res_logits;

        // A model with the same encoder weights but a fresh decoder and LoRA.
        let vs2 = nn::VarStore::new(Device::Cpu);
        let sam2 = Sam::new(&vs2.root(), &sam.cfg).unwrap();
        tch::no_grad(|| {
            for ((k, a), (_, b)) in sam.named_tensors().zip(sam2.named_tensors()) {
                if k.starts_with("image_encoder.") {
                    b.shallow_clone().copy_(a);
                }
            }
        });
        let lora2 = Lora::new(&nn::VarStore::new(Device::Cpu).root(), &sam2, 4).unwrap();
        load_finetuned(&f, &sam2, &lora2).unwrap();
        let got = tch::no_grad(|| sam2.forward(&x, Some(&lora2)).unwrap()).low_res_logits;
        assert!(got.equal(&want));

        // A model with another class count does not fit.
        let sam3 = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg.clone().with_num_classes(5)).unwrap();
        let err = load_finetuned(&f, &sam3, &lora2).unwrap_err().to_string();
        assert!(err.contains("mask_decoder.mask_tokens.weight"), "{err}");
    }
}
