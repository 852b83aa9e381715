#!/usr/bin/env python3
"""Writes LPIPS (VGG) weights as one safetensors file for `ldm train vae --lpips FILE`.

Usage: python tools/export_lpips.py lpips_vgg.safetensors

Needs the `lpips` package and torchvision, and the pretrained weights they load: torchvision's
VGG16 (`vgg16-397923af.pth`, from torch's hub cache or downloaded by torchvision) and the
package's own linear heads (`lpips/weights/v0.1/vgg.pth`, shipped inside the package). ldm
never downloads them. The file holds the package's state dict under its own names
(`net.sliceK.N.weight`, `linK.model.1.weight`, `scaling_layer.shift/scale`).
"""

import sys

import lpips
from safetensors.torch import save_file


def main() -> None:
    model = lpips.LPIPS(net="vgg", pretrained=True, verbose=False).eval()
    # `lins.K` repeats `linK` (one module list over the same heads).
    state = {k: v.contiguous().float() for k, v in model.state_dict().items() if not k.startswith("lins.")}
    save_file(state, sys.argv[1])
    print(f"wrote {len(state)} tensors to {sys.argv[1]}")


if __name__ == "__main__":
    main()
