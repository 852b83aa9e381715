//! Shapes World v1 (`shared/specs/shapes-world.md`): the project's own image–caption world.
//! A scene is a pure function of `(seed, index, size)`; [`render`] draws it with 4×4
//! supersampling, [`caption`] describes it, and [`read`] is the spec's evaluator.
//!
//! Where the spec is silent we choose, and say so here:
//! - The random stream is ChaCha8 keyed by the bytes of `seed`, `index`, `size` and a version tag;
//!   every choice below draws from it in the order written in [`Scene::generate`].
//! - A box centre is continuous; the box is `[cx − b/2, cx + b/2]`, so objects may sit between
//!   pixels. Pixel `(i, j)` covers `[i, i+1] × [j, j+1]`; subsamples are at `i + (k + ½)/4`.
//! - Without a position word a centre is uniform over the positions that keep the box inside.
//! - Two objects: the relation is drawn first, then the first object's centre uniformly, then the
//!   second's uniformly, rejected until the relation and the gap hold (a bounded number of
//!   tries; the whole pair is redrawn if they fail).
//! - Colours are drawn uniformly from the palette minus the background and the other object's
//!   colour; shapes and sizes uniformly. Two-object captions carry no size word (the spec's
//!   template has none), but sizes are still drawn.

pub mod read;
pub mod render;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Canvas sides the spec allows.
pub const SIZES: [usize; 3] = [64, 128, 256];

/// The eight palette colours, in the spec's order.
pub const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("orange", [245, 140, 30]),
    ("yellow", [240, 220, 40]),
    ("green", [40, 170, 70]),
    ("blue", [40, 90, 220]),
    ("purple", [150, 60, 190]),
    ("white", [245, 245, 245]),
    ("black", [25, 25, 25]),
];

/// An index into [`PALETTE`].
pub type Colour = usize;

/// The four shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
        }
    }
    /// Whether the point `(px, py)` lies in this shape drawn in the box of side `b` centred at
    /// `(cx, cy)`.
    pub fn contains(self, cx: f64, cy: f64, b: f64, px: f64, py: f64) -> bool {
        let (dx, dy, r) = (px - cx, py - cy, b / 2.0);
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex at the top middle, base along the bottom edge: the half-width grows linearly
            // from 0 at the top to r at the bottom.
            Shape::Triangle => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
            Shape::Diamond => dx.abs() + dy.abs() <= r,
        }
    }
}

/// `small` or `large`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
    /// The box side in pixels on a canvas of side `s`.
    pub fn side(self, s: usize) -> f64 {
        let f = match self {
            Size::Small => 0.22,
            Size::Large => 0.38,
        };
        (f * s as f64).round()
    }
}

/// Position words for one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Center,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
        Position::Center,
    ];
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
            Position::Center => "in the center",
        }
    }
    /// Whether a centre satisfies the word on a canvas of side `s`, with `margin` (a fraction
    /// of `s`: 0.05 when placing, 0 when reading back).
    pub fn holds(self, x: f64, y: f64, s: f64, margin: f64) -> bool {
        let (lo, hi) = (s / 3.0 - margin * s, 2.0 * s / 3.0 + margin * s);
        let (clo, chi) = (s / 3.0 + margin * s, 2.0 * s / 3.0 - margin * s);
        match self {
            Position::Left => x <= lo,
            Position::Right => x >= hi,
            Position::Top => y <= lo,
            Position::Bottom => y >= hi,
            Position::Center => (clo..=chi).contains(&x) && (clo..=chi).contains(&y),
        }
    }
}

/// Relations between two objects, read from the first-named to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }
    /// Whether `a` stands in this relation to `b`: the dominant axis and its sign, with the
    /// spec's minimum offset `min_offset` (0.15·S when placing, 0 when reading back).
    pub fn holds(self, a: (f64, f64), b: (f64, f64), min_offset: f64) -> bool {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        match self {
            Relation::LeftOf => dx >= min_offset && dx.abs() >= dy.abs() && dx > 0.0,
            Relation::RightOf => -dx >= min_offset && dx.abs() >= dy.abs() && dx < 0.0,
            Relation::Above => dy >= min_offset && dy.abs() >= dx.abs() && dy > 0.0,
            Relation::Below => -dy >= min_offset && dy.abs() >= dx.abs() && dy < 0.0,
        }
    }
}

