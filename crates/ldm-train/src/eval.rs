//! `ldm eval shapes`: generate each prompt of a list with several seeds, read every image back
//! with the Shapes World evaluator, and report the exact-match rate and each attribute's rate,
//! separately for one- and two-object prompts.

use crate::shapes::read::{parse_caption, read, score, Score};
use crate::{Error, Result};
use ldm_pipeline::{generate, Components, Request};
use ldm_sampling::NoHook;

/// How the evaluated images are generated.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Images per prompt (one batch, one seed).
    pub seeds: usize,
    pub seed: u64,
    pub size: usize,
    /// The request's sampler, steps and guidance; prompt, size, seed and batch are filled in.
    pub request: Request,
}

/// Rates over a set of prompts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub images: usize,
    pub exact: usize,
    pub count: usize,
    /// `(matched, stated)` summed per attribute, in [`Score::attributes`] order.
    pub attributes: [(usize, usize); 6],
}

impl Rates {
    fn add(&mut self, s: &Score) {
        self.images += 1;
        self.exact += s.exact() as usize;
        self.count += s.count as usize;
        for (acc, (_, (m, n))) in self.attributes.iter_mut().zip(s.attributes()) {
            *acc = (acc.0 + m, acc.1 + n);
        }
    }

    /// `(name, rate)` rows: exact match, object count, then each stated attribute.
    pub fn rows(&self) -> Vec<(&'static str, Option<f64>)> {
        let rate = |(m, n): (usize, usize)| (n > 0).then(|| m as f64 / n as f64);
        let names = Score::default().attributes().map(|(name, _)| name);
        let mut rows = vec![
            ("exact match", rate((self.exact, self.images))),
            ("object count", rate((self.count, self.images))),
        ];
        rows.extend(
            names
                .iter()
                .zip(self.attributes)
                .map(|(n, a)| (*n, rate(a))),
        );
        rows
    }
}

/// Results for one- and two-object prompts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalReport {
    pub one: Rates,
    pub two: Rates,
}

/// Evaluates `prompts` (Shapes World captions); `progress(done, total)` after each prompt.
pub fn evaluate(
    components: &Components,
    prompts: &[String],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    let mut report = EvalReport::default();
    for (i, prompt) in prompts.iter().enumerate() {
        let st = parse_caption(prompt).ok_or_else(|| {
            Error::Msg(format!(
                "line {}: `{prompt}` is not a Shapes World caption",
                i + 1
            ))
        })?;
        let req = Request {
            prompt: prompt.clone(),
            width: opts.size,
            height: opts.size,
            seed: opts.seed.wrapping_add(i as u64),
            batch_size: opts.seeds,
            ..opts.request.clone()
        };
        let out = generate(components, &req, &mut NoHook)?;
        for img in &out.images {
            let sc = score(&st, &read(img.as_raw(), opts.size), opts.size);
            match st.objects.len() {
                1 => report.one.add(&sc),
                _ => report.two.add(&sc),
            }
        }
        progress(i + 1, prompts.len());
    }
    Ok(report)
}
