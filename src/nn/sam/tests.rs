//! Tests of the SAM model: configurations, forward pass, checkpoint loading, and LoRA on its
//! encoders (ViT and TinyViT).
use super::*;

#[test]
fn models_can_move_to_worker_threads() {
    fn send<T: Send>() {}
    send::<Sam>();
    send::<crate::nn::lora::Lora>();
}

/// One vit_b build serves every check that needs it (a build initialises 94M values).
#[test]
fn vit_b_parameter_count_and_vit_l_checkpoint_error() {
    let vs = nn::VarStore::new(Device::Cpu);
    let sam = Sam::new(&vs.root(), &SamConfig::vit_b()).unwrap();
    assert_eq!(sam.num_parameters(), 93_735_472);
    assert_eq!(sam.named_tensors().count(), 314, "keys of the official state dict");
    assert_eq!(sam.tensor("image_encoder.blocks.2.attn.rel_pos_h").unwrap().size(), vec![127, 64]);
    assert_eq!(sam.tensor("image_encoder.blocks.0.attn.rel_pos_h").unwrap().size(), vec![27, 64]);

    // A vit_l state dict (shapes only: stride-0 views cost no memory) given to vit_b.
    let zero = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let map = |d: i64| match d {
        768 => 1024,
        2304 => 3072,
        3072 => 4096,
        d => d,
    };
    let mut file = Vec::new();
    for (k, t) in sam.named_tensors() {
        let shape: Vec<i64> = if k.starts_with("image_encoder.") { t.size().into_iter().map(map).collect() } else { t.size() };
        file.push((k.to_string(), zero.expand(shape.as_slice(), false)));
        if let Some(rest) = k.strip_prefix("image_encoder.blocks.0.") {
            for b in 12..24 {
                let shape: Vec<i64> = t.size().into_iter().map(map).collect();
                file.push((format!("image_encoder.blocks.{b}.{rest}"), zero.expand(shape.as_slice(), false)));
            }
        }
    }
    let before = sam.tensor("mask_decoder.iou_token.weight").unwrap().copy();
    let err = sam.load_tensors(file, Path::new("sam_vit_l_0b3195.pth"), HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.starts_with("sam_vit_l_0b3195.pth: checkpoint does not fit SAM 'vit_b'"), "{err}");
    assert!(err.contains("looks like SAM vit_l (embed dim 1024, 24 blocks)"), "{err}");
    assert!(err.contains("image_encoder.blocks.0.attn.proj.weight: [1024, 1024] in the file, [768, 768] in the model"), "{err}");
    assert!(err.contains("not in the model: image_encoder.blocks.12."), "{err}");
    assert!(sam.tensor("mask_decoder.iou_token.weight").unwrap().equal(&before), "nothing loaded on error");
}

#[test]
fn official_configs() {
    let b = SamConfig::vit_b();
    assert_eq!((b.encoder_embed_dim, b.encoder_depth, b.encoder_num_heads, b.window_size), (768, 12, 12, 14));
    assert_eq!(b.encoder_global_attn_indexes, vec![2, 5, 8, 11]);
    assert_eq!((b.grid_size(), b.low_res_size(), b.num_mask_tokens()), (64, 256, 4));
    let l = SamConfig::vit_l();
    assert_eq!((l.encoder_embed_dim, l.encoder_depth, l.encoder_num_heads), (1024, 24, 16));
    assert_eq!(l.encoder_global_attn_indexes, vec![5, 11, 17, 23]);
    let h = SamConfig::vit_h();
    assert_eq!((h.encoder_embed_dim, h.encoder_depth, h.encoder_num_heads), (1280, 32, 16));
    assert_eq!(h.encoder_global_attn_indexes, vec![7, 15, 23, 31]);
    for c in [b, l, h, SamConfig::tiny()] {
        c.validate().unwrap();
        assert_eq!(SamConfig::from_name(&c.name).unwrap(), c);
    }
    assert!(SamConfig::from_name("vit_x").is_err());
    let e = SamConfig::vit_b().with_image_size(500).validate().unwrap_err().to_string();
    assert!(e.contains("image_size 500 is not a multiple of patch_size 16"), "{e}");
    assert!(SamConfig::vit_b().with_num_classes(0).validate().is_err());
    let mut c = SamConfig::tiny();
    c.encoder_global_attn_indexes = vec![4];
    assert!(c.validate().unwrap_err().to_string().contains("global attention index 4"));
    // JSON round trip; unknown keys are refused.
    let j = serde_json::to_string(&SamConfig::vit_b().with_num_classes(8)).unwrap();
    assert_eq!(serde_json::from_str::<SamConfig>(&j).unwrap().num_classes, 8);
    assert!(serde_json::from_str::<SamConfig>(&j.replace("\"name\"", "\"nmae\"")).is_err());
}

