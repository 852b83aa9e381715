//! Progress of the long commands (training, distillation, evaluation). On a terminal,
//! indicatif's bar; where stderr is not one (a log file, `nohup`, CI) the bar would draw
//! nothing, so plain lines on stderr instead: one at each tenth of the way, and the notes the
//! bar would print above itself.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A progress bar that degrades to log lines.
pub struct Bar {
    pb: ProgressBar,
    lines: Option<Lines>,
}

/// The log-line state: where the next line is due.
struct Lines {
    started: Instant,
    prefix: String,
    message: String,
    length: u64,
    /// The next tenth of the way (1 to 10) that prints a line.
    next_tenth: u64,
}

impl Bar {
    /// A bar of `total` steps, with the training style (prefix, bar, position, times, message)
    /// or the plain one.
    pub fn new(total: usize, styled: bool) -> Self {
        let pb = ProgressBar::new(total as u64);
        if styled {
            pb.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
        }
        let lines = (!std::io::stderr().is_terminal()).then(|| Lines {
            started: Instant::now(),
            prefix: String::new(),
            message: String::new(),
            length: total as u64,
            next_tenth: 1,
        });
        Self { pb, lines }
    }

    pub fn set_prefix(&mut self, prefix: &str) {
        self.pb.set_prefix(prefix.to_string());
        if let Some(l) = &mut self.lines {
            l.prefix = prefix.to_string();
        }
    }

    pub fn set_message(&mut self, message: String) {
        if let Some(l) = &mut self.lines {
            l.message.clone_from(&message);
        }
        self.pb.set_message(message);
    }

    pub fn set_length(&mut self, length: usize) {
        self.pb.set_length(length as u64);
        if let Some(l) = &mut self.lines {
            l.length = length as u64;
        }
    }

    /// Moves to `position`; without a terminal, prints a line when it passes a tenth of the way.
    pub fn set_position(&mut self, position: usize) {
        let position = position as u64;
        self.pb.set_position(position);
        let Some(l) = &mut self.lines else { return };
        if l.length == 0 || position * 10 < l.next_tenth * l.length {
            return;
        }
        while l.next_tenth <= 10 && position * 10 >= l.next_tenth * l.length {
            l.next_tenth += 1;
        }
        let elapsed = l.started.elapsed();
        let left = elapsed.mul_f64((l.length - position.min(l.length)) as f64 / position as f64);
        eprintln!(
            "{}{position}/{} [{} elapsed, {} left] {}",
            if l.prefix.is_empty() {
                String::new()
            } else {
                format!("{} ", l.prefix)
            },
            l.length,
            clock(elapsed),
            clock(left),
            l.message
        );
    }

    /// A note above the bar, or a line of its own without a terminal.
    pub fn println(&self, line: String) {
        match self.lines {
            Some(_) => eprintln!("{line}"),
            None => self.pb.println(line),
        }
    }

    pub fn finish(&self) {
        self.pb.finish();
    }

    pub fn finish_and_clear(&self) {
        self.pb.finish_and_clear();
    }
}

/// `h:mm:ss`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_hours_minutes_seconds() {
        assert_eq!(clock(Duration::from_secs(3725)), "1:02:05");
        assert_eq!(clock(Duration::from_secs(59)), "0:00:59");
    }
}
