#!/usr/bin/env python3
"""Textual-inversion oracle fixtures: embedding files in A1111's format and the pictures
diffusers makes with them (`pipe.load_textual_inversion`).

    python tools/oracle/make_embedding_fixtures.py fixtures

With diffusers 0.42.1 on the CPU in float32, one thread, seeded random vectors:
  fixtures/embeddings/sd15/shapestyle.safetensors  A1111 `{"emb_params": [3, width]}` for the
                                                   tiny SD1.5 text encoder (three vectors)
  fixtures/embeddings/sdxl/xlstyle.safetensors     SDXL `{"clip_l": [2, w1], "clip_g": [2, w2]}`
  fixtures/embeddings/sd15pt/shapept.pt           A1111 `.pt` (`string_to_param`), two vectors
  fixtures/embeddings/<model>_ti.png               "a red circle, <name>" after
                                                   `load_textual_inversion(…, token=<name>)`
                                                   (SDXL: clip_l into text_encoder, clip_g into
                                                   text_encoder_2), the pipeline's own
                                                   scheduler, 32×32, 8 steps, seed 1
"""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

torch.set_num_threads(1)
root = Path(sys.argv[1])
out = root / "embeddings"

for model, name in [("sd15", "shapestyle"), ("sdxl", "xlstyle")]:
    cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
    kwargs = {} if model == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(root / "tiny" / model, torch_dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(7)
    (out / model).mkdir(parents=True, exist_ok=True)
    file = out / model / f"{name}.safetensors"
    if model == "sd15":
        w = pipe.text_encoder.config.hidden_size
        vectors = {"emb_params": torch.randn(3, w, generator=g) * 0.5}
        save_file(vectors, file)
        pipe.load_textual_inversion(str(file), token=name)
    else:
        w1, w2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
        vectors = {"clip_l": torch.randn(2, w1, generator=g) * 0.5, "clip_g": torch.randn(2, w2, generator=g) * 0.5}
        save_file(vectors, file)
        pipe.load_textual_inversion(vectors["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vectors["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    image = pipe(f"a red circle, {name}", height=32, width=32, num_inference_steps=8,
                 guidance_scale=5.0 if model == "sdxl" else 7.5,
                 generator=torch.Generator("cpu").manual_seed(1)).images[0]
    image.save(out / f"{model}_ti.png")
    print("wrote", model)

# A1111's own `.pt` format (a pickle: the vectors under string_to_param["*"], beside ints and
# strings), read by diffusers from the file.
pipe = StableDiffusionPipeline.from_pretrained(root / "tiny" / "sd15", torch_dtype=torch.float32,
                                               safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
g = torch.Generator("cpu").manual_seed(8)
(out / "sd15pt").mkdir(parents=True, exist_ok=True)
file = out / "sd15pt" / "shapept.pt"
vectors = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=g) * 0.5
torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "shapept",
            "step": 100, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"}, file)
pipe.load_textual_inversion(str(file), token="shapept")
image = pipe("a red circle, shapept", height=32, width=32, num_inference_steps=8, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(out / "sd15pt_ti.png")
print("wrote sd15pt")