#[test]
fn forward_shapes_probabilities_and_bad_input() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    // Placed below a prefix: names get the prefix, the model's own keys do not.
    let sam = Sam::new(&vs.root().sub("sam"), &SamConfig::tiny().with_num_classes(2)).unwrap();
    assert!(vs.variables().contains_key("sam.image_encoder.pos_embed"));
    assert!(sam.tensor("image_encoder.pos_embed").is_some());
    let x = Tensor::randn([3, 3, 128, 128], (Kind::Float, Device::Cpu));
    let o = tch::no_grad(|| sam.forward(&x, None)).unwrap();
    assert_eq!(o.low_res_logits.size(), vec![3, 3, 32, 32]);
    assert_eq!(o.iou_predictions.size(), vec![3, 3]);
    let p = class_probabilities(&o.low_res_logits, (128, 128));
    assert_eq!(p.size(), vec![3, 3, 128, 128]);
    let s = p.sum_dim_intlist(1, false, Kind::Float);
    assert!(f64::try_from((s - 1.0).abs().max()).unwrap() < 1e-5);
    // Images are independent in a batch: image 1 alone gives the same logits.
    let one = tch::no_grad(|| sam.forward(&x.narrow(0, 1, 1), None)).unwrap();
    let d = f64::try_from((one.low_res_logits - o.low_res_logits.narrow(0, 1, 1)).abs().max()).unwrap();
    assert!(d < 1e-5, "batch mixing: {d}");
    // Upsampling is bilinear with align_corners = false: a constant stays constant and a
    // 2× upsample of [0, 1] along a row gives [0, .25, .75, 1].
    let row = Tensor::from_slice(&[0f32, 1.0]).view([1, 1, 1, 2]);
    let up = upscale_logits(&row, (1, 4));
    assert_eq!(Vec::<f32>::try_from(up.flatten(0, -1)).unwrap(), vec![0.0, 0.25, 0.75, 1.0]);

    for bad in [Tensor::zeros([2, 3, 64, 64], (Kind::Float, Device::Cpu)), Tensor::zeros([2, 1, 128, 128], (Kind::Float, Device::Cpu)), Tensor::zeros([3, 128, 128], (Kind::Float, Device::Cpu)), Tensor::zeros([0, 3, 128, 128], (Kind::Float, Device::Cpu)), Tensor::zeros([1, 3, 128, 128], (Kind::Int64, Device::Cpu))] {
        assert!(sam.forward(&bad, None).is_err(), "{:?} {:?}", bad.size(), bad.kind());
    }
    assert!(sam.decode(&Tensor::zeros([1, 16, 8, 8], (Kind::Float, Device::Cpu))).is_err());

    // `SamPrompt`: none is `decode`; a canvas box is one box [0, 0, S-1, S-1] per image, and it
    // changes the masks (the decoder sees two more tokens).
    let emb = tch::no_grad(|| sam.encode_image(&x, None)).unwrap();
    let plain = tch::no_grad(|| sam.decode(&emb)).unwrap().low_res_logits;
    let none = tch::no_grad(|| sam.decode_prompted(&emb, SamPrompt::None)).unwrap().low_res_logits;
    assert!(plain.equal(&none));
    let boxed = tch::no_grad(|| sam.decode_prompted(&emb, SamPrompt::CanvasBox)).unwrap().low_res_logits;
    let full = Tensor::from_slice(&[0f32, 0.0, 127.0, 127.0]).view([1, 4]).repeat([3, 1]);
    let want = tch::no_grad(|| sam.decode_with_boxes(&emb, &full)).unwrap().low_res_logits;
    assert!(boxed.equal(&want));
    assert!(f64::try_from((&boxed - &plain).abs().max()).unwrap() > 1e-4, "the box changes the masks");
    let via_forward = tch::no_grad(|| sam.forward_prompted(&x, None, SamPrompt::CanvasBox)).unwrap().low_res_logits;
    assert!(f64::try_from((via_forward - &boxed).abs().max()).unwrap() < 1e-6);

    // Our own save loads back one to one, with the config in the metadata.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sam.safetensors");
    sam.save_safetensors(&f).unwrap();
    let back = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg).unwrap();
    let rep = back.load_checkpoint(&f, HeadPolicy::ReinitMismatched).unwrap();
    assert_eq!((rep.loaded, rep.reinitialised.len()), (sam.named_tensors().count(), 0));
    for ((k, a), (_, b)) in sam.named_tensors().zip(back.named_tensors()) {
        assert!(a.equal(b), "{k}");
    }
    let (_, meta) = crate::nn::weights::read_safetensors_with_metadata(&f).unwrap();
    assert_eq!(serde_json::from_str::<SamConfig>(&meta["sam_config"]).unwrap(), sam.cfg);
    let lvit = crate::nn::lora::Lora::for_config(&vs.root().sub("lora"), &SamConfig::vit_b(), 1).unwrap();
    assert!(sam.forward(&x, Some(&lvit)).unwrap_err().to_string().contains("does not fit"));
}

