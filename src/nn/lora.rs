//! LoRA on fused qkv projections, as SAMed's `_LoRA_qkv`:
//! `qkv(x) + [B_q·A_q·x, 0, B_v·A_v·x]` — rank-r updates of the q and v thirds of every block's
//! qkv output, nothing on k. A block whose fused qkv is laid out per head (`[q_h | k_h | v_h]`
//! for each head h, as a TinyViT's) gets the q and v updates on each head's q and v slices.
//! A is kaiming-uniform (`a = √5`, `nn.Linear`'s default, i.e. U(±1/√dim)), B is zero, and there
//! is no scaling factor, so a fresh LoRA leaves the model unchanged.
//!
//! Generic over the model: a model lists its blocks through [`QkvBlocks`] and lends its qkv
//! weights and freezing through [`LoraHost`] (SAM's ViT and TinyViT encoders implement them in
//! `nn::sam`); nothing here knows SAM.
//!
//! Tensor names (in the VarStore below the path given to [`Lora::new`], and in files with a
//! `lora.` prefix): `blocks.{i}.linear_a_q.weight` [r, dim], `blocks.{i}.linear_b_q.weight`
//! [dim, r], `blocks.{i}.linear_a_v.weight`, `blocks.{i}.linear_b_v.weight` — SAMed's module
//! names. [`Lora::load`] also reads SAMed's own files, whose keys are `w_a_{n:03}` /
//! `w_b_{n:03}` with n = 2·block for q and 2·block + 1 for v.
use crate::error::{Error, Result};
use crate::nn::layers::{InitRule, ParamEntry, Params};
use crate::nn::weights::{load_tensors, save_safetensors};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Tensor};

/// One attention block's fused qkv projection (a Linear from `dim` to 3·`dim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvBlock {
    pub dim: i64,
    pub heads: i64,
    /// The output is laid out per head (`[q_h | k_h | v_h]` for each head, TinyViT), else
    /// `[q | k | v]` (ViT).
    pub per_head: bool,
}

/// A model (or its configuration) whose attention blocks LoRA can adapt.
pub trait QkvBlocks {
    /// Every block's fused qkv, in LoRA order.
    fn qkv_blocks(&self) -> Vec<QkvBlock>;
    /// The model, for messages ("SAM 'vit_b'").
    fn describe(&self) -> String;
}

/// A built model LoRA attaches to.
pub trait LoraHost: QkvBlocks {
    /// The weight [3·dim, dim] of every block's fused qkv, in `qkv_blocks` order.
    fn qkv_weights(&self) -> Vec<&Tensor>;
    /// Freezes the adapted part (SAM: the image encoder), as SAMed's `LoRA_Sam` does.
    fn freeze_adapted(&self);
}

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

/// Rank-r LoRA on q and v of every block's fused qkv.
#[derive(Debug)]
pub struct Lora {
    pub rank: i64,
    pub blocks: Vec<LoraBlock>,
    /// The blocks it was made for.
    spec: Vec<QkvBlock>,
    entries: Vec<ParamEntry>,
}

impl Lora {
    /// Creates LoRA tensors for `model` in `path` (best in a VarStore of its own, so the model's
    /// VarStore keeps exactly its official keys) and, like SAMed's `LoRA_Sam`, freezes the
    /// adapted part: for SAM, the trainable tensors are then the LoRA's, the prompt encoder's
    /// and the mask decoder's.
    pub fn new(path: &nn::Path, model: &(impl LoraHost + ?Sized), rank: i64) -> Result<Lora> {
        let lora = Self::for_config(path, model, rank)?;
        model.freeze_adapted();
        Ok(lora)
    }

