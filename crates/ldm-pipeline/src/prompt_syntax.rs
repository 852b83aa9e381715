//! A1111's prompt syntax (`modules/prompt_parser.py: parse_prompt_attention`): `(text)` weighs
//! ×1.1, `[text]` ×1/1.1, `(text:1.3)` sets a factor, brackets nest and multiply, `\(` `\)`
//! `\[` `\]` `\\` are literal, unclosed brackets still apply, and `BREAK` ends a 75-token chunk.

/// A run of prompt text with one weight; `Break` forces a new chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String, f64),
    Break,
}

/// Splits `BREAK` (a whole word, with the whitespace around it) out of plain text.
fn split_breaks(text: &str, out: &mut Vec<(String, f64, bool)>) {
    let mut rest = text;
    loop {
        let found = rest.match_indices("BREAK").find(|(i, _)| {
            let before = rest[..*i].chars().next_back();
            let after = rest[i + 5..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        });
        match found {
            Some((i, _)) => {
                out.push((rest[..i].trim_end().to_string(), 1.0, false));
                out.push((String::new(), -1.0, true));
                rest = rest[i + 5..].trim_start();
            }
            None => {
                out.push((rest.to_string(), 1.0, false));
                return;
            }
        }
    }
}

/// Parses a prompt into weighted pieces (runs of equal weight merged, as A1111 does).
pub fn parse(text: &str) -> Vec<Piece> {
    // (text, weight, is_break)
    let mut res: Vec<(String, f64, bool)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64, bool)>, from: usize, m: f64| {
        for r in res.iter_mut().skip(from) {
            if !r.2 {
                r.1 *= m;
            }
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() && "()[]\\".contains(chars[i + 1]) => {
                res.push((chars[i + 1].to_string(), 1.0, false));
                i += 2;
            }
            '(' => {
                round.push(res.len());
                i += 1;
            }
            '[' => {
                square.push(res.len());
                i += 1;
            }
            ')' if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, 1.1);
                i += 1;
            }
            ']' if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, 1.0 / 1.1);
                i += 1;
            }
            ':' => {
                // `:<number>)` closes a round bracket with an explicit weight.
                let mut j = i + 1;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let start = j;
                if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                    j += 1;
                }
                while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                    j += 1;
                }
                let number: String = chars[start..j].iter().collect();
                let mut k = j;
                while k < chars.len() && chars[k].is_whitespace() {
                    k += 1;
                }
                let weight = number.parse::<f64>().ok().filter(|_| j > start);
                match (weight, chars.get(k)) {
                    (Some(w), Some(')')) if !round.is_empty() => {
                        let from = round.pop().unwrap_or(0);
                        multiply(&mut res, from, w);
                        i = k + 1;
                    }
                    _ => {
                        res.push((":".into(), 1.0, false));
                        i += 1;
                    }
                }
            }
            _ => {
                // Plain text up to the next special character.
                let mut j = i + 1;
                while j < chars.len() && !"\\()[]:".contains(chars[j]) {
                    j += 1;
                }
                let run: String = chars[i..j].iter().collect();
                split_breaks(&run, &mut res);
                i = j;
            }
        }
    }
    for from in round.drain(..).rev().collect::<Vec<_>>() {
        multiply(&mut res, from, 1.1);
    }
    for from in square.drain(..).rev().collect::<Vec<_>>() {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    // Merge neighbours of equal weight.
    let mut merged: Vec<(String, f64, bool)> = Vec::new();
    for r in res {
        match merged.last_mut() {
            Some(last) if !last.2 && !r.2 && last.1 == r.1 => last.0.push_str(&r.0),
            _ => merged.push(r),
        }
    }
    let pieces: Vec<Piece> = merged
        .into_iter()
        .filter(|r| r.2 || !r.0.is_empty())
        .map(|(t, w, brk)| if brk { Piece::Break } else { Piece::Text(t, w) })
        .collect();
    if pieces.is_empty() {
        vec![Piece::Text(String::new(), 1.0)]
    } else {
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Piece {
        Piece::Text(s.into(), w)
    }

    fn close(a: &[Piece], b: &[Piece]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| match (x, y) {
                (Piece::Text(s1, w1), Piece::Text(s2, w2)) => s1 == s2 && (w1 - w2).abs() < 1e-9,
                (Piece::Break, Piece::Break) => true,
                _ => false,
            })
    }

    #[test]
    fn a1111_examples() {
        // The examples from A1111's parse_prompt_attention docstring.
        let cases: Vec<(&str, Vec<Piece>)> = vec![
            ("normal text", vec![t("normal text", 1.0)]),
            (
                "an (important) word",
                vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)],
            ),
            ("(unbalanced", vec![t("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![t("(literal]", 1.0)]),
            ("(unnecessary)(parens)", vec![t("unnecessaryparens", 1.1)]),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    t("a ", 1.0),
                    t("house", 1.5730000000000004),
                    t(" ", 1.1),
                    t("on", 1.0),
                    t(" a ", 1.1),
                    t("hill", 0.55),
                    t(", sun, ", 1.1),
                    t("sky", 1.4641000000000006),
                    t(".", 1.1),
                ],
            ),
        ];
        for (text, expect) in cases {
            let got = parse(text);
            assert!(close(&got, &expect), "{text}: {got:?}");
        }
    }

    #[test]
    fn breaks_and_colons() {
        assert!(close(
            &parse("a cat BREAK a dog"),
            &[t("a cat", 1.0), Piece::Break, t("a dog", 1.0)]
        ));
        assert!(close(&parse("BREAKFAST"), &[t("BREAKFAST", 1.0)]));
        assert!(close(&parse("ratio 16:9"), &[t("ratio 16:9", 1.0)]));
        assert!(close(&parse(""), &[t("", 1.0)]));
    }
}
