#!/usr/bin/env python3
"""Drives a running `ldm serve` with the clients people use, unchanged: `webuiapi` (A1111's API)
and the `openai` package (OpenAI's images API).

    python3 tools/clients/test_clients.py http://127.0.0.1:PORT [http://127.0.0.1:PORT2 FIXTURES]

Run by crates/ldm-server/tests/clients.rs, which starts the server (with --api-key sk-test and
--api-auth user:secret, which both clients send) and a second one on the tiny SD1.5 fixture with
--controlnet-dir FIXTURES/controlnet, where webuiapi's ControlNetUnit is checked against
diffusers' picture. Exits non-zero on the first failed check.
"""

import base64
import io
import sys
import threading
import time

import openai
import webuiapi
from PIL import Image

URL = sys.argv[1].rstrip("/")
host, port = URL.removeprefix("http://").split(":")


def check(cond, message):
    if not cond:
        raise SystemExit(f"check failed: {message}")
    print(f"ok: {message}")


# --- webuiapi -------------------------------------------------------------------------------
api = webuiapi.WebUIApi(host=host, port=int(port), username="user", password="secret")
api.util_wait_for_ready(check_interval=0.1)

r = api.txt2img(prompt="a red circle on a blue background", seed=11, steps=12, cfg_scale=7.5,
                width=64, height=64, batch_size=2)
check(len(r.images) == 2 and r.images[0].size == (64, 64), "webuiapi txt2img: two 64x64 images")
check(r.info["all_seeds"] == [11, 12], f"webuiapi txt2img: info.all_seeds {r.info['all_seeds']}")
check(r.info["sampler_name"] == "Euler a", "webuiapi's default sampler 'Euler a' with scheduler 'automatic'")
check("Seed: 11" in r.info["infotexts"][0], "infotexts carry the seed")
again = api.txt2img(prompt="a red circle on a blue background", seed=11, steps=12, cfg_scale=7.5,
                    width=64, height=64, sampler_name="DPM++ 2M Karras")
check(again.info["sampler_name"] == "DPM++ 2M", "'DPM++ 2M Karras' runs DPM++ 2M")
check("Schedule type: Karras" in again.info["infotexts"][0], "... with the Karras schedule")

info = api.png_info(r.images[0])
check(info.info.startswith("a red circle on a blue background"), "png-info reads the parameters back")

init = r.images[0]
mask = Image.new("L", (64, 64), 0)
mask.paste(255, (0, 0, 32, 64))
inp = api.img2img(images=[init], mask_image=mask, prompt="a yellow triangle on a green background",
                  denoising_strength=1.0, inpainting_fill=1, mask_blur=0, seed=3, steps=12,
                  width=64, height=64)
check(len(inp.images) == 1, "webuiapi img2img with a mask (inpainting)")
a, b = init.convert("RGB"), inp.images[0].convert("RGB")
right = sum(abs(p - q) for x in range(44, 64) for y in range(64)
            for p, q in zip(a.getpixel((x, y)), b.getpixel((x, y)))) / (20 * 64 * 3)
check(right < 12, f"inpainting kept the unmasked half (mean difference {right:.1f} levels)")

models = api.util_get_model_names()
check(len(models) == 1 and models[0].startswith("shapes ["), f"sd-models titles {models}")
api.util_set_model("shapes")
check(api.util_get_current_model() == models[0], "util_set_model / util_get_current_model")
check("Euler a" in api.util_get_sampler_names(), "sampler names")
check(any(s["name"] == "karras" for s in api.get_schedulers()), "scheduler names")
opts = api.get_options()
check(api.set_options(opts) is None, "set_options takes back the whole options dict")

# Progress while a job runs, then interrupt: what was made so far comes back.
result = {}
t = threading.Thread(target=lambda: result.setdefault("r", api.txt2img(
    prompt="a blue square", seed=1, steps=150, width=128, height=128)))
t.start()
seen = None
for _ in range(500):
    p = api.get_progress()
    if p["state"]["sampling_step"] >= 2 and p["current_image"]:
        seen = p
        break
    time.sleep(0.02)
check(seen is not None and 0 < seen["progress"] < 1, "get_progress while running")
check(seen["state"]["job_count"] == 1 and seen["eta_relative"] > 0, "job_count and eta while running")
Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
api.interrupt()
t.join(60)
check(len(result["r"].images) == 1, "interrupt returns the image made so far")
api.util_wait_for_ready(check_interval=0.1)
check(api.get_progress()["state"]["job_count"] == 0, "idle again")

# --- openai ------------------------------------------------------------------------------------
client = openai.OpenAI(base_url=f"{URL}/v1", api_key="sk-test", max_retries=0)
g = client.images.generate(model="shapes", prompt="a red circle on a blue background", n=2,
                           size="64x64", response_format="b64_json", extra_body={"seed": 5, "steps": 8})
check(len(g.data) == 2, "openai images.generate: two images")
img = Image.open(io.BytesIO(base64.b64decode(g.data[0].b64_json)))
check(img.size == (64, 64), "openai images.generate: 64x64")

buf = io.BytesIO()
init.save(buf, format="PNG")
rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
mbuf = io.BytesIO()
rgba.save(mbuf, format="PNG")
e = client.images.edit(image=("init.png", buf.getvalue(), "image/png"), mask=("mask.png", mbuf.getvalue(), "image/png"),
                       prompt="a yellow triangle", n=1, size="64x64", response_format="b64_json",
                       extra_body={"seed": 2, "steps": 8})
check(len(e.data) == 1, "openai images.edit with a mask")
check(any(m.id == "shapes" for m in client.models.list().data), "openai models.list")

try:
    client.images.generate(prompt="x", size="huge")
    check(False, "a bad size is refused")
except openai.BadRequestError as err:
    check(err.status_code == 400 and "size" in str(err), f"openai BadRequestError: {err}")

try:
    openai.OpenAI(base_url=f"{URL}/v1", api_key="sk-wrong", max_retries=0).models.list()
    check(False, "a wrong key is refused")
except openai.AuthenticationError as err:
    check(err.status_code == 401, "openai AuthenticationError for a wrong key")

# --- webuiapi's ControlNetUnit (sd-webui-controlnet's API) ---------------------------------
if len(sys.argv) > 3:
    cn_host, cn_port = sys.argv[2].rstrip("/").removeprefix("http://").split(":")
    fixtures = sys.argv[3]
    cn = webuiapi.WebUIApi(host=cn_host, port=int(cn_port))
    models = cn.controlnet_model_list()
    check("sd15_a" in models, f"webuiapi controlnet_model_list: {models}")
    circle = Image.open(f"{fixtures}/pipelines/inputs/gradient_circle_32x32.png")
    unit = webuiapi.ControlNetUnit(image=circle, module="none", model="sd15_a", weight=1.0)
    r = cn.txt2img(prompt="a red circle", seed=1, steps=8, cfg_scale=7.5, width=32, height=32,
                   sampler_name="pndm", controlnet_units=[unit])
    ours = r.image.convert("RGB")
    theirs = Image.open(f"{fixtures}/controlnet/sd15_single.png").convert("RGB")
    diff = sum(abs(p - q) for a, b in zip(ours.getdata(), theirs.getdata())
               for p, q in zip(a, b)) / (32 * 32 * 3)
    check(diff <= 1.0, f"webuiapi ControlNetUnit: diffusers' ControlNet picture ({diff:.3f} levels)")

print("all client checks passed")
