#!/usr/bin/env python3
"""Does a model place an object by its position word at pure noise? Measured on its output.

For "a large red circle {on the left, on the right, at the top, at the bottom, in the center}
on a blue background" and 16 pure-noise latents each, the U-Net runs once at t = 999 (pure
noise under zero terminal SNR: nothing but the caption can say where the object will be; or at
--t). Its
x0 prediction, conditional and guided (scale 7.5, as `ldm generate` guides), is decoded, and
the share of the picture's non-background energy (each pixel's distance from the background
colour) that falls in the region the word names (the spec's thirds) is printed less the share
an even spread would put there (0: the word places nothing). With a checkpoint of `ldm train unet --layout-head` (its
`unet-train/state-*.safetensors`), the mask head's predicted coverage of the first object is
measured the same way. Written for docs/shapes-research.md ("A mask head on the U-Net's
features").

    python3 tools/screen/layout_probe_noise.py MODEL_DIR [STATE_FILE] [--t=999]

At a noisy step short of pure noise (--t=850: √ᾱ ≈ 0.1) a pure-noise latent is still a likely
state, and the same measure reads the caption's pull on where the object goes there.
"""
import sys, torch, numpy as np
from diffusers import StableDiffusionPipeline

args = [a for a in sys.argv[1:] if not a.startswith('--t=')]
t = int(next((a[4:] for a in sys.argv[1:] if a.startswith('--t=')), 999))
model = args[0]
state = args[1] if len(args) > 1 else None
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, torch_dtype=torch.float32)
unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
head = None
if state:
    from safetensors.torch import load_file
    s = load_file(state)
    head = (s['ema.layout_head.weight'].float(), s['ema.layout_head.bias'].float())
feats = {}
unet.conv_act.register_forward_hook(lambda m, i, o: feats.__setitem__('f', o))

def embed(text):
    ids = pipe.tokenizer(text, padding='max_length', max_length=pipe.tokenizer.model_max_length,
                         return_tensors='pt').input_ids
    return pipe.text_encoder(ids)[0]

def region(word, n):
    """The named region on an n × n grid, by the spec's thirds."""
    m = np.zeros((n, n))
    a, b = n // 3, 2 * n // 3
    if word == 'left': m[:, :a] = 1
    if word == 'right': m[:, b:] = 1
    if word == 'top': m[:a, :] = 1
    if word == 'bottom': m[b:, :] = 1
    if word == 'center': m[a:b, a:b] = 1
    return m

BLUE = np.array([40, 90, 220], float)
ab = sched.alphas_cumprod[t]
n_seeds = 16
words = {'on the left': 'left', 'on the right': 'right', 'at the top': 'top',
         'at the bottom': 'bottom', 'in the center': 'center'}
uncond = embed('')
rows = []
for phrase, word in words.items():
    cond = embed(f'a large red circle {phrase} on a blue background')
    shares = {'conditional': [], 'guided': [], 'head': []}
    for seed in range(n_seeds):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((1, unet.config.in_channels, 16, 16), generator=g)
        with torch.no_grad():
            v_c = unet(z, t, encoder_hidden_states=cond).sample
            f = feats['f']
            v_u = unet(z, t, encoder_hidden_states=uncond).sample
            outs = {'conditional': v_c, 'guided': v_u + 7.5 * (v_c - v_u)}
            for k, v in outs.items():
                x0 = ab.sqrt() * z - (1 - ab).sqrt() * v
                img = vae.decode(x0 / vae.config.scaling_factor).sample[0]
                img = ((img.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
                energy = np.linalg.norm(img - BLUE, axis=-1)
                r = region(word, energy.shape[0])
                shares[k].append((energy * r).sum() / energy.sum() - r.mean())
            if head is not None:
                w, b = head
                logits = torch.einsum('bchw,oc->bohw', f, w) + b[None, :, None, None]
                p = torch.sigmoid(logits[0, 0]).numpy()
                r = region(word, p.shape[0])
                shares['head'].append((p * r).sum() / p.sum() - r.mean())
    line = f'{word:7s} (even {region(word, 64).mean():.3f})  ' + '  '.join(
        f'{k} {np.mean(v):+.3f}' for k, v in shares.items() if v)
    print(line, flush=True)
    rows.append({k: np.mean(v) for k, v in shares.items() if v})
print('mean over words, share minus even: ' + '  '.join(
    f'{k} {np.mean([r[k] for r in rows]):+.3f}' for k in rows[0]))
