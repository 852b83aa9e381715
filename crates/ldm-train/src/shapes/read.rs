//! The spec's evaluator: reading objects back from an image and scoring it against a caption.
//!
//! Choices where the spec is silent: a component's pixel set is compared with each shape drawn
//! at pixel centres in the squared bounding box; a two-object prompt is matched against both
//! orders of the two components read back and the better order kept; a stated position holds
//! when the position rule (without margins) holds for the centre, and a stated relation when the
//! dominant axis and its sign agree.

use super::{ObjectStatement, Position, Relation, Shape, Size, Statement, PALETTE};

/// An object read back from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadObject {
    pub shape: Shape,
    pub colour: usize,
    pub size: Size,
    pub cx: f64,
    pub cy: f64,
    pub pixels: usize,
}

/// What an image shows, as far as the evaluator can tell.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub background: usize,
    pub objects: Vec<ReadObject>,
}

fn nearest(p: [u8; 3]) -> (usize, f64) {
    PALETTE
        .iter()
        .enumerate()
        .map(|(i, (_, c))| {
            let d2: f64 = (0..3).map(|k| (p[k] as f64 - c[k] as f64).powi(2)).sum();
            (i, d2.sqrt())
        })
        .fold(
            (0, f64::INFINITY),
            |best, x| if x.1 < best.1 { x } else { best },
        )
}

