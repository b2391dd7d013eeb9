//! Cumulative per-version statistics in Triton's shape (`v2/models/{m}/stats`).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Duration2 {
    pub count: u64,
    pub ns: u64,
}

impl Duration2 {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns += d.as_nanos() as u64;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub compute_input: Duration2,
    pub compute_infer: Duration2,
    pub compute_output: Duration2,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Milliseconds since the epoch; 0 before the first inference.
    pub last_inference_ms: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub success: Duration2,
    pub fail: Duration2,
    pub queue: Duration2,
    pub compute_input: Duration2,
    pub compute_infer: Duration2,
    pub compute_output: Duration2,
    pub batches: BTreeMap<u64, BatchStats>,
}

/// Updated once per batch and once per request, so a plain mutex is cheap here.
#[derive(Default)]
pub struct Stats {
    inner: Mutex<Snapshot>,
}

/// Timings of one executed batch.
pub struct BatchTiming {
    pub size: usize,
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

impl Stats {
    pub fn record_batch(&self, t: &BatchTiming) {
        let mut s = self.inner.lock();
        s.execution_count += 1;
        s.inference_count += t.size as u64;
        s.last_inference_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        s.compute_input.add(t.input);
        s.compute_infer.add(t.infer);
        s.compute_output.add(t.output);
        let b = s.batches.entry(t.size as u64).or_default();
        b.compute_input.add(t.input);
        b.compute_infer.add(t.infer);
        b.compute_output.add(t.output);
    }

    pub fn record_request(&self, queued: Duration, total: Duration, ok: bool) {
        let mut s = self.inner.lock();
        s.queue.add(queued);
        if ok {
            s.success.add(total);
        } else {
            s.fail.add(total);
        }
    }

    pub fn record_failure(&self, total: Duration) {
        self.inner.lock().fail.add(total);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().clone()
    }
}
