//! A training phase's log: one row per step (loss, learning rate, gradient norm), reported to
//! the front-end as it is recorded and written beside the checkpoints as `losses.csv` and the
//! plot `losses.png`.

use crate::io::write_atomic;
use crate::{Progress, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One logged step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// The rows of one phase (`"vae"`, `"unet"`) of `total` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingLog {
    pub phase: &'static str,
    pub total: usize,
    pub rows: Vec<LogRow>,
}

impl TrainingLog {
    pub fn new(phase: &'static str, total: usize, rows: Vec<LogRow>) -> Self {
        Self { phase, total, rows }
    }

    /// Appends a finished step and reports it to the front-end.
    pub fn record(&mut self, row: LogRow, progress: &mut dyn FnMut(&Progress)) {
        self.rows.push(row);
        progress(&Progress {
            phase: self.phase,
            step: row.step,
            total: self.total,
            loss: row.loss,
            note: None,
        });
    }

    /// Reports a line worth keeping (a checkpoint's measurements) after the last step.
    pub fn note(&self, note: String, progress: &mut dyn FnMut(&Progress)) {
        let last = self.rows.last();
        progress(&Progress {
            phase: self.phase,
            step: last.map_or(0, |r| r.step),
            total: self.total,
            loss: last.map_or(f64::NAN, |r| r.loss),
            note: Some(note),
        });
    }

    /// The last step's loss (NaN before the first).
    pub fn final_loss(&self) -> f64 {
        self.rows.last().map_or(f64::NAN, |r| r.loss)
    }

    /// `dir/losses.csv` (`step,loss,lr,grad_norm`) and `dir/losses.png`, atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut text = String::from("step,loss,lr,grad_norm\n");
        for r in &self.rows {
            text += &format!("{},{},{},{}\n", r.step, r.loss, r.lr, r.grad_norm);
        }
        write_atomic(&dir.join("losses.csv"), text.as_bytes())?;
        let points: Vec<(usize, f64)> = self.rows.iter().map(|r| (r.step, r.loss)).collect();
        crate::plot::plot_losses(&points, &dir.join("losses.png"))
    }
}
