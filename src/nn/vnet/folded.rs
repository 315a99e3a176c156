//! The V-Net for inference only: every BatchNorm folded into the convolution before it, weights
//! and activations in channels-last (NDHWC) strides, ReLU and the additive skips in place.
//!
//! Why: in eval mode a BatchNorm is a per-channel affine map, so `BN(conv(x)) = conv'(x)` with
//! `w' = w·γ/√(σ²+ε)` and `b' = (b−μ)·γ/√(σ²+ε) + β`, one pass over every activation less. And
//! libtorch's CPU convolutions (oneDNN) work in a channels-last layout internally: given
//! NCDHW tensors they reorder input and output at every call, given channels-last strides they
//! do not. Measured on a 2-core CPU, 16-filter V-Net, 112×112×80 windows in PyTorch 2.13:
//! 1.34 s per window eval-mode at batch 1, 0.71 s per window folded + channels-last at batch 2
//! (`sfr bench --only segment` measures the whole-volume path). The logits differ from
//! [`VNet::f_forward_t`] only by rounding (~1e-6).
//!
//! A snapshot: built from the network's current weights by [`VNet::folded`]; later training of
//! the network does not reach it.
use tch::{Kind, Tensor};

use super::{BatchNorm, Block, Conv, VNet};
use crate::error::Result;

/// `[N, C, D, H, W]` with channels-last strides (PyTorch's `channels_last_3d`), same values.
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 4, 1]).contiguous().permute([0, 4, 1, 2, 3])
}

#[derive(Debug)]
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    transposed: bool,
}