/// Reads an `s × s` RGB image (row-major bytes).
pub fn read(rgb: &[u8], s: usize) -> Reading {
    let px = |i: usize| [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]];
    // 1. Background: nearest palette colour to the per-channel median of the border.
    let mut border: Vec<usize> = Vec::new();
    for k in 0..s {
        border.extend([k, (s - 1) * s + k]);
        if k > 0 && k < s - 1 {
            border.extend([k * s, k * s + s - 1]);
        }
    }
    let mut median = [0u8; 3];
    for (c, m) in median.iter_mut().enumerate() {
        let mut v: Vec<u8> = border.iter().map(|&i| rgb[3 * i + c]).collect();
        v.sort_unstable();
        *m = v[v.len() / 2];
    }
    let background = nearest(median).0;
    // 2. Object pixels.
    let labels: Vec<Option<usize>> = (0..s * s)
        .map(|i| {
            let (c, d) = nearest(px(i));
            (c != background && d <= 80.0).then_some(c)
        })
        .collect();
    // 3. 8-connected components.
    let min_pixels = (0.08 * s as f64).powi(2);
    let mut seen = vec![false; s * s];
    let mut objects = Vec::new();
    for start in 0..s * s {
        if seen[start] || labels[start].is_none() {
            continue;
        }
        let mut stack = vec![start];
        seen[start] = true;
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = ((i % s) as i64, (i / s) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= s as i64 || ny >= s as i64 {
                        continue;
                    }
                    let j = ny as usize * s + nx as usize;
                    if !seen[j] && labels[j].is_some() {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if (members.len() as f64) < min_pixels {
            continue;
        }
        objects.push(component(&members, &labels, s));
    }
    Reading {
        background,
        objects,
    }
}

fn component(members: &[usize], labels: &[Option<usize>], s: usize) -> ReadObject {
    let mut votes = [0usize; 8];
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for &i in members {
        if let Some(c) = labels[i] {
            votes[c] += 1;
        }
        let (x, y) = (i % s, i / s);
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let colour = (0..8).max_by_key(|&c| (votes[c], 8 - c)).unwrap_or(0);
    // Pixel edges: the box spans [x0, x1 + 1].
    let (cx, cy) = ((x0 + x1 + 1) as f64 / 2.0, (y0 + y1 + 1) as f64 / 2.0);
    let side = ((x1 + 1 - x0).max(y1 + 1 - y0)) as f64;
    let inside: std::collections::HashSet<usize> = members.iter().copied().collect();
    // IoU of the shape drawn at pixel centres in a square box of side `b` around the centre.
    let iou = |shape: Shape, b: f64| {
        let span = |c: f64| {
            let lo = (c - b / 2.0).floor().max(0.0) as usize;
            (lo, ((c + b / 2.0).ceil() as usize).min(s))
        };
        let ((lo_x, hi_x), (lo_y, hi_y)) = (span(cx), span(cy));
        let mut drawn = 0usize;
        let mut both = 0usize;
        for y in lo_y..hi_y {
            for x in lo_x..hi_x {
                if shape.contains(cx, cy, b, x as f64 + 0.5, y as f64 + 0.5) {
                    drawn += 1;
                    both += inside.contains(&(y * s + x)) as usize;
                }
            }
        }
        both as f64 / (drawn + members.len() - both) as f64
    };
    // Anti-aliased edge pixels may or may not be read as the object's colour, so the box can be
    // a pixel too large: each shape is fitted at the box side and one pixel less.
    let fit = |shape: Shape| iou(shape, side).max(iou(shape, side - 1.0));
    let shape = Shape::ALL
        .into_iter()
        .map(|sh| (sh, fit(sh)))
        .fold(
            (Shape::Circle, -1.0),
            |best, x| if x.1 > best.1 { x } else { best },
        )
        .0;
    ReadObject {
        shape,
        colour,
        size: if side < 0.30 * s as f64 {
            Size::Small
        } else {
            Size::Large
        },
        cx,
        cy,
        pixels: members.len(),
    }
}

/// Which stated attributes an image satisfies.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Score {
    pub count: bool,
    /// `(matched, stated)` per attribute.
    pub shape: (usize, usize),
    pub colour: (usize, usize),
    pub size: (usize, usize),
    pub position: (usize, usize),
    pub relation: (usize, usize),
    pub background: (usize, usize),
}

impl Score {
    /// `(name, (matched, stated))` for each attribute, in report order.
    pub fn attributes(&self) -> [(&'static str, (usize, usize)); 6] {
        [
            ("shape", self.shape),
            ("colour", self.colour),
            ("size", self.size),
            ("position", self.position),
            ("relation", self.relation),
            ("background", self.background),
        ]
    }
    /// Every stated attribute read back, and the right number of objects.
    pub fn exact(&self) -> bool {
        self.count && self.attributes().iter().all(|(_, (m, n))| m == n)
    }
    /// Attributes read back (the background counts alike in every object order).
    fn matched(&self) -> usize {
        self.attributes().iter().map(|(_, (m, _))| m).sum()
    }
}

fn tally(hit: bool) -> (usize, usize) {
    (hit as usize, 1)
}

fn add(a: (usize, usize), b: (usize, usize)) -> (usize, usize) {
    (a.0 + b.0, a.1 + b.1)
}

fn score_object(st: &ObjectStatement, o: &ReadObject, score: &mut Score) {
    score.shape = add(score.shape, tally(o.shape == st.shape));
    if let Some(c) = st.colour {
        score.colour = add(score.colour, tally(o.colour == c));
    }
    if let Some(sz) = st.size {
        score.size = add(score.size, tally(o.size == sz));
    }
}

/// Scores a reading against a statement (see the module doc for the matching rules).
pub fn score(st: &Statement, r: &Reading, s: usize) -> Score {
    let sf = s as f64;
    let mut base = Score {
        count: r.objects.len() == st.objects.len(),
        ..Default::default()
    };
    if let Some(bg) = st.background {
        base.background = tally(r.background == bg);
    }
    let orders: Vec<Vec<usize>> = match r.objects.len() {
        0 => vec![vec![]],
        1 => vec![vec![0]],
        _ => vec![vec![0, 1], vec![1, 0]],
    };
    let mut best: Option<Score> = None;
    for order in orders {
        let mut sc = base;
        for (k, st_obj) in st.objects.iter().enumerate() {
            match order.get(k).map(|&i| &r.objects[i]) {
                Some(o) => score_object(st_obj, o, &mut sc),
                None => {
                    sc.shape = add(sc.shape, (0, 1));
                    if st_obj.colour.is_some() {
                        sc.colour = add(sc.colour, (0, 1));
                    }
                    if st_obj.size.is_some() {
                        sc.size = add(sc.size, (0, 1));
                    }
                }
            }
        }
        if let Some(p) = st.position {
            let hit = order
                .first()
                .map(|&i| &r.objects[i])
                .is_some_and(|o| p.holds(o.cx, o.cy, sf, 0.0));
            sc.position = tally(hit);
        }
        if let Some(rel) = st.relation {
            let hit = match (order.first(), order.get(1)) {
                (Some(&a), Some(&b)) => {
                    let (a, b) = (&r.objects[a], &r.objects[b]);
                    rel.holds((a.cx, a.cy), (b.cx, b.cy), 0.0)
                }
                _ => false,
            };
            sc.relation = tally(hit);
        }
        let better = match &best {
            None => true,
            Some(b) => (sc.exact(), sc.matched()) > (b.exact(), b.matched()),
        };
        if better {
            best = Some(sc);
        }
    }
    best.unwrap_or(base)
}

/// Parses a caption written by the spec's templates back into a [`Statement`].
pub fn parse_caption(caption: &str) -> Option<Statement> {
    let words: Vec<&str> = caption.split_whitespace().collect();
    let mut i = 0;
    let mut st = Statement::default();
    st.objects.push(parse_object(&words, &mut i)?);
    let phrase_at = |i: usize, phrase: &str| {
        let p: Vec<&str> = phrase.split(' ').collect();
        words.get(i..i + p.len()) == Some(&p[..])
    };
    if let Some(p) = Position::ALL.into_iter().find(|p| phrase_at(i, p.phrase())) {
        st.position = Some(p);
        i += p.phrase().split(' ').count();
    } else if let Some(r) = Relation::ALL.into_iter().find(|r| phrase_at(i, r.phrase())) {
        st.relation = Some(r);
        i += r.phrase().split(' ').count();
        st.objects.push(parse_object(&words, &mut i)?);
    }
    match &words[i..] {
        [] => {}
        ["on", "a" | "an", c, "background"] => st.background = Some(colour_named(c)?),
        _ => return None,
    }
    Some(st)
}

fn colour_named(w: &str) -> Option<usize> {
    PALETTE.iter().position(|(n, _)| *n == w)
}

/// `a|an [SIZE] [COLOUR] SHAPE` at `words[*i..]`.
fn parse_object(words: &[&str], i: &mut usize) -> Option<ObjectStatement> {
    if !matches!(words.get(*i), Some(&"a") | Some(&"an")) {
        return None;
    }
    *i += 1;
    let size = [Size::Small, Size::Large]
        .into_iter()
        .find(|s| words.get(*i) == Some(&s.name()));
    *i += size.is_some() as usize;
    let colour = words.get(*i).and_then(|w| colour_named(w));
    *i += colour.is_some() as usize;
    let shape = Shape::ALL
        .into_iter()
        .find(|s| words.get(*i) == Some(&s.name()))?;
    *i += 1;
    Some(ObjectStatement {
        shape,
        colour,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{render::render, Scene};
    use super::*;

    #[test]
    fn captions_parse_back() {
        for i in 0..3000 {
            let scene = Scene::generate(3, i, 64);
            let parsed = parse_caption(&scene.caption());
            assert_eq!(parsed.as_ref(), Some(&scene.stated), "{}", scene.caption());
        }
        assert!(parse_caption("a dog").is_none());
        assert!(parse_caption("a red circle on the moon").is_none());
    }

    /// The evaluator reads the generator's own images back: the spec's world is legible.
    #[test]
    fn rendered_scenes_read_back_exactly() {
        for s in [64, 128] {
            let n = 400;
            let mut exact = 0;
            for i in 0..n {
                let scene = Scene::generate(11, i, s);
                let reading = read(&render(&scene), s);
                let sc = score(&scene.stated, &reading, s);
                if !sc.exact() {
                    eprintln!("{} {scene:?} {reading:?} {sc:?}", scene.caption());
                }
                exact += sc.exact() as usize;
                // Unstated attributes are read too: every drawn object is found.
                assert_eq!(reading.objects.len(), scene.objects.len(), "{scene:?}");
                assert_eq!(reading.background, scene.background);
            }
            assert!(exact == n as usize, "size {s}: {exact}/{n}");
        }
    }
}
