//! Finite-difference checks, in f64, of the gradient of every op the trainers use, and of whole
//! (tiny) networks built by the same constructors that load checkpoints. candle 0.11 silently
//! drops or corrupts some gradients (`softmax_last_dim`, the contiguous `LayerNorm`,
//! `upsample_nearest2d` on a reused input); each check asserts that every input receives a
//! gradient and that it equals the central difference `(f(x+h) − f(x−h)) / 2h`.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ldm_models::kernels::conv_train::conv2d_im2col;
use ldm_models::layers::attention::{causal_mask, scaled_dot_product};
use ldm_models::layers::norm::GroupNorm;
use ldm_models::layers::ops::{softmax_last_dim, upsample_nearest2d, LayerNorm};

/// A deterministic pseudo-random f64 tensor (xorshift), so failures reproduce.
fn tensor(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn with_value(t: &Tensor, index: usize, delta: f64) -> Tensor {
    let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[index] += delta;
    Tensor::from_vec(v, t.shape(), t.device()).unwrap()
}

/// The autograd value agrees with the central difference to `rel` (plus 1e-6 absolute).
fn assert_agree(what: &str, autograd: f64, fd: f64, rel: f64) {
    let tol = 1e-6 + rel * fd.abs().max(autograd.abs());
    assert!(
        (fd - autograd).abs() <= tol,
        "{what}: autograd {autograd} vs finite difference {fd}"
    );
}

/// `Σ out ⊙ r`, the scalar every check differentiates.
fn weighted_sum(out: &Tensor, r: &Tensor) -> f64 {
    (out * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The gradient of `v`, flattened; a missing one fails the test (candle drops some silently).
fn gradient(grads: &candle_core::backprop::GradStore, v: &Var, what: &str) -> Vec<f64> {
    grads
        .get(v.as_tensor())
        .unwrap_or_else(|| panic!("{what} received no gradient"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Checks `f` at `inputs`: autograd against central differences at up to `probes` coordinates
/// of each input, through the scalar `Σ f(x) ⊙ R` for a fixed random `R`.
fn check(name: &str, inputs: &[Tensor], probes: usize, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs).unwrap();
    let r = tensor(out.dims(), 99, 1.0);
    let objective = |xs: &[Tensor]| weighted_sum(&f(xs).unwrap(), &r);
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-5;
    for (i, v) in vars.iter().enumerate() {
        let g = gradient(&grads, v, &format!("{name}: input {i}"));
        let n = g.len();
        let step = (n / probes).max(1);
        for k in (0..n).step_by(step).take(probes) {
            let mut plus: Vec<Tensor> = inputs.to_vec();
            let mut minus: Vec<Tensor> = inputs.to_vec();
            plus[i] = with_value(&inputs[i], k, h);
            minus[i] = with_value(&inputs[i], k, -h);
            let fd = (objective(&plus) - objective(&minus)) / (2.0 * h);
            assert_agree(&format!("{name}: input {i}[{k}]"), g[k], fd, 1e-5);
        }
    }
}

#[test]
fn convolution_im2col() {
    for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)] {
        let x = tensor(&[2, 3, 7, 6], 1, 1.0);
        let w = tensor(&[4, 3, k, k], 2, 0.5);
        check(&format!("conv k{k} s{stride} p{pad}"), &[x, w], 12, |t| {
            conv2d_im2col(&t[0], &t[1], stride, pad)
        });
    }
    // The autoencoder's asymmetric padding before a stride-2, unpadded convolution.
    let x = tensor(&[1, 2, 6, 6], 3, 1.0);
    let w = tensor(&[2, 2, 3, 3], 4, 0.5);
    check("pad + conv", &[x, w], 12, |t| {
        let p = t[0].pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        conv2d_im2col(&p, &t[1], 2, 0)
    });
}

#[test]
fn the_conv_layer_with_bias() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let conv = ldm_models::layers::conv2d(vb, 3, 2, 3, 1, 1).unwrap();
    let x = tensor(&[2, 3, 5, 5], 5, 1.0);
    check("Conv2d", &[x], 12, |t| conv.forward(&t[0]));
}

#[test]
fn group_norm_fused() {
    let x = (tensor(&[2, 6, 4, 3], 6, 2.0) + 0.7).unwrap();
    let w = (tensor(&[6], 7, 0.5) + 1.0).unwrap();
    let b = tensor(&[6], 8, 0.5);
    check("group norm", &[x, w, b], 16, |t| {
        GroupNorm::new(t[1].clone(), t[2].clone(), 3, 1e-5)?.forward(&t[0])
    });
    // With the SiLU fused in (every ResNet block's pre-activation): β enters the backward.
    let x = (tensor(&[2, 6, 4, 3], 16, 2.0) + 0.7).unwrap();
    let w = (tensor(&[6], 17, 0.5) + 1.0).unwrap();
    let b = tensor(&[6], 18, 1.5);
    check("group norm + SiLU", &[x, w, b], 16, |t| {
        GroupNorm::new(t[1].clone(), t[2].clone(), 3, 1e-5)?.forward_silu(&t[0])
    });
}

#[test]
fn layer_norm_differentiable_path() {
    let x = (tensor(&[2, 5, 8], 9, 2.0) + 0.3).unwrap();
    let w = (tensor(&[8], 10, 0.5) + 1.0).unwrap();
    let b = tensor(&[8], 11, 0.5);
    check("layer norm", &[x, w, b], 16, |t| {
        LayerNorm::new(t[1].clone(), t[2].clone(), 1e-5).forward(&t[0])
    });
}

#[test]
fn softmax_and_attention() {
    let x = tensor(&[2, 3, 7], 12, 3.0);
    check("softmax", &[x], 16, |t| softmax_last_dim(&t[0]));
    let q = tensor(&[2, 2, 5, 4], 13, 1.0);
    let k = tensor(&[2, 2, 6, 4], 14, 1.0);
    let v = tensor(&[2, 2, 6, 4], 15, 1.0);
    check("cross-attention", &[q, k, v], 12, |t| {
        scaled_dot_product(&t[0], &t[1], &t[2], 0.5, None)
    });
    let q = tensor(&[1, 2, 5, 4], 16, 1.0);
    let k = tensor(&[1, 2, 5, 4], 17, 1.0);
    let v = tensor(&[1, 2, 5, 4], 18, 1.0);
    check("causal attention", &[q, k, v], 12, |t| {
        let mask = causal_mask(5, &Device::Cpu)?.to_dtype(DType::F64)?;
        scaled_dot_product(&t[0], &t[1], &t[2], 0.5, Some(&mask))
    });
}

#[test]
fn upsampling_an_input_that_is_also_used_elsewhere() {
    let x = tensor(&[1, 2, 3, 4], 19, 1.0);
    check("upsample + reuse", &[x], 12, |t| {
        let up = upsample_nearest2d(&t[0], 6, 8)?;
        // The skip path uses x again; candle's own backward would overwrite its gradient.
        Tensor::cat(&[up.flatten_all()?, (&t[0] * 3.0)?.flatten_all()?], 0)
    });
}

#[test]
fn linear_embedding_and_activations() {
    let x = tensor(&[2, 3, 5], 20, 1.0);
    let w = tensor(&[4, 5], 21, 0.5);
    let b = tensor(&[4], 22, 0.5);
    check("linear", &[x.clone(), w, b], 12, |t| {
        candle_nn::Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0])
    });
    let table = tensor(&[7, 3], 23, 1.0);
    check("embedding", &[table], 21, |t| {
        let ids = Tensor::new(&[[1u32, 3, 3], [0, 6, 1]], &Device::Cpu)?;
        candle_nn::Embedding::new(t[0].clone(), 3).forward(&ids)
    });
    check("silu", std::slice::from_ref(&x), 12, |t| t[0].silu());
    check("gelu (erf)", std::slice::from_ref(&x), 12, |t| {
        ldm_models::layers::gelu(&t[0])
    });
    check("quick gelu", std::slice::from_ref(&x), 12, |t| {
        ldm_models::layers::quick_gelu(&t[0])
    });
    check("GEGLU split", std::slice::from_ref(&x), 12, |t| {
        let (a, g) = (t[0].narrow(2, 0, 2)?, t[0].narrow(2, 2, 2)?);
        a * ldm_models::layers::gelu(&g)?
    });
    // The losses: L1, squared error, and the Gaussian posterior's sample and KL terms.
    let y = tensor(&[2, 3, 5], 24, 1.0);
    check("l1 + mse", &[x.clone(), y], 12, |t| {
        let d = (&t[0] - &t[1])?;
        (d.abs()?.mean_all()? + d.sqr()?.mean_all()?)?.reshape(1)
    });
    check("exp / kl", &[x], 12, |t| {
        ((t[0].sqr()? + t[0].exp()?)? - &t[0])?.sum_keepdim(2)
    });
}