#[test]
fn class_heads_from_the_single_mask_token() {
    tch::manual_seed(3);
    let official = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny()).unwrap();
    let file: HashMap<String, Tensor> = official.named_tensors().map(|(k, t)| (k.to_string(), t.detach().copy())).collect();
    let sam = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny().with_num_classes(2)).unwrap();
    let rep = sam.load_tensors(file.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), Path::new("official.pth"), HeadPolicy::ReinitMismatched).unwrap();
    assert!(!rep.reinitialised.is_empty());
    let x = Tensor::randn([1, 3, 128, 128], (Kind::Float, Device::Cpu));
    let before = tch::no_grad(|| sam.forward(&x, None)).unwrap().low_res_logits;
    sam.init_heads_from_token(&file, Path::new("official.pth"), 0).unwrap();
    let tokens = sam.tensor("mask_decoder.mask_tokens.weight").unwrap();
    for i in 0..3 {
        assert!(tokens.get(i).equal(&file["mask_decoder.mask_tokens.weight"].get(0)));
    }
    assert!(sam.tensor("mask_decoder.output_hypernetworks_mlps.2.layers.1.weight").unwrap().equal(&file["mask_decoder.output_hypernetworks_mlps.0.layers.1.weight"]));
    // Identical tokens and heads give every class the same logits (the probabilities start
    // uniform; the loss separates them), unlike the random heads before.
    let after = tch::no_grad(|| sam.forward(&x, None)).unwrap().low_res_logits;
    for c in 1..3 {
        let d = f64::try_from((after.narrow(1, c, 1) - after.narrow(1, 0, 1)).abs().max()).unwrap();
        assert!(d < 1e-4, "class {c}: {d}");
    }
    assert!(!before.allclose(&after, 1e-3, 1e-3, false));
    let mut short: HashMap<String, Tensor> = file.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    short.remove("mask_decoder.output_hypernetworks_mlps.0.layers.2.bias");
    let err = sam.init_heads_from_token(&short, Path::new("x.pth"), 0).unwrap_err().to_string();
    assert!(err.contains("x.pth") && err.contains("layers.2.bias is missing"), "{err}");
}