    /// The LoRA tensors alone, for the blocks of `cfg` (a model or its configuration; no
    /// freezing).
    pub fn for_config(path: &nn::Path, cfg: &(impl QkvBlocks + ?Sized), rank: i64) -> Result<Lora> {
        if rank < 1 {
            return Err(Error::invalid(format!("LoRA rank must be at least 1 (got {rank})")));
        }
        let spec = cfg.qkv_blocks();
        let p = Params::root(path);
        let blocks = spec
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let dim = q.dim;
                let a = InitRule::Uniform(1.0 / (dim as f64).sqrt());
                let b = p.sub("blocks").sub(i);
                LoraBlock {
                    linear_a_q: b.sub("linear_a_q").param("weight", &[rank, dim], a),
                    linear_b_q: b.sub("linear_b_q").param("weight", &[dim, rank], InitRule::Zeros),
                    linear_a_v: b.sub("linear_a_v").param("weight", &[rank, dim], a),
                    linear_b_v: b.sub("linear_b_v").param("weight", &[dim, rank], InitRule::Zeros),
                    dim,
                    per_head: q.per_head.then_some(q.heads),
                }
            })
            .collect();
        Ok(Lora { rank, blocks, spec, entries: p.take_entries() })
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

    /// Checks that this LoRA was made for the blocks of `cfg`.
    pub fn check_fits(&self, cfg: &(impl QkvBlocks + ?Sized)) -> Result<()> {
        let want = cfg.qkv_blocks();
        if self.spec != want {
            let widths = |s: &[QkvBlock]| s.iter().map(|b| b.dim).collect::<Vec<_>>();
            return Err(Error::invalid(format!(
                "LoRA for {} blocks of widths {:?} does not fit {} ({} blocks of widths {:?})",
                self.blocks.len(),
                widths(&self.spec),
                cfg.describe(),
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

    /// The tensors under their file keys (`lora.…`), detached.
    pub fn file_tensors(&self) -> Vec<(String, Tensor)> {
        self.entries.iter().map(|e| (format!("{FILE_PREFIX}{}", e.key), e.tensor.detach())).collect()
    }

    /// `lora_rank`, `lora_blocks` and `lora_dim`, for file metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("lora_rank".to_string(), self.rank.to_string()),
            ("lora_blocks".to_string(), self.blocks.len().to_string()),
            ("lora_dim".to_string(), self.spec.iter().map(|b| b.dim.to_string()).collect::<Vec<_>>().join(",")),
        ])
    }

    /// Reads LoRA tensors from a file written by [`Lora::save`] (or `Sam::save_finetuned`) or by SAMed
    /// (`w_a_000`, ... ; `.pth` or `.safetensors`). Other keys in the file are ignored. Every LoRA
    /// tensor must be present with this LoRA's shape (same rank and encoder), else nothing is
    /// changed and the error names the keys.
    pub fn load(&self, file: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = load_tensors(file)?.into_iter().collect();
        self.load_from(&tensors, file)
    }

    /// As [`Lora::load`], from tensors already read from `file`.
    pub fn load_from(&self, tensors: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
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

    /// Folds B·A into the q and v rows of every block's qkv weight, for inference without the
    /// LoRA branch. Consumes the LoRA so the update cannot be applied twice.
    pub fn merge(self, model: &(impl LoraHost + ?Sized)) -> Result<()> {
        self.check_fits(model)?;
        let weights = model.qkv_weights();
        if weights.len() != self.blocks.len() {
            return Err(Error::invalid(format!("{} has {} qkv weights for {} LoRA blocks", model.describe(), weights.len(), self.blocks.len())));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A stand-in model: one fused qkv Linear (no bias) per block.
    struct Blocks {
        qkv: Vec<Tensor>,
        blocks: Vec<QkvBlock>,
    }

    impl QkvBlocks for Blocks {
        fn qkv_blocks(&self) -> Vec<QkvBlock> {
            self.blocks.clone()
        }
        fn describe(&self) -> String {
            "the test model".into()
        }
    }

    impl LoraHost for Blocks {
        fn qkv_weights(&self) -> Vec<&Tensor> {
            self.qkv.iter().collect()
        }
        fn freeze_adapted(&self) {
            for w in &self.qkv {
                let _ = w.set_requires_grad(false);
            }
        }
    }

    fn model(per_head: bool) -> Blocks {
        let blocks = vec![QkvBlock { dim: 8, heads: 2, per_head }, QkvBlock { dim: 12, heads: 3, per_head }];
        let qkv = blocks.iter().map(|b| Tensor::randn([3 * b.dim, b.dim], (Kind::Float, Device::Cpu)).set_requires_grad(true)).collect();
        Blocks { qkv, blocks }
    }

    /// The qkv outputs of every block with the LoRA branch (`add_to_qkv`).
    fn outputs(m: &Blocks, lora: Option<&Lora>, xs: &[Tensor]) -> Vec<Tensor> {
        m.qkv
            .iter()
            .zip(xs)
            .enumerate()
            .map(|(i, (w, x))| {
                let qkv = x.linear(w, None::<Tensor>);
                match lora {
                    Some(l) => l.blocks[i].add_to_qkv(qkv, x),
                    None => qkv,
                }
            })
            .collect()
    }

    #[test]
    fn lora_touches_only_q_and_v_and_merging_equals_the_branch() {
        for per_head in [false, true] {
            tch::manual_seed(3);
            let m = model(per_head);
            let lora = Lora::new(&nn::VarStore::new(Device::Cpu).root(), &m, 2).unwrap();
            assert!(m.qkv.iter().all(|w| !w.requires_grad()), "the adapted weights are frozen");
            assert_eq!(lora.num_parameters(), 4 * 2 * (8 + 12));
            let xs: Vec<Tensor> = m.blocks.iter().map(|b| Tensor::randn([5, b.dim], (Kind::Float, Device::Cpu))).collect();
            let plain = tch::no_grad(|| outputs(&m, None, &xs));
            let fresh = tch::no_grad(|| outputs(&m, Some(&lora), &xs));
            for (a, b) in plain.iter().zip(&fresh) {
                assert!(a.equal(b), "B = 0: a fresh LoRA changes nothing");
            }
            tch::no_grad(|| {
                for (k, t) in lora.named_tensors() {
                    if k.contains("linear_b") {
                        t.shallow_clone().copy_(&Tensor::randn(t.size(), (Kind::Float, Device::Cpu)));
                    }
                }
            });
            let with = tch::no_grad(|| outputs(&m, Some(&lora), &xs));
            for ((p, w), b) in plain.iter().zip(&with).zip(&m.blocks) {
                let d = b.dim;
                let h = if per_head { b.heads } else { 1 };
                // [.., heads, 3, head_dim] (ViT: one "head" of the full width): k is untouched.
                let (p, w) = (p.view([5, h, 3, d / h]), w.view([5, h, 3, d / h]));
                assert!(p.select(2, 1).equal(&w.select(2, 1)), "k must not change");
                for slot in [0, 2] {
                    let change = f64::try_from((w.select(2, slot) - p.select(2, slot)).abs().max()).unwrap();
                    assert!(change > 1e-3, "slot {slot} must change (per_head {per_head})");
                }
            }
            lora.merge(&m).unwrap();
            let merged = tch::no_grad(|| outputs(&m, None, &xs));
            for (a, b) in merged.iter().zip(&with) {
                let err = f64::try_from((a - b).abs().max()).unwrap();
                assert!(err < 1e-4, "merged vs branch: {err} (per_head {per_head})");
            }
        }
    }

    #[test]
    fn a_lora_for_other_blocks_does_not_fit() {
        let m = model(false);
        let other = Blocks { qkv: vec![], blocks: vec![QkvBlock { dim: 8, heads: 2, per_head: false }] };
        let lora = Lora::for_config(&nn::VarStore::new(Device::Cpu).root(), &other, 4).unwrap();
        let e = lora.check_fits(&m).unwrap_err().to_string();
        assert!(e.contains("LoRA for 1 blocks of widths [8] does not fit the test model (2 blocks of widths [8, 12])"), "{e}");
        assert!(Lora::for_config(&nn::VarStore::new(Device::Cpu).root(), &m, 0).is_err());
        assert!(lora.merge(&m).is_err());
    }
}