/// The variables of `map`, sorted by name, set to seeded random values (norm scales around 1,
/// `norm_scale` and `scale` the spreads) so that no gradient is trivially zero.
fn randomised_vars(map: &VarMap, norm_scale: f64, scale: f64) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (n, v)) in vars.iter().enumerate() {
        let is_norm = n.contains("norm");
        let mut t = tensor(
            v.dims(),
            100 + i as u64,
            if is_norm { norm_scale } else { scale },
        );
        if is_norm && n.ends_with("weight") {
            t = (t + 1.0).unwrap();
        }
        v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
    }
    vars
}

/// FD through a whole tiny network: a few parameters of each tensor kind.
fn check_network(
    name: &str,
    build: impl Fn(VarBuilder) -> Result<Box<dyn Fn() -> Result<Tensor>>>,
) {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let forward = build(vb).unwrap();
    let vars = randomised_vars(&map, 0.3, 0.4);
    let out = forward().unwrap();
    let r = tensor(out.dims(), 7, 1.0);
    let objective = || weighted_sum(&forward().unwrap(), &r);
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    for (n, v) in vars.iter().step_by(3) {
        let g = gradient(&grads, v, &format!("{name}: {n}"));
        let k = g.len() / 2;
        let orig = v.as_tensor().copy().unwrap();
        v.set(&with_value(&orig, k, h)).unwrap();
        let fp = objective();
        v.set(&with_value(&orig, k, -h)).unwrap();
        let fm = objective();
        v.set(&orig).unwrap();
        let fd = (fp - fm) / (2.0 * h);
        let tol = 1e-6 + 1e-4 * fd.abs().max(g[k].abs());
        assert!(
            (fd - g[k]).abs() <= tol,
            "{name}: {n}[{k}]: autograd {} vs FD {fd}",
            g[k]
        );
        checked += 1;
    }
    assert!(checked >= 5, "{name}: only {checked} parameters checked");
}