/// One drawn object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// Box centre in pixels (x right, y down).
    pub cx: f64,
    pub cy: f64,
}

impl Object {
    pub fn side(&self, s: usize) -> f64 {
        self.size.side(s)
    }
}

/// What a caption states; `None` is an attribute left out (drawn at random all the same).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Statement {
    pub objects: Vec<ObjectStatement>,
    pub position: Option<Position>,
    pub relation: Option<Relation>,
    pub background: Option<Colour>,
}

/// The attributes a caption states of one object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectStatement {
    pub shape: Shape,
    pub colour: Option<Colour>,
    pub size: Option<Size>,
}

/// One scene: the drawn truth and what its caption states.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub size: usize,
    pub background: Colour,
    pub objects: Vec<Object>,
    pub relation: Option<Relation>,
    pub stated: Statement,
}

fn rng_for(seed: u64, index: u64, size: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    key[16..24].copy_from_slice(&(size as u64).to_le_bytes());
    key[24..32].copy_from_slice(b"shapes/1");
    ChaCha8Rng::from_seed(key)
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

impl Scene {
    /// The scene at `(seed, index)` on a canvas of side `size` (64, 128 or 256).
    pub fn generate(seed: u64, index: u64, size: usize) -> Scene {
        let mut rng = rng_for(seed, index, size);
        let s = size as f64;
        let two = rng.random::<f64>() < 0.4;
        let background = rng.random_range(0..PALETTE.len());
        let mut colours = Vec::new();
        let mut drawn = Vec::new();
        for _ in 0..(1 + two as usize) {
            let allowed: Vec<Colour> = (0..PALETTE.len())
                .filter(|c| *c != background && !colours.contains(c))
                .collect();
            let colour = pick(&mut rng, &allowed);
            colours.push(colour);
            drawn.push((
                pick(&mut rng, &Shape::ALL),
                colour,
                pick(&mut rng, &[Size::Small, Size::Large]),
            ));
        }
        let mut stated = Statement {
            background: (rng.random::<f64>() < 0.8).then_some(background),
            ..Default::default()
        };
        let object = |(shape, colour, size): (Shape, Colour, Size), cx, cy| Object {
            shape,
            colour,
            size,
            cx,
            cy,
        };
        let (objects, relation) = if !two {
            let (shape, colour, sz) = drawn[0];
            let b = sz.side(size);
            let say_colour = rng.random::<f64>() < 0.8;
            let say_size = rng.random::<f64>() < 0.5;
            let position = (rng.random::<f64>() < 0.5).then(|| pick(&mut rng, &Position::ALL));
            let (cx, cy) = place_one(&mut rng, s, b, position);
            stated.objects.push(ObjectStatement {
                shape,
                colour: say_colour.then_some(colour),
                size: say_size.then_some(sz),
            });
            stated.position = position;
            (vec![object(drawn[0], cx, cy)], None)
        } else {
            let relation = pick(&mut rng, &Relation::ALL);
            for &(shape, colour, _) in &drawn {
                let say_colour = rng.random::<f64>() < 0.8;
                stated.objects.push(ObjectStatement {
                    shape,
                    colour: say_colour.then_some(colour),
                    size: None,
                });
            }
            let (ba, bb) = (drawn[0].2.side(size), drawn[1].2.side(size));
            let gap = (0.03 * s).round();
            let (a, b) = place_two(&mut rng, s, ba, bb, gap, relation);
            stated.relation = Some(relation);
            (
                vec![object(drawn[0], a.0, a.1), object(drawn[1], b.0, b.1)],
                Some(relation),
            )
        };
        Scene {
            size,
            background,
            objects,
            relation,
            stated,
        }
    }

    /// The caption: lower case, single spaces, no trailing period.
    pub fn caption(&self) -> String {
        caption(&self.stated)
    }

    /// Everything drawn, stated: every object's shape, colour and size and the background,
    /// with the caption's position or relation (an unstated position may sit on a border
    /// between thirds, so it is not a fact of the picture). What a faithful copy of the
    /// picture — an autoencoder's reconstruction — must read back as.
    pub fn full_statement(&self) -> Statement {
        Statement {
            objects: self
                .objects
                .iter()
                .map(|o| ObjectStatement {
                    shape: o.shape,
                    colour: Some(o.colour),
                    size: Some(o.size),
                })
                .collect(),
            background: Some(self.background),
            ..self.stated.clone()
        }
    }
}

/// Draws a centre in `[lo, hi]` clipped to keep a box of side `b` inside `[0, s]`.
fn clipped(rng: &mut ChaCha8Rng, lo: f64, hi: f64, s: f64, b: f64) -> f64 {
    let (lo, hi) = (lo.max(b / 2.0), hi.min(s - b / 2.0));
    uniform(rng, lo, hi.max(lo))
}

fn place_one(rng: &mut ChaCha8Rng, s: f64, b: f64, position: Option<Position>) -> (f64, f64) {
    let m = 0.05 * s;
    let (third, two_thirds) = (s / 3.0, 2.0 * s / 3.0);
    let (xr, yr) = match position {
        None => ((0.0, s), (0.0, s)),
        Some(Position::Left) => ((0.0, third - m), (0.0, s)),
        Some(Position::Right) => ((two_thirds + m, s), (0.0, s)),
        Some(Position::Top) => ((0.0, s), (0.0, third - m)),
        Some(Position::Bottom) => ((0.0, s), (two_thirds + m, s)),
        Some(Position::Center) => ((third + m, two_thirds - m), (third + m, two_thirds - m)),
    };
    let x = clipped(rng, xr.0, xr.1, s, b);
    let y = clipped(rng, yr.0, yr.1, s, b);
    (x, y)
}

/// Whether two boxes (centres `a`, `b`, sides `sa`, `sb`) are at least `gap` apart.
fn separated(a: (f64, f64), b: (f64, f64), sa: f64, sb: f64, gap: f64) -> bool {
    let reach = (sa + sb) / 2.0 + gap;
    (a.0 - b.0).abs() >= reach || (a.1 - b.1).abs() >= reach
}

fn place_two(
    rng: &mut ChaCha8Rng,
    s: f64,
    sa: f64,
    sb: f64,
    gap: f64,
    relation: Relation,
) -> ((f64, f64), (f64, f64)) {
    loop {
        let a = (clipped(rng, 0.0, s, s, sa), clipped(rng, 0.0, s, s, sa));
        for _ in 0..64 {
            let b = (clipped(rng, 0.0, s, s, sb), clipped(rng, 0.0, s, s, sb));
            if relation.holds(a, b, 0.15 * s) && separated(a, b, sa, sb, gap) {
                return (a, b);
            }
        }
    }
}

fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn noun_phrase(o: &ObjectStatement) -> String {
    let mut words: Vec<&str> = Vec::new();
    if let Some(size) = o.size {
        words.push(size.name());
    }
    if let Some(c) = o.colour {
        words.push(PALETTE[c].0);
    }
    words.push(o.shape.name());
    format!("{} {}", article(words[0]), words.join(" "))
}

/// The words of [`caption`]`(st)` (counted from 0, split at spaces) that describe each stated
/// object: its size, colour and shape words, and for the first object the last word of a
/// position phrase ("left", "top", "center"). The relation's words belong to both objects and
/// the background's to neither, so they are left out.
pub fn object_words(st: &Statement) -> Vec<Vec<usize>> {
    let words = |text: &str| text.split(' ').count();
    let mut out = Vec::with_capacity(st.objects.len());
    let mut at = 0;
    for (k, o) in st.objects.iter().enumerate() {
        if k == 1 {
            if let Some(r) = st.relation {
                at += words(r.phrase());
            }
        }
        // The article, then the object's own words.
        let own = words(&noun_phrase(o)) - 1;
        let mut mine: Vec<usize> = (at + 1..at + 1 + own).collect();
        at += own + 1;
        if k == 0 {
            if let Some(p) = st.position {
                at += words(p.phrase());
                mine.push(at - 1);
            }
        }
        out.push(mine);
    }
    out
}

/// The caption of a statement, by the spec's templates.
pub fn caption(st: &Statement) -> String {
    let mut out = noun_phrase(&st.objects[0]);
    if let Some(p) = st.position {
        out += " ";
        out += p.phrase();
    }
    if let (Some(r), Some(second)) = (st.relation, st.objects.get(1)) {
        out += " ";
        out += r.phrase();
        out += " ";
        out += &noun_phrase(second);
    }
    if let Some(bg) = st.background {
        let name = PALETTE[bg].0;
        out += &format!(" on {} {name} background", article(name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each object's words are its attributes' names, and the position word follows the first.
    #[test]
    fn object_words_name_each_object() {
        for i in 0..300 {
            let scene = Scene::generate(3, i, 64);
            let st = &scene.stated;
            let caption = caption(st);
            let words: Vec<&str> = caption.split(' ').collect();
            let each = object_words(st);
            assert_eq!(each.len(), st.objects.len());
            for (k, (o, mine)) in st.objects.iter().zip(&each).enumerate() {
                let named: Vec<&str> = mine.iter().map(|&w| words[w]).collect();
                let mut expected: Vec<&str> = Vec::new();
                expected.extend(o.size.map(|s| s.name()));
                expected.extend(o.colour.map(|c| PALETTE[c].0));
                expected.push(o.shape.name());
                if k == 0 {
                    expected.extend(st.position.map(|p| p.phrase().rsplit(' ').next().unwrap()));
                }
                assert_eq!(named, expected, "{caption}");
                // The drawn object is the stated one.
                assert_eq!(scene.objects[k].shape, o.shape);
            }
        }
    }

    #[test]
    fn scenes_are_pure_and_follow_the_rules() {
        let mut counts = [0usize; 2];
        for i in 0..2000 {
            let s = Scene::generate(7, i, 64);
            assert_eq!(s, Scene::generate(7, i, 64));
            counts[s.objects.len() - 1] += 1;
            for o in &s.objects {
                let b = o.side(64);
                assert!(o.cx - b / 2.0 >= 0.0 && o.cx + b / 2.0 <= 64.0, "{s:?}");
                assert!(o.cy - b / 2.0 >= 0.0 && o.cy + b / 2.0 <= 64.0, "{s:?}");
                assert_ne!(o.colour, s.background);
            }
            if let Some(p) = s.stated.position {
                assert!(
                    p.holds(s.objects[0].cx, s.objects[0].cy, 64.0, 0.05),
                    "{s:?}"
                );
            }
            if let [a, b] = &s.objects[..] {
                assert_ne!(a.colour, b.colour);
                let r = s.relation.unwrap();
                assert!(r.holds((a.cx, a.cy), (b.cx, b.cy), 0.15 * 64.0));
                assert!(separated(
                    (a.cx, a.cy),
                    (b.cx, b.cy),
                    a.side(64),
                    b.side(64),
                    2.0
                ));
            }
            let c = s.caption();
            assert!(!c.contains("  ") && !c.ends_with('.') && c == c.to_lowercase());
            assert!(!c.contains(" a o") && !c.contains(" a a"), "{c}");
        }
        // One object with probability 0.6.
        assert!((1100..1300).contains(&counts[0]), "{counts:?}");
        assert_ne!(Scene::generate(7, 0, 64), Scene::generate(8, 0, 64));
    }

    #[test]
    fn captions_follow_the_templates() {
        let st = Statement {
            objects: vec![ObjectStatement {
                shape: Shape::Circle,
                colour: Some(0),
                size: Some(Size::Large),
            }],
            position: Some(Position::Left),
            relation: None,
            background: Some(4),
        };
        assert_eq!(
            caption(&st),
            "a large red circle on the left on a blue background"
        );
        let st = Statement {
            objects: vec![
                ObjectStatement {
                    shape: Shape::Triangle,
                    colour: None,
                    size: None,
                },
                ObjectStatement {
                    shape: Shape::Square,
                    colour: Some(2),
                    size: None,
                },
            ],
            position: None,
            relation: Some(Relation::Above),
            background: None,
        };
        assert_eq!(caption(&st), "a triangle above a yellow square");
        let st = Statement {
            objects: vec![ObjectStatement {
                shape: Shape::Diamond,
                colour: Some(1),
                size: None,
            }],
            background: Some(1),
            ..Default::default()
        };
        assert_eq!(caption(&st), "an orange diamond on an orange background");
    }
}