#[test]
fn rel_pos_helpers_match_their_definitions() {
    // get_rel_pos with equal sizes indexes table[i - j + (k - 1)].
    let table = Tensor::arange(5, (Kind::Float, Device::Cpu)).view([5, 1]);
    let r = image_encoder::get_rel_pos(3, 3, &table).view([3, 3]);
    assert_eq!(Vec::<f32>::try_from(r.flatten(0, -1)).unwrap(), vec![2., 1., 0., 3., 2., 1., 4., 3., 2.]);
    // Window partition and unpartition are inverse, padding included.
    let x = Tensor::randn([2, 5, 7, 3], (Kind::Float, Device::Cpu));
    let (w, pad) = image_encoder::window_partition(&x, 3);
    assert_eq!(pad, (6, 9));
    assert_eq!(w.size(), vec![2 * 2 * 3, 3, 3, 3]);
    assert!(image_encoder::window_unpartition(&w, 3, pad, (5, 7)).equal(&x));
    // Resizing a linear ramp along the table length keeps it linear.
    let ramp = Tensor::arange(9, (Kind::Float, Device::Cpu)).view([9, 1]).repeat([1, 2]);
    let r = resize_rel_pos(&ramp, 5);
    assert_eq!(r.size(), vec![5, 2]);
    let v = Vec::<f32>::try_from(r.select(1, 0)).unwrap();
    for w in v.windows(2) {
        assert!((w[1] - w[0] - 1.8).abs() < 1e-5, "{v:?}");
    }
}

// ------------------------------------------------------------------ LoRA on SAM's encoders
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
    sam.save_finetuned(&f, &lora).unwrap();
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
    sam2.load_finetuned(&f, &lora2).unwrap();
    let got = tch::no_grad(|| sam2.forward(&x, Some(&lora2)).unwrap()).low_res_logits;
    assert!(got.equal(&want));

    // A model with another class count does not fit.
    let sam3 = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg.clone().with_num_classes(5)).unwrap();
    let err = sam3.load_finetuned(&f, &lora2).unwrap_err().to_string();
    assert!(err.contains("mask_decoder.mask_tokens.weight"), "{err}");
}

/// Splitting the encoder before any attention block and running the two parts gives the full
/// forward bit for bit (with a non-zero LoRA, so the LoRA'd blocks are where they should be),
/// for SAM's ViT and for TinyViT, whose blocks cross stages and PatchMergings.
#[test]
fn encoder_prefix_then_suffix_is_the_forward() {
    let (_vs, vit) = tiny();
    tch::manual_seed(11);
    let tvs = nn::VarStore::new(Device::Cpu);
    let tiny_vit = Sam::new(&tvs.root(), &SamConfig::lite_medsam().with_num_classes(2).with_image_size(64)).unwrap();
    for (sam, size) in [(&vit, 128), (&tiny_vit, 64)] {
        let lvs = nn::VarStore::new(Device::Cpu);
        let lora = Lora::new(&lvs.root(), sam, 4).unwrap();
        randomise_b(&lora);
        let x = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
        let full = tch::no_grad(|| sam.encode_image(&x, Some(&lora)).unwrap());
        let n = sam.image_encoder.num_attention_blocks();
        assert_eq!(n, sam.cfg.attention_blocks().len());
        for k in 0..=n {
            let split = tch::no_grad(|| {
                let state = sam.encode_prefix(&x, Some(&lora), k).unwrap();
                sam.encode_suffix(&state, Some(&lora), k).unwrap()
            });
            assert!(split.equal(&full), "{}: split before block {k} of {n} differs", sam.cfg.name);
        }
        // Without LoRA in the suffix, the output changes: LoRA of the later blocks acts there.
        let state = tch::no_grad(|| sam.encode_prefix(&x, Some(&lora), n - 1).unwrap());
        let plain = tch::no_grad(|| sam.encode_suffix(&state, None, n - 1).unwrap());
        assert!(!plain.equal(&full), "{}: the last block's LoRA must act in the suffix", sam.cfg.name);
        assert!(sam.encode_prefix(&x, None, n + 1).is_err(), "no block {} in {}", n + 1, sam.cfg.name);
    }
}
