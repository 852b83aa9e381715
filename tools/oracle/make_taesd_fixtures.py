#!/usr/bin/env python3
"""TAESD (diffusers' AutoencoderTiny) oracle fixtures for `ldm_models::vae::AutoencoderTiny`
and `ldm generate --taesd` / `ldm serve --taesd`.

    python tools/oracle/make_taesd_fixtures.py fixtures

Writes, with diffusers 0.42.1 on the CPU in float32, one thread:
  fixtures/taesd/model/               a seeded random AutoencoderTiny shaped for the tiny SD1.5
                                      pipeline (3 levels: factor 4, 4 latent channels, width 8),
                                      its biases drawn wider than PyTorch's start so that every
                                      layer changes the output, the last convolution widened and
                                      centred on grey (no clipping); save_pretrained
  fixtures/taesd/cases.safetensors    x [2,3,32,32] and encode(x).latents; z [2,4,8,8] and
                                      decode(z).sample
  fixtures/taesd/sd15_taesd.png       StableDiffusionPipeline(fixtures/tiny/sd15) with
                                      pipe.vae = that AutoencoderTiny: "a red circle", 32x32,
                                      Euler (the folder's scheduler), 8 steps, guidance 7.5,
                                      generator seed 1
  fixtures/taesd/sd15_taesd_img2img.png  the img2img pipeline from the same components with
                                      Euler, pipelines/inputs/gradient_circle_32x32.png,
                                      strength 0.6
"""

import sys
from pathlib import Path

import PIL.Image
import torch
from diffusers import (AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)
from safetensors.torch import save_file

torch.set_num_threads(1)
root = Path(sys.argv[1])
out = root / "taesd"
out.mkdir(parents=True, exist_ok=True)

torch.manual_seed(0)
tiny = AutoencoderTiny(
    encoder_block_out_channels=(8, 8, 8),
    decoder_block_out_channels=(8, 8, 8),
    num_encoder_blocks=(1, 2, 2),
    num_decoder_blocks=(2, 2, 1),
    latent_channels=4,
)
with torch.no_grad():
    for name, p in tiny.named_parameters():
        if name.endswith("bias"):
            p.uniform_(-0.3, 0.3)
    # Centre the last convolution on mid-grey with some spread, so the pictures are not clipped
    # flat.
    last = tiny.decoder.layers[-1]
    last.weight.mul_(6.0)
    last.bias.fill_(0.5)
tiny.eval()
tiny.save_pretrained(out / "model")

g = torch.Generator("cpu").manual_seed(2)
x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
z = torch.randn(2, 4, 8, 8, generator=g) * 2
with torch.no_grad():
    encoded = tiny.encode(x).latents
    decoded = tiny.decode(z).sample
save_file({"x": x, "encoded": encoded.contiguous(), "z": z, "decoded": decoded.contiguous()},
          out / "cases.safetensors")

pipe = StableDiffusionPipeline.from_pretrained(root / "tiny" / "sd15", torch_dtype=torch.float32,
                                               safety_checker=None, requires_safety_checker=False)
pipe.vae = tiny
pipe.set_progress_bar_config(disable=True)
image = pipe("a red circle", height=32, width=32, num_inference_steps=8, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(out / "sd15_taesd.png")

# Euler for img2img: the folder's PNDM slices its timesteps in its own way under img2img (a
# case of its own in make_pipeline_fixtures.py).
img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
img2img.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
img2img.set_progress_bar_config(disable=True)
init = PIL.Image.open(root / "pipelines" / "inputs" / "gradient_circle_32x32.png").convert("RGB")
image = img2img("a red circle", image=init, strength=0.6, num_inference_steps=8, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(out / "sd15_taesd_img2img.png")
print("wrote", out)
