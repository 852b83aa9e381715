#!/usr/bin/env python3
"""Where do a model's object words attend? Cross-attention read out of a diffusers folder.

For one-object scenes rendered by `ldm data shapes` (their `captions.jsonl`), each scene is
encoded, noised to timestep t and passed through the U-Net once with its caption; every
cross-attention layer's probabilities (mean over heads) are kept, and for the position word
("left", "top", ...) and the shape word the share of the word's attention that falls on the
object (its pixels by the spec's reader, pooled to the layer's grid) is printed beside the share
an even spread would put there. At t = 999 (pure noise under zero terminal SNR) nothing but the
caption can say where the object is: a model that places objects by their position word must
attend there from the caption alone. Written for `ldm train unet --attention-grounding`
(docs/shapes-research.md, "Grounding the words' attention").

    ldm data shapes --count 96 --seed 777 --out probe
    python3 tools/screen/attention_probe.py MODEL_DIR [probe]
"""
import json, sys, torch, numpy as np
from PIL import Image
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
torch.manual_seed(0)
model = sys.argv[1]
data = sys.argv[2] if len(sys.argv) > 2 else 'probe'
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, torch_dtype=torch.float32)
maps = []
class Rec(AttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, None, attention_mask, temb)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        kk = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        p = attn.get_attention_scores(q, kk, None)
        b = hidden_states.shape[0]
        maps.append(p.reshape(b, attn.heads, *p.shape[1:]).mean(1))
        o = attn.batch_to_head_dim(torch.bmm(p, v))
        return attn.to_out[1](attn.to_out[0](o))
pipe.unet.set_attn_processor(Rec())
PAL = np.array([[220,40,40],[245,140,30],[240,220,40],[40,170,70],[40,90,220],[150,60,190],[245,245,245],[25,25,25]], float)
rows = [json.loads(l) for l in open(data + '/captions.jsonl')]
pos_words = {'left','right','top','bottom','center'}
shape_words = {'circle','square','triangle','diamond'}
sched = pipe.scheduler
res = {}
for t in [999, 800, 500]:
    acc = {'position': [], 'shape': []}
    for r in rows:
        words = r['caption'].split(' ')
        if 'of' in words or 'above' in words or 'below' in words: continue  # one object only
        img = np.asarray(Image.open(data + '/' + r['file']).convert('RGB')).astype(float)
        d = np.linalg.norm(img[:, :, None] - PAL[None, None], axis=-1)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.linalg.norm(np.median(border, 0)[None] - PAL, axis=-1).argmin()
        mask = (d.argmin(-1) != bg).astype(float)
        x = torch.tensor(img / 127.5 - 1, dtype=torch.float32).permute(2, 0, 1)[None]
        with torch.no_grad():
            lat = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
            ab = sched.alphas_cumprod[t]
            noisy = ab.sqrt() * lat + (1 - ab).sqrt() * torch.randn_like(lat)
            ids = pipe.tokenizer(r['caption'], padding='max_length', max_length=pipe.tokenizer.model_max_length, return_tensors='pt').input_ids
            ctx = pipe.text_encoder(ids)[0]
            maps.clear()
            pipe.unet(noisy, torch.tensor([t]), encoder_hidden_states=ctx)
        for kind, chosen in [('position', pos_words), ('shape', shape_words)]:
            toks = [i + 1 for i, w in enumerate(words) if w in chosen]
            if not toks: continue
            for m in maps:
                lq = m.shape[1]; rr = int(round(lq ** 0.5)); f = 64 // rr
                mm = mask.reshape(rr, f, rr, f).mean((1, 3)).reshape(-1)
                for tk in toks:
                    a = m[0, :, tk].numpy()
                    acc[kind].append((float((a * mm).sum() / a.sum()), float(mm.mean()), rr))
    for kind, v in acc.items():
        v = np.array(v)
        for rr in sorted(set(v[:, 2].astype(int))):
            s = v[v[:, 2] == rr]
            print(f"{model} t={t} {kind} {rr}x{rr}: share on object {s[:,0].mean():.3f}, even spread {s[:,1].mean():.3f} (n={len(s)})")
