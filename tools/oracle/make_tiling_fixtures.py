"""Reference outputs for tiled VAE decoding and encoding (diffusers' AutoencoderKL tiling).

Usage: python tools/oracle/make_tiling_fixtures.py fixtures

Writes fixtures/tiling/sd15_vae_tiled.safetensors with the tiny SD1.5 VAE's
  latents [1,4,24,28]  -> decoded_tiled [1,3,96,112]  (latent tiles of 16, overlap 0.25)
  image   [1,3,96,112] -> mean_tiled, logvar_tiled [1,4,24,28] (pixel tiles of 64, overlap 0.25)
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file


def main(root: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(root / "tiny" / "sd15" / "vae").eval()
    vae.enable_tiling()
    vae.tile_sample_min_size = 64
    vae.tile_latent_min_size = 16
    vae.tile_overlap_factor = 0.25
    g = torch.Generator("cpu").manual_seed(3)
    latents = torch.randn([1, 4, 24, 28], generator=g)
    image = torch.rand([1, 3, 96, 112], generator=g) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        posterior = vae.encode(image).latent_dist
    out = {
        "latents": latents.contiguous(),
        "decoded_tiled": decoded.contiguous(),
        "image": image.contiguous(),
        "mean_tiled": posterior.mean.contiguous(),
        "logvar_tiled": posterior.logvar.contiguous(),
    }
    (root / "tiling").mkdir(parents=True, exist_ok=True)
    save_file(out, root / "tiling" / "sd15_vae_tiled.safetensors", metadata={"source": "diffusers tiling"})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures"))