impl FoldedConv {
    /// `conv` followed by `bn` (eval mode) as one convolution; `bn = None` keeps `conv` as it is.
    fn new(conv: &Conv, bn: Option<&BatchNorm>) -> FoldedConv {
        tch::no_grad(|| {
            let w = conv.weight.to_kind(Kind::Float).detach();
            let b = conv.bias.to_kind(Kind::Float).detach();
            let (weight, bias) = match bn {
                None => (w, b),
                Some(bn) => {
                    let scale = bn.weight.detach() / (bn.running_var.detach() + 1e-5).sqrt();
                    // The output channels are dimension 0 of a conv weight [out, in, k, k, k] and
                    // dimension 1 of a transposed one [in, out, k, k, k].
                    let shape: [i64; 5] = if conv.transposed { [1, -1, 1, 1, 1] } else { [-1, 1, 1, 1, 1] };
                    let w = w * scale.view(shape);
                    let b = (b - bn.running_mean.detach()) * &scale + bn.bias.detach();
                    (w, b)
                }
            };
            FoldedConv { weight: channels_last(&weight), bias, stride: conv.stride, padding: conv.padding, transposed: conv.transposed }
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = [self.stride; 3];
        let p = [self.padding; 3];
        if self.transposed {
            x.conv_transpose3d(&self.weight, Some(&self.bias), s, p, [0i64; 3], 1, [1i64; 3])
        } else {
            x.conv3d(&self.weight, Some(&self.bias), s, p, [1i64; 3], 1)
        }
    }
}

#[derive(Debug)]
struct FoldedBlock(Vec<FoldedConv>);

impl FoldedBlock {
    fn new(block: &Block) -> FoldedBlock {
        FoldedBlock(block.layers.iter().map(|(c, bn)| FoldedConv::new(c, Some(bn))).collect())
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for conv in &self.0 {
            x = conv.forward(&x);
            let _ = x.relu_();
        }
        x
    }

    /// `forward(up) + skip`'s block input: the upsampling block's output with `skip` added in place.
    fn forward_add(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        let mut y = self.forward(x);
        let _ = y.g_add_(skip);
        y
    }
}

/// See the module documentation. Forward only, no gradients, f32.
#[derive(Debug)]
pub struct FoldedVNet {
    /// The 17 blocks in the order of [`VNet`]'s fields (encoder, bottleneck, decoder).
    blocks: Vec<FoldedBlock>,
    out_conv: FoldedConv,
}

impl VNet {
    /// An inference-only copy of the current weights with BatchNorm folded into the
    /// convolutions (see [`FoldedVNet`]); its logits equal `f_forward_t(x, false)`'s up to rounding.
    pub fn folded(&self) -> FoldedVNet {
        let blocks = [
            &self.block_one,
            &self.block_one_dw,
            &self.block_two,
            &self.block_two_dw,
            &self.block_three,
            &self.block_three_dw,
            &self.block_four,
            &self.block_four_dw,
            &self.block_five,
            &self.block_five_up,
            &self.block_six,
            &self.block_six_up,
            &self.block_seven,
            &self.block_seven_up,
            &self.block_eight,
            &self.block_eight_up,
            &self.block_nine,
        ]
        .iter()
        .map(|b| FoldedBlock::new(b))
        .collect();
        FoldedVNet { blocks, out_conv: FoldedConv::new(&self.out_conv, None) }
    }
}

impl FoldedVNet {
    /// Logits `[B, num_classes, nz, ny, nx]` (f32, contiguous) of `x`, checked as
    /// [`VNet::check_input`] checks it against `net` (the network this was folded from).
    pub fn f_forward(&self, net: &VNet, x: &Tensor) -> Result<Tensor> {
        net.check_input(x)?;
        Ok(tch::no_grad(|| self.run(x)))
    }

    fn run(&self, x: &Tensor) -> Tensor {
        let b = &self.blocks;
        let x = channels_last(&x.to_kind(Kind::Float));
        let x1 = b[0].forward(&x);
        let x2 = b[2].forward(&b[1].forward(&x1));
        let x3 = b[4].forward(&b[3].forward(&x2));
        let x4 = b[6].forward(&b[5].forward(&x3));
        let x5 = b[8].forward(&b[7].forward(&x4));
        let x6 = b[10].forward(&b[9].forward_add(&x5, &x4));
        drop((x5, x4));
        let x7 = b[12].forward(&b[11].forward_add(&x6, &x3));
        drop((x6, x3));
        let x8 = b[14].forward(&b[13].forward_add(&x7, &x2));
        drop((x7, x2));
        let x9 = b[16].forward(&b[15].forward_add(&x8, &x1));
        drop((x8, x1));
        self.out_conv.forward(&x9).contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::vnet::VNetConfig;
    use tch::{nn, Device};

    /// Folding and the channels-last layout change rounding only: with non-trivial BatchNorm
    /// statistics and affine parameters (identity BN would hide a wrong fold), in every block
    /// (transposed convs included), the logits match the eval-mode forward.
    #[test]
    fn folded_network_computes_the_eval_forward() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = VNet::new(&vs.root(), &VNetConfig { n_filters: 4, num_classes: 3, ..VNetConfig::default() }).unwrap();
        tch::no_grad(|| {
            for (k, t) in net.state_dict() {
                let mut t = t;
                if k.ends_with("running_var") {
                    let _ = t.copy_(&(Tensor::rand_like(&t) * 2.0 + 0.3));
                } else if k.ends_with("running_mean") || (k.contains(".conv.") && k.ends_with(".bias")) {
                    let _ = t.copy_(&(Tensor::randn_like(&t) * 0.5));
                } else if k.ends_with(".weight") && t.dim() == 1 {
                    let _ = t.copy_(&(Tensor::rand_like(&t) + 0.5));
                }
            }
        });
        let folded = net.folded();
        let x = Tensor::randn([2, 1, 16, 32, 48], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| net.f_forward_t(&x, false)).unwrap();
        let got = folded.f_forward(&net, &x).unwrap();
        assert_eq!(got.size(), vec![2, 3, 16, 32, 48]);
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale.max(1.0), "max |folded - eval| = {diff} (logits up to {scale})");
        // A wrong input is refused as by the network itself.
        assert!(folded.f_forward(&net, &Tensor::zeros([1, 1, 15, 16, 16], (Kind::Float, Device::Cpu))).is_err());
    }
}
