//! The job queue: every generation, whichever API asked for it, is a job in one FIFO with a
//! bounded length, run one at a time by one worker thread over the one resident model (on a
//! 2-core machine parallel generations only compete). Jobs carry their progress, an event log
//! (for server-sent events and `Last-Event-ID` replays) and flags that stop them at their next
//! step: cancel (nothing kept), interrupt (A1111: keep what was made, stop) and skip (A1111:
//! keep the current image as it is, go on with the next). Finished jobs are kept for a while,
//! then forgotten (their ids answer 410 Gone).

use crate::model::Model;
use crate::params::GenParams;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// How far a job has got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// `queued`, `sampling`, `decoding` or `done`.
    pub phase: &'static str,
    /// Steps done of the current image, and its steps.
    pub step: usize,
    pub steps: usize,
    /// The current image (0-based) and how many the job makes.
    pub image: usize,
    pub images: usize,
    /// Seconds left, from the mean step time so far.
    pub eta_seconds: Option<f64>,
}

impl Progress {
    /// Fraction done over the whole job.
    pub fn fraction(&self) -> f64 {
        if self.images == 0 || self.steps == 0 {
            return 0.0;
        }
        ((self.image as f64 + self.step as f64 / self.steps as f64) / self.images as f64).min(1.0)
    }
}

/// One image a job made.
#[derive(Debug, Clone)]
pub struct Image {
    pub png: Vec<u8>,
    pub seed: u64,
    pub infotext: String,
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    pub kind: &'static str,
    pub data: Value,
}

/// Stop requests a running job sees at its next step.
#[derive(Debug, Default)]
pub struct Flags {
    pub cancel: AtomicBool,
    pub interrupt: AtomicBool,
    pub skip: AtomicBool,
}

impl Flags {
    pub fn stop_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
            || self.interrupt.load(Ordering::Relaxed)
            || self.skip.load(Ordering::Relaxed)
    }
}

/// A job and everything known about it.
pub struct Job {
    pub id: String,
    pub params: Arc<GenParams>,
    pub status: Status,
    pub progress: Progress,
    pub images: Vec<Image>,
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    /// Every event but previews, for replays.
    pub events: Vec<Event>,
    pub preview: Option<Vec<u8>>,
    pub flags: Arc<Flags>,
    pub tx: broadcast::Sender<Event>,
    next_event: u64,
}

impl Job {
    fn emit(&mut self, kind: &'static str, data: Value) {
        self.next_event += 1;
        let ev = Event {
            id: self.next_event,
            kind,
            data,
        };
        if kind != "preview" {
            self.events.push(ev.clone());
        }
        // No receivers is fine: nobody is listening.
        let _ = self.tx.send(ev);
    }
}

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy)]
pub struct QueueFull {
    /// Seconds after which a retry may find room.
    pub retry_after: u64,
}

/// What a job id names.
pub enum Lookup<T> {
    Found(T),
    /// Finished long enough ago to be forgotten.
    Gone,
    Missing,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, Job>,
    waiting: VecDeque<String>,
    running: Option<String>,
    expired: HashSet<String>,
    counter: u64,
    /// Mean seconds a job took, for `Retry-After`.
    mean_job_seconds: f64,
}

