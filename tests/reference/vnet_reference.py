"""Reference V-Net in PyTorch for the parity tests of src/nn/vnet.rs.

The architecture is the V-Net of the UA-MT / ACMT / SFR reference code (networks/vnet.py,
normalization='batchnorm'), written again here so that the state-dict keys are the ones of
those checkpoints: `block_one.conv.0.weight`, `block_one.conv.1.running_mean`, ...,
`out_conv.weight`. The optional deep-supervision heads (`out_conv_six`, `out_conv_seven`,
`out_conv_eight`: 1x1x1 convs on the outputs of block_six/seven/eight, upsampled trilinearly to
the input size) are ours; with them the model has 9,449,320 parameters for 2 classes, without
them 9,448,866.

Sub-commands (each writes into the folder given as first argument):
  make <dir> [--deep-supervision]
      builds the model with seed 0, randomises the BatchNorm running statistics and affine
      parameters (so eval mode is a real test), writes init.safetensors (state dict, strict keys),
      input.safetensors (x: [2,1,32,48,48], labels y: [2,32,48,48] int64),
      eval_out.safetensors (eval-mode logits, and aux logits when deep supervision is on),
      and, for one SGD step (lr 0.01, momentum 0.9, wd 1e-4, plain cross-entropy, train mode,
      no dropout), step.safetensors (updated state dict) and step_loss.txt.
  check <dir> <weights.safetensors> [--deep-supervision]
      loads weights written by the Rust side with strict=True and prints the maximum absolute
      difference of its eval output on input.safetensors to rust_out.safetensors.
  count
      prints the parameter counts (trainable, no running statistics) with and without heads.
  bench <threads> <batch> <d> <h> <w>
      times one training step (forward, CE, backward, SGD) in PyTorch eager, for comparison.
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def conv_bn_relu_stack(n_convs, c_in, c_out):
    layers = []
    for i in range(n_convs):
        layers += [
            nn.Conv3d(c_in if i == 0 else c_out, c_out, kernel_size=3, padding=1),
            nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class ConvBlock(nn.Module):
    def __init__(self, n_convs, c_in, c_out):
        super().__init__()
        self.conv = conv_bn_relu_stack(n_convs, c_in, c_out)

    def forward(self, x):
        return self.conv(x)


class Down(nn.Module):
    """Stride-2 2x2x2 conv + BN + ReLU (DownsamplingConvBlock)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv3d(c_in, c_out, kernel_size=2, stride=2, padding=0),
            nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class Up(nn.Module):
    """Stride-2 2x2x2 transposed conv + BN + ReLU (UpsamplingDeconvBlock)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Sequential(
            nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2, padding=0),
            nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class VNet(nn.Module):
    def __init__(self, n_channels=1, n_classes=2, n_filters=16, has_dropout=False,
                 deep_supervision=False, dropout_p=0.5):
        super().__init__()
        f = n_filters
        self.has_dropout = has_dropout
        self.deep_supervision = deep_supervision
        self.block_one = ConvBlock(1, n_channels, f)
        self.block_one_dw = Down(f, 2 * f)
        self.block_two = ConvBlock(2, 2 * f, 2 * f)
        self.block_two_dw = Down(2 * f, 4 * f)
        self.block_three = ConvBlock(3, 4 * f, 4 * f)
        self.block_three_dw = Down(4 * f, 8 * f)
        self.block_four = ConvBlock(3, 8 * f, 8 * f)
        self.block_four_dw = Down(8 * f, 16 * f)
        self.block_five = ConvBlock(3, 16 * f, 16 * f)
        self.block_five_up = Up(16 * f, 8 * f)
        self.block_six = ConvBlock(3, 8 * f, 8 * f)
        self.block_six_up = Up(8 * f, 4 * f)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f)
        self.block_seven_up = Up(4 * f, 2 * f)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f)
        self.block_eight_up = Up(2 * f, f)
        self.block_nine = ConvBlock(1, f, f)
        self.out_conv = nn.Conv3d(f, n_classes, kernel_size=1, padding=0)
        if deep_supervision:
            self.out_conv_six = nn.Conv3d(8 * f, n_classes, kernel_size=1)
            self.out_conv_seven = nn.Conv3d(4 * f, n_classes, kernel_size=1)
            self.out_conv_eight = nn.Conv3d(2 * f, n_classes, kernel_size=1)
        self.dropout = nn.Dropout3d(p=dropout_p, inplace=False)

    def forward(self, x, with_aux=False):
        size = x.shape[2:]
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.block_nine(self.block_eight_up(x8) + x1)
        if self.has_dropout:
            x9 = self.dropout(x9)
        out = self.out_conv(x9)
        if not with_aux:
            return out
        aux = [
            F.interpolate(head(feat), size=size, mode="trilinear", align_corners=False)
            for head, feat in ((self.out_conv_six, x6), (self.out_conv_seven, x7),
                               (self.out_conv_eight, x8))
        ]
        return out, aux


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise_bn(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(7)


def state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def make(out_dir, ds):
    torch.manual_seed(0)
    model = VNet(n_channels=1, n_classes=2, deep_supervision=ds)
    gen = torch.Generator().manual_seed(1)
    randomise_bn(model, gen)
    save_file(state(model), f"{out_dir}/init.safetensors")

    x = torch.randn(2, 1, 32, 48, 48, generator=gen)
    y = (torch.rand(2, 32, 48, 48, generator=gen) > 0.6).long()
    save_file({"x": x, "y": y}, f"{out_dir}/input.safetensors")

    model.eval()
    with torch.no_grad():
        if ds:
            out, aux = model(x, with_aux=True)
            save_file({"out": out, "aux0": aux[0], "aux1": aux[1], "aux2": aux[2]},
                      f"{out_dir}/eval_out.safetensors")
        else:
            save_file({"out": model(x)}, f"{out_dir}/eval_out.safetensors")

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    save_file(state(model), f"{out_dir}/step.safetensors")
    with open(f"{out_dir}/step_loss.txt", "w") as f:
        f.write(f"{loss.item():.9g}\n")


def check(out_dir, weights, ds):
    model = VNet(n_channels=1, n_classes=2, deep_supervision=ds)
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    x = load_file(f"{out_dir}/input.safetensors")["x"]
    with torch.no_grad():
        out = model(x)
    ref = load_file(f"{out_dir}/rust_out.safetensors")["out"]
    print(f"{(out - ref).abs().max().item():.6g} {ref.abs().max().item():.6g}")


def bench(threads, b, d, h, w):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = VNet(n_channels=1, n_classes=2, has_dropout=True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(b, 1, d, h, w)
    y = (torch.rand(b, d, h, w) > 0.5).long()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    print(" ".join(f"{t:.3f}" for t in times))


if __name__ == "__main__":
    cmd = sys.argv[1]
    ds = "--deep-supervision" in sys.argv
    if cmd == "make":
        make(sys.argv[2], ds)
    elif cmd == "check":
        check(sys.argv[2], sys.argv[3], ds)
    elif cmd == "count":
        print(n_params(VNet(1, 2)), n_params(VNet(1, 2, deep_supervision=True)))
    elif cmd == "bench":
        bench(*(int(a) for a in sys.argv[2:7]))
    else:
        sys.exit(f"unknown command {cmd}")
