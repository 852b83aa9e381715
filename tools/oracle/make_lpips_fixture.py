#!/usr/bin/env python3
"""LPIPS fixtures: the `lpips` package's VGG variant on seeded random weights at reduced width.

Usage (from the repository root; the `lpips` package and a torchvision matching torch):

    python tools/oracle/make_lpips_fixture.py fixtures/lpips

Builds `lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True)`, swaps every VGG16
convolution of its five slices for one of the same topology at widths 8/16/24/32/32 (and its
five linear heads to match, with non-negative weights as trained LPIPS heads are), so that the
fixture stays small while the package's own code computes the distances: the scaling layer,
channel normalisation, squared differences, 1×1 heads and spatial averages. Writes
`weights.safetensors` (the LPIPS state dict, keys as the package names them) and
`cases.safetensors`: per case `NAME.in0`, `NAME.in1` (images in [-1, 1]), `NAME.distance`
([B]) and `NAME.grad_in0` (d sum(distance) / d in0). Read by `crates/ldm-train/tests/lpips.rs`.
"""

from __future__ import annotations

import os
import sys

import lpips
import torch
from safetensors.torch import save_file
from torch import nn

WIDTHS = [8, 16, 24, 32, 32]


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval()
    channels = 3
    slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
    for width, sl in zip(WIDTHS, slices):
        for name, layer in list(sl.named_children()):
            if isinstance(layer, nn.Conv2d):
                setattr(sl, name, nn.Conv2d(channels, width, 3, padding=1))
                channels = width
    for k, width in enumerate(WIDTHS):
        head = nn.Conv2d(width, 1, 1, bias=False)
        with torch.no_grad():
            head.weight.abs_()
        model.lins[k].model[1] = head
    model.chns = WIDTHS
    # `lins.K` repeats `linK` (one module list over the same heads): keep the package's names.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lins.")}
    save_file(state, os.path.join(out, "weights.safetensors"))

    cases = {}
    g = torch.Generator().manual_seed(1)
    for name, (b, h, w) in {"square32": (2, 32, 32), "odd48x40": (1, 48, 40)}.items():
        in0 = torch.rand(b, 3, h, w, generator=g) * 2 - 1
        # A nearby image (small noise) and a smooth one: distances of different sizes.
        in1 = (in0 + 0.2 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)
        in1[-1] = torch.linspace(-1, 1, w).expand(3, h, w)
        in0.requires_grad_(True)
        d = model(in0, in1).reshape(-1)
        d.sum().backward()
        cases[f"{name}.in0"] = in0.detach()
        cases[f"{name}.in1"] = in1
        cases[f"{name}.distance"] = d.detach()
        cases[f"{name}.grad_in0"] = in0.grad
        print(name, d.detach().tolist())
    save_file(cases, os.path.join(out, "cases.safetensors"))


if __name__ == "__main__":
    main()