/// The queue shared by the HTTP handlers and the worker.
pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    /// Most jobs waiting (the running one not counted).
    pub max_queued: usize,
    /// How long finished jobs are kept.
    pub keep: Duration,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Queue {
    pub fn new(max_queued: usize, keep: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            max_queued,
            keep,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the server, so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job; returns its id and its place in the queue (0: next to run).
    pub fn submit(&self, params: GenParams) -> Result<(String, usize), QueueFull> {
        let mut s = self.lock();
        self.sweep(&mut s);
        if s.waiting.len() >= self.max_queued {
            let per_job = if s.mean_job_seconds > 0.0 {
                s.mean_job_seconds
            } else {
                5.0
            };
            return Err(QueueFull {
                retry_after: (per_job * s.waiting.len() as f64).ceil().max(1.0) as u64,
            });
        }
        s.counter += 1;
        let id = format!("{:08x}{:08x}", now_unix() as u32, s.counter as u32);
        let (tx, _) = broadcast::channel(64);
        let images = params.images();
        let mut job = Job {
            id: id.clone(),
            params: Arc::new(params),
            status: Status::Queued,
            progress: Progress {
                phase: "queued",
                images,
                ..Progress::default()
            },
            images: Vec::new(),
            error: None,
            created: now_unix(),
            started: None,
            finished: None,
            events: Vec::new(),
            preview: None,
            flags: Arc::new(Flags::default()),
            tx,
            next_event: 0,
        };
        let position = s.waiting.len();
        job.emit("queued", json!({"id": id, "queue_position": position}));
        s.jobs.insert(id.clone(), job);
        s.waiting.push_back(id.clone());
        self.wake.notify_all();
        Ok((id, position))
    }

    /// Runs `f` on the job, if it is known.
    pub fn with_job<T>(&self, id: &str, f: impl FnOnce(&Job, usize) -> T) -> Lookup<T> {
        let mut s = self.lock();
        self.sweep(&mut s);
        let position = s.waiting.iter().position(|w| w == id).unwrap_or(0);
        match s.jobs.get(id) {
            Some(job) => Lookup::Found(f(job, position)),
            None if s.expired.contains(id) => Lookup::Gone,
            None => Lookup::Missing,
        }
    }

    /// Cancels a job: a queued one at once, a running one at its next step. Returns the
    /// status it had.
    pub fn cancel(&self, id: &str) -> Lookup<Status> {
        let mut s = self.lock();
        let Some(job) = s.jobs.get_mut(id) else {
            return if s.expired.contains(id) {
                Lookup::Gone
            } else {
                Lookup::Missing
            };
        };
        let was = job.status;
        match was {
            Status::Queued => {
                job.status = Status::Cancelled;
                job.finished = Some(Instant::now());
                job.progress.phase = "done";
                job.emit("cancelled", json!({"id": id}));
                job.tx = broadcast::channel(1).0;
                s.waiting.retain(|w| w != id);
            }
            Status::Running => job.flags.cancel.store(true, Ordering::Relaxed),
            _ => {}
        }
        Lookup::Found(was)
    }

    /// Sets a flag on the running job (A1111's interrupt and skip); false if none runs.
    pub fn signal_running(&self, flag: impl Fn(&Flags) -> &AtomicBool) -> bool {
        let s = self.lock();
        match s.running.as_ref().and_then(|id| s.jobs.get(id)) {
            Some(job) => {
                flag(&job.flags).store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The running job's id and the number of jobs waiting.
    pub fn overview(&self) -> (Option<String>, Vec<String>) {
        let s = self.lock();
        (s.running.clone(), s.waiting.iter().cloned().collect())
    }

    /// The event log after `after` and a receiver for what follows, taken together so that
    /// nothing falls between them.
    pub fn subscribe(
        &self,
        id: &str,
        after: u64,
    ) -> Lookup<(Vec<Event>, broadcast::Receiver<Event>, bool)> {
        self.with_job(id, |job, _| {
            let past = job
                .events
                .iter()
                .filter(|e| e.id > after)
                .cloned()
                .collect();
            (past, job.tx.subscribe(), job.status.is_final())
        })
    }

    /// Applies the worker's news about a job and emits its event.
    pub fn apply(&self, id: &str, update: Update) {
        let mut s = self.lock();
        let Some(job) = s.jobs.get_mut(id) else {
            return;
        };
        match update {
            Update::Progress(p) => {
                let data = json!({
                    "step": p.step, "steps": p.steps, "image": p.image, "images": p.images,
                    "eta_seconds": p.eta_seconds, "fraction": p.fraction(),
                });
                job.progress = p;
                job.emit("progress", data);
            }
            Update::Phase(phase) => job.progress.phase = phase,
            Update::Preview { png, step, image } => {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
                job.preview = Some(png);
                job.emit("preview", json!({"step": step, "image": image, "png": b64}));
            }
            Update::Image(img) => {
                let index = job.images.len();
                let seed = img.seed;
                job.images.push(img);
                job.emit("image", json!({"index": index, "seed": seed}));
            }
        }
    }

    /// Blocks until a job is waiting, marks it running and returns it.
    pub fn next(&self) -> (String, Arc<GenParams>, Arc<Flags>) {
        let mut s = self.lock();
        loop {
            if let Some(id) = s.waiting.pop_front() {
                if let Some(job) = s.jobs.get_mut(&id) {
                    job.status = Status::Running;
                    job.started = Some(Instant::now());
                    job.progress.phase = "sampling";
                    job.emit("started", json!({"id": id}));
                    let out = (id.clone(), job.params.clone(), job.flags.clone());
                    s.running = Some(id);
                    return out;
                }
                continue;
            }
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Records how a job ended.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut s = self.lock();
        s.running = None;
        let mut took = None;
        if let Some(job) = s.jobs.get_mut(id) {
            job.finished = Some(Instant::now());
            // Previews are for jobs in progress.
            job.preview = None;
            job.progress.phase = "done";
            job.progress.eta_seconds = Some(0.0);
            took = job.started.map(|t| t.elapsed().as_secs_f64());
            match outcome {
                Outcome::Succeeded => {
                    job.status = Status::Succeeded;
                    let n = job.images.len();
                    job.emit("completed", json!({"id": id, "images": n}));
                }
                Outcome::Cancelled => {
                    job.status = Status::Cancelled;
                    job.emit("cancelled", json!({"id": id}));
                }
                Outcome::Failed(message) => {
                    job.status = Status::Failed;
                    job.error = Some(message.clone());
                    job.emit("failed", json!({"id": id, "error": message}));
                }
            }
            // Listeners have the last event; a fresh, empty channel lets the old one's buffer
            // (previews included) go once they hang up. Later listeners replay `events`.
            job.tx = broadcast::channel(1).0;
        }
        if let Some(t) = took {
            s.mean_job_seconds = if s.mean_job_seconds == 0.0 {
                t
            } else {
                0.8 * s.mean_job_seconds + 0.2 * t
            };
        }
    }

    /// Forgets finished jobs older than `keep`.
    fn sweep(&self, s: &mut State) {
        let keep = self.keep;
        let old: Vec<String> = s
            .jobs
            .values()
            .filter(|j| j.finished.is_some_and(|t| t.elapsed() > keep))
            .map(|j| j.id.clone())
            .collect();
        for id in old {
            s.jobs.remove(&id);
            if s.expired.len() > 100_000 {
                s.expired.clear();
            }
            s.expired.insert(id);
        }
    }
}

/// What the worker reports while it runs a job.
pub enum Update {
    Progress(Progress),
    Phase(&'static str),
    /// A preview PNG after `step` steps of image `image`.
    Preview {
        png: Vec<u8>,
        step: usize,
        image: usize,
    },
    Image(Image),
}

/// How a job ended, as the worker reports it.
pub enum Outcome {
    Succeeded,
    Cancelled,
    Failed(String),
}

/// The worker: takes jobs in order and runs them on the model, forever.
pub fn run_worker(queue: Arc<Queue>, model: Arc<Model>) {
    loop {
        let (id, params, flags) = queue.next();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.run(&params, &flags, &mut |u| queue.apply(&id, u))
        }))
        .unwrap_or_else(|_| Outcome::Failed("the generation panicked".into()));
        queue.finish(&id, outcome);
    }
}