fn fixture(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

/// The tiny SD1.5 U-Net with the pooled text embedding added to the timestep embedding
/// (`addition_embed_type: "text"`, as the Shapes model trains it), so that its attention
/// pooling and layer norms are checked too.
fn unet_with_pooled_text() -> ldm_models::unet::UNetConfig {
    let path = fixture("tiny/sd15/unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["addition_embed_type"] = "text".into();
    json["addition_embed_type_num_heads"] = 2.into();
    let cfg =
        ldm_models::unet::UNetConfig::from_json(&serde_json::from_value(json).unwrap(), &path)
            .unwrap();
    assert_eq!(cfg.text_pool_heads, Some(2));
    cfg
}

#[test]
fn whole_unet_and_text_encoder() {
    use ldm_models::clip::{config::ClipTextConfig, text_model::ClipTextModel};
    use ldm_models::unet::UNet2DConditionModel;
    let ucfg = unet_with_pooled_text();
    let tcfg = ClipTextConfig::from_file(&fixture("tiny/sd15/text_encoder/config.json")).unwrap();
    check_network("unet + text encoder", |vb| {
        let unet = UNet2DConditionModel::new(vb.pp("unet"), &ucfg)?;
        let text = ClipTextModel::new(vb.pp("text"), &tcfg)?;
        let x = tensor(&[2, 4, 8, 8], 31, 1.0);
        let t = Tensor::new(&[10f64, 700.0], &Device::Cpu)?;
        let ids = Tensor::new(
            &[[49u32, 5, 17, 50, 50, 50], [49, 9, 50, 50, 50, 50]],
            &Device::Cpu,
        )?;
        Ok(Box::new(move || {
            let ctx = text.forward(&ids)?.last_hidden_state;
            unet.forward(&x, &t, &ctx, None)
        }))
    });
}

#[test]
fn whole_autoencoder() {
    use ldm_models::vae::{AutoencoderKL, VaeConfig};
    let cfg = VaeConfig::from_file(&fixture("tiny/sd15/vae/config.json")).unwrap();
    check_network("autoencoder", |vb| {
        let vae = AutoencoderKL::new(vb, &cfg)?;
        let x = tensor(&[1, 3, 16, 16], 41, 1.0);
        let eps = tensor(
            &[
                1,
                cfg.latent_channels,
                16 / cfg.downsample_factor(),
                16 / cfg.downsample_factor(),
            ],
            42,
            1.0,
        );
        Ok(Box::new(move || {
            let post = vae.encode(&x)?;
            let rec = vae.decode(&post.sample(&eps)?)?;
            Tensor::cat(&[rec.flatten_all()?, post.kl()?.flatten_all()?], 0)
        }))
    });
}

/// The candle 0.11 behaviours our ops exist for. If one of these starts failing, candle has
/// fixed the trap and the workaround in `layers::ops` can be reconsidered.
#[test]
fn candle_traps_are_still_there() {
    let x = Var::from_tensor(&tensor(&[2, 5], 50, 1.0)).unwrap();
    let r = tensor(&[2, 5], 51, 1.0);
    // softmax_last_dim records no backward: the input gets no gradient at all.
    let y = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_none());
    // upsample_nearest2d's backward overwrites the gradient of a reused input.
    let x = Var::from_tensor(&tensor(&[1, 1, 2, 2], 52, 1.0)).unwrap();
    let up = x.as_tensor().upsample_nearest2d(4, 4).unwrap();
    let loss = (up.sum_all().unwrap() + x.as_tensor().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    let got = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    // The true gradient is 4 + 1 = 5 everywhere.
    assert!(got.iter().all(|&v| (v - 5.0).abs() > 0.5), "{got:?}");
    let ours = upsample_nearest2d(x.as_tensor(), 4, 4).unwrap();
    let loss = (ours.sum_all().unwrap() + x.as_tensor().sum_all().unwrap()).unwrap();
    let got = loss
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(got.iter().all(|&v| (v - 5.0).abs() < 1e-12), "{got:?}");
}

/// The f32 training path (fused CPU kernels that only run in f32: bias adds, GroupNorm,
/// LayerNorm through GroupNorm, the im2col GEMMs) gives the f64 path's gradients, for every
/// parameter of a whole U-Net + text encoder at a training-like input (a batch, timesteps,
/// padded captions, short keys in cross-attention).
#[test]
fn f32_gradients_equal_f64_gradients() {
    use ldm_models::clip::{config::ClipTextConfig, text_model::ClipTextModel};
    use ldm_models::unet::UNet2DConditionModel;
    let ucfg = unet_with_pooled_text();
    let tcfg = ClipTextConfig::from_file(&fixture("tiny/sd15/text_encoder/config.json")).unwrap();
    let grads_in = |dtype: DType| -> Vec<(String, Vec<f64>)> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, dtype, &Device::Cpu);
        let unet = UNet2DConditionModel::new(vb.pp("unet"), &ucfg).unwrap();
        let text = ClipTextModel::new(vb.pp("text"), &tcfg).unwrap();
        let vars = randomised_vars(&map, 0.3, 0.3);
        let x = tensor(&[3, 4, 8, 8], 31, 1.0).to_dtype(dtype).unwrap();
        let t = Tensor::new(&[10f32, 500.0, 999.0], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let ids = Tensor::new(
            &[
                [49u32, 5, 17, 8, 50, 50, 50, 50, 50, 50],
                [49, 9, 50, 50, 50, 50, 50, 50, 50, 50],
                [49, 3, 4, 5, 6, 7, 8, 9, 10, 50],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let ctx = text.forward(&ids).unwrap().last_hidden_state;
        let out = unet.forward(&x, &t, &ctx, None).unwrap();
        let r = tensor(out.dims(), 7, 1.0).to_dtype(dtype).unwrap();
        let grads = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter()
            .map(|(n, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{dtype:?}: {n} has no gradient"));
                let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                (n.clone(), g.to_vec1::<f64>().unwrap())
            })
            .collect()
    };
    let g64 = grads_in(DType::F64);
    let g32 = grads_in(DType::F32);
    assert_eq!(g64.len(), g32.len());
    for ((n, a), (_, b)) in g64.iter().zip(&g32) {
        let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt();
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        assert!(
            err <= 1e-4 * norm + 1e-6,
            "{n}: |g32 − g64| = {err:e}, |g64| = {norm:e}"
        );
    }
}
