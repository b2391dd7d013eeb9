//! Per-model-version request scheduling: a bounded priority queue, dynamic batch
//! formation and the instance threads that run batches on the engine.
//!
//! Callers submit from async code and await a oneshot; each engine instance is an OS
//! thread (engine calls block for milliseconds and must not stall the async runtime)
//! that takes the highest-priority request, waits up to `max_queue_delay` for
//! compatible company, runs the batch and answers every member.
//!
//! Requests whose client went away (the oneshot receiver dropped) or whose deadline
//! passed are discarded when dequeued, before any compute.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use lattice_observability::quality::std_dev;

use crate::model_metrics::ModelRecorder;

use crate::{
    backend::{Backend, BackendError},
    config::ModelConfig,
    error::InferError,
    pipeline::{mean_pool, pad_tokens, TextPipeline},
    stats::{BatchTiming, Stats},
    tensor::{Tensor, TensorData},
};

/// Priority levels: 0 = background ... 5 = realtime.
pub const PRIORITY_LEVELS: usize = 6;
pub const DEFAULT_PRIORITY: u8 = 2;
/// A validated request for one model version.
#[derive(Debug)]
pub struct InferRequest {
    pub id: String,
    /// Named inputs, already checked against the model config.
    pub inputs: Vec<(String, Tensor)>,
    /// Output names to return, in order; never empty after validation.
    pub outputs: Vec<String>,
    pub priority: u8,
    pub deadline: Option<Instant>,
    /// The warm-up inference a new version runs before it serves: computed like any
    /// other, kept out of the metrics.
    pub warm_up: bool,
}

/// Where a request's time went, for stats, metrics and response headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    pub queue: Duration,
    pub compute: Duration,
}

#[derive(Debug)]
pub struct InferResponse {
    pub id: String,
    /// The version that computed the answer (set by the repository).
    pub version: i64,
    /// Mean top-1 probability over this request's items, for models with a
    /// probability output.
    pub confidence: Option<f64>,
    pub outputs: Vec<(String, Tensor)>,
    pub timing: Timing,
}

/// What the instance threads need to run a batch, shared by all of them.
pub struct ModelRuntime {
    pub config: ModelConfig,
    /// Loaded once per model and shared by its versions.
    pub text: Option<Arc<TextPipeline>>,
    /// Outputs the engine itself produces (pooled outputs are computed after it).
    pub engine_outputs: Vec<String>,
    pub stats: Stats,
    /// This version's metric handles (its labels included), resolved at load.
    pub recorder: ModelRecorder,
}

struct Entry {
    req: InferRequest,
    /// Items in this request (its batch dimension); 1 when the model does not batch.
    items: usize,
    /// Inputs that must agree for requests to share a batch.
    signature: Vec<(String, crate::tensor::DataType, Vec<i64>)>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<InferResponse, InferError>>,
}

#[derive(Default)]
struct Queue {
    lanes: [VecDeque<Entry>; PRIORITY_LEVELS],
    len: usize,
    closed: bool,
}

impl Queue {
    fn pop_first(&mut self) -> Option<Entry> {
        let e = self.lanes.iter_mut().rev().find_map(|l| l.pop_front())?;
        self.len -= 1;
        Some(e)
    }

    /// Removes the first entry, highest priority first, that fits the batch.
    fn pop_compatible(&mut self, sig: &[(String, crate::tensor::DataType, Vec<i64>)], room: usize) -> Option<Entry> {
        for lane in self.lanes.iter_mut().rev() {
            if let Some(pos) = lane.iter().position(|e| e.items <= room && e.signature == sig) {
                self.len -= 1;
                return lane.remove(pos);
            }
        }
        None
    }
}

struct Shared {
    queue: Mutex<Queue>,
    available: Condvar,
    runtime: Arc<ModelRuntime>,
    /// Requests taken off the queue and not yet answered.
    in_flight: AtomicUsize,
    /// One engine instance per instance thread (index = thread). Locked while a batch
    /// runs: by its thread, or by a caller running a light request itself.
    backends: Vec<Mutex<Box<dyn Backend>>>,
    /// Recent engine time per batch in nanoseconds (moving average); `u64::MAX`
    /// until the first batch (the warm-up) has run.
    compute_ns: AtomicU64,
}

/// Models whose batches take at most this long (moving average) may run a request
/// on the calling thread when an instance is idle: that thread is an async runtime
/// worker, held up for this long at most per request, against the two cross-thread
/// wake-ups (to the instance thread and back) that cost tens of microseconds of CPU.
const INLINE_COMPUTE: Duration = Duration::from_micros(1000);

/// Cheap-to-clone handle to a model version's queue and instances.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

impl Scheduler {
    /// Starts one thread per backend instance.
    pub fn start(runtime: Arc<ModelRuntime>, backends: Vec<Box<dyn Backend>>) -> Scheduler {
        let count = backends.len();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            available: Condvar::new(),
            runtime,
            in_flight: AtomicUsize::new(0),
            backends: backends.into_iter().map(Mutex::new).collect(),
            compute_ns: AtomicU64::new(u64::MAX),
        });
        for i in 0..count {
            let shared = shared.clone();
            let name = format!("infer-{}-{i}", shared.runtime.config.name);
            thread::Builder::new()
                .name(name)
                .spawn(move || instance_task(shared, i))
                .expect("spawning an instance thread only fails when the OS is out of threads");
        }
        Scheduler { shared }
    }

    pub fn runtime(&self) -> &Arc<ModelRuntime> {
        &self.shared.runtime
    }

    /// Requests waiting in the queue.
    pub fn pending(&self) -> usize {
        self.shared.queue.lock().len
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Fails with `Overloaded` when the queue is full, before a request spends work
    /// (tokenization) it would only be refused after.
    pub fn check_room(&self) -> Result<(), InferError> {
        let rt = &self.shared.runtime;
        let limit = rt.config.queue().max_queue_size;
        if self.shared.queue.lock().len >= limit {
            return Err(InferError::Overloaded {
                model: rt.config.name.clone(),
                limit,
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(())
    }

    /// Queues a request; fails at once with `Overloaded` when the queue is full.
    pub fn submit(
        &self,
        req: InferRequest,
    ) -> Result<oneshot::Receiver<Result<InferResponse, InferError>>, InferError> {
        let rt = &self.shared.runtime;
        let limit = rt.config.queue().max_queue_size;
        let batching = rt.config.max_batch_size > 0;
        let text = rt.text.as_deref();
        let mut signature: Vec<_> = req
            .inputs
            .iter()
            .map(|(n, t)| {
                // Token sequences are padded to the batch's longest, so their length
                // never splits batches.
                let dims = if text.is_some_and(|t| t.is_token_input(n)) || !batching {
                    Vec::new()
                } else {
                    t.shape[1..].to_vec()
                };
                (n.clone(), t.dtype, dims)
            })
            .collect();
        signature.sort();
        let items = if batching {
            req.inputs
                .first()
                .map_or(1, |(_, t)| t.shape.first().copied().unwrap_or(1) as usize)
        } else {
            1
        };
        let (tx, rx) = oneshot::channel();
        let mut q = self.shared.queue.lock();
        if q.closed {
            return Err(InferError::ModelNotReady(rt.config.name.clone()));
        }
        if q.len >= limit {
            return Err(InferError::Overloaded {
                model: rt.config.name.clone(),
                limit,
                retry_after: Duration::from_secs(1),
            });
        }
        let lane = usize::from(req.priority).min(PRIORITY_LEVELS - 1);
        q.lanes[lane].push_back(Entry {
            req,
            items,
            signature,
            enqueued: Instant::now(),
            reply: tx,
        });
        q.len += 1;
        drop(q);
        self.shared.available.notify_one();
        Ok(rx)
    }

    /// Runs a light request on the calling thread when that changes nothing but
    /// who runs it: the model's batches are short (under [`INLINE_COMPUTE`]), nothing
    /// is queued or running (so no one is overtaken), the model does not wait for
    /// company to batch with, and the request is one item. Otherwise hands the
    /// request back, to be [submitted](Self::submit).
    pub fn run_here(&self, req: InferRequest) -> Result<Result<InferResponse, InferError>, InferRequest> {
        let shared = &*self.shared;
        let rt = &shared.runtime;
        let waits_for_company = rt
            .config
            .dynamic_batching
            .as_ref()
            .is_some_and(|_| !rt.config.queue().max_queue_delay().is_zero());
        if waits_for_company
            || shared.compute_ns.load(Ordering::Relaxed) > INLINE_COMPUTE.as_nanos() as u64
            || req.deadline.is_some_and(|d| Instant::now() >= d)
        {
            return Err(req);
        }
        let q = shared.queue.lock();
        // Only when every instance is idle: under load the instance threads are awake
        // anyway, so handing over is cheap, and a runtime worker stays free for I/O.
        if q.closed || q.len > 0 || shared.in_flight.load(Ordering::Relaxed) > 0 {
            return Err(req);
        }
        let Some(mut backend) = shared.backends.iter().find_map(|b| b.try_lock()) else {
            return Err(req);
        };
        // One item at most: the average bounds a batch like the ones measured, and a
        // request of many items could hold the worker far longer.
        let items = if rt.config.max_batch_size > 0 {
            req.inputs
                .first()
                .map_or(1, |(_, t)| t.shape.first().copied().unwrap_or(1) as usize)
        } else {
            1
        };
        if items > 1 {
            return Err(req);
        }
        let _in_flight = InFlight::new(&shared.in_flight, 1);
        drop(q);
        let (tx, mut rx) = oneshot::channel();
        let entry = Entry {
            req,
            items,
            signature: Vec::new(),
            enqueued: Instant::now(),
            reply: tx,
        };
        run_batch(shared, backend.as_mut(), vec![entry], items);
        drop(backend);
        Ok(rx
            .try_recv()
            .unwrap_or_else(|_| Err(InferError::Backend("the model instance did not answer".into()))))
    }

    /// Stops accepting requests; the instances finish what is queued, then exit and
    /// release their engine sessions.
    pub fn close(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.available.notify_all();
    }
}

/// Takes a request that is still wanted, or `None` once closed and drained.
fn next_live(shared: &Shared, q: &mut parking_lot::MutexGuard<'_, Queue>) -> Option<Entry> {
    loop {
        match q.pop_first() {
            Some(e) => match check_live(&e) {
                Ok(()) => return Some(e),
                Err(err) => discard(shared, e, err),
            },
            None if q.closed => return None,
            None => shared.available.wait(q),
        }
    }
}

fn check_live(e: &Entry) -> Result<(), InferError> {
    if e.reply.is_closed() {
        return Err(InferError::Cancelled);
    }
    if e.req.deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(InferError::DeadlineExceeded);
    }
    Ok(())
}

fn discard(shared: &Shared, e: Entry, err: InferError) {
    shared.runtime.stats.record_failure(e.enqueued.elapsed());
    let _ = e.reply.send(Err(err));
}

fn instance_task(shared: Arc<Shared>, index: usize) {
    let rt = shared.runtime.clone();
    let delay = rt.config.queue().max_queue_delay();
    let cap = rt.config.dynamic_batch_cap();
    loop {
        let mut q = shared.queue.lock();
        let Some(first) = next_live(&shared, &mut q) else {
            break;
        };
        let mut size = first.items;
        let mut batch = vec![first];
        if rt.config.dynamic_batching.is_some() {
            let until = batch[0].enqueued + delay;
            while size < cap {
                if let Some(e) = q.pop_compatible(&batch[0].signature, cap - size) {
                    match check_live(&e) {
                        Ok(()) => {
                            size += e.items;
                            batch.push(e);
                        }
                        Err(err) => discard(&shared, e, err),
                    }
                    continue;
                }
                if q.closed || Instant::now() >= until {
                    break;
                }
                // Wait for company; a notify means a new request arrived.
                let _ = shared.available.wait_until(&mut q, until);
            }
        }
        let _in_flight = InFlight::new(&shared.in_flight, batch.len());
        drop(q);
        // Its own instance, else any idle one (a caller may be running a light request
        // on its own); waits for its own only when none is idle.
        let mut backend = shared.backends[index]
            .try_lock()
            .or_else(|| shared.backends.iter().find_map(|b| b.try_lock()))
            .unwrap_or_else(|| shared.backends[index].lock());
        run_batch(&shared, backend.as_mut(), batch, size);
    }
    // Release the engine session before the thread ends, then hand freed heap pages
    // back to the OS so unloading a model lowers RSS.
    let session = std::mem::replace(&mut *shared.backends[index].lock(), Box::new(Released));
    drop(session);
    trim_heap();
}

/// Stands in for an instance's engine session once its thread has ended and dropped
/// the real one.
struct Released;

impl Backend for Released {
    fn run(&mut self, _: Vec<(String, Tensor)>, _: &[String]) -> Result<Vec<Tensor>, BackendError> {
        Err(BackendError::Engine("the model instance was released".into()))
    }

    fn inputs(&self) -> Vec<(String, Option<crate::tensor::DataType>)> {
        Vec::new()
    }

    fn outputs(&self) -> Vec<(String, Option<crate::tensor::DataType>)> {
        Vec::new()
    }
}

/// Counts requests taken off the queue until they are answered, even when the run
/// unwinds: the autoscaler reads this count.
struct InFlight<'a> {
    count: &'a AtomicUsize,
    n: usize,
}

impl<'a> InFlight<'a> {
    fn new(count: &'a AtomicUsize, n: usize) -> Self {
        count.fetch_add(n, Ordering::Relaxed);
        InFlight { count, n }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Hands the heap's free pages back to the OS (glibc keeps them otherwise): after a
/// model is loaded or its sessions are dropped.
#[allow(unsafe_code)]
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

fn run_batch(shared: &Shared, backend: &mut dyn Backend, batch: Vec<Entry>, size: usize) {
    let rt = &*shared.runtime;
    let started = Instant::now();
    // A panic in the engine or in pooling answers this batch with an error instead of
    // ending the instance thread, which would leave the model unable to serve.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compute(rt, backend, &batch, size)))
        .unwrap_or_else(|_| Err(InferError::Backend("the model instance panicked on this batch".into())));
    let compute_time = started.elapsed();
    let ns = u64::try_from(compute_time.as_nanos()).unwrap_or(u64::MAX);
    let avg = match shared.compute_ns.load(Ordering::Relaxed) {
        u64::MAX => ns,
        prev => prev - prev / 8 + ns / 8,
    };
    shared.compute_ns.store(avg, Ordering::Relaxed);
    match result {
        Ok((outputs, timing)) => {
            rt.stats.record_batch(&timing);
            let rec = &rt.recorder;
            let recording = rec.enabled() && batch.iter().any(|e| !e.req.warm_up);
            if recording {
                rec.batch_size.observe(size as f64);
                rec.compute_duration.observe(compute_time.as_secs_f64());
                rec.set()
                    .observe_service_time(compute_time.as_secs_f64() / size.max(1) as f64);
            }
            let confidences = if recording {
                batch_quality(rt, &outputs)
            } else {
                Vec::new()
            };
            let mut offset = 0;
            for e in batch {
                let queued = started.duration_since(e.enqueued);
                let mine = slice_outputs(
                    &outputs,
                    offset,
                    e.items,
                    size,
                    &e.req.outputs,
                    rt.config.max_batch_size > 0,
                );
                let confidence = (!confidences.is_empty()).then(|| {
                    let own = &confidences[offset.min(confidences.len())..(offset + e.items).min(confidences.len())];
                    own.iter().sum::<f64>() / own.len().max(1) as f64
                });
                offset += e.items;
                rt.stats.record_request(queued, e.enqueued.elapsed(), mine.is_ok());
                if recording {
                    rec.queue_duration.observe(queued.as_secs_f64());
                    rec.set().observe_queue_time(queued.as_secs_f64());
                    rec.request_duration.observe(e.enqueued.elapsed().as_secs_f64());
                }
                let resp = mine.map(|outputs| InferResponse {
                    id: e.req.id,
                    version: 0,
                    confidence,
                    outputs,
                    timing: Timing {
                        queue: queued,
                        compute: compute_time,
                    },
                });
                let _ = e.reply.send(resp);
            }
        }
        // One request's bad input must not fail the others merged with it: run each
        // alone so only the culprit gets the error.
        Err(InferError::Backend(_) | InferError::InvalidInput(_)) if batch.len() > 1 => {
            for e in batch {
                let items = e.items;
                run_batch(shared, backend, vec![e], items);
            }
        }
        Err(err) => {
            for e in batch {
                rt.stats
                    .record_request(started.duration_since(e.enqueued), e.enqueued.elapsed(), false);
                let _ = e.reply.send(Err(err.clone()));
            }
        }
    }
}

/// Records confidence and entropy of every item and their spread across the batch;
/// returns the items' top-1 confidences in batch order.
fn batch_quality(rt: &ModelRuntime, outputs: &[(String, Tensor)]) -> Vec<f64> {
    let Some(q) = &rt.config.quality else {
        return Vec::new();
    };
    let Some((_, t)) = outputs.iter().find(|(n, _)| *n == q.output) else {
        return Vec::new();
    };
    let items = crate::quality::item_confidences(q.kind, t);
    for &(c, h) in &items {
        rt.recorder.confidence.observe(c);
        rt.recorder.entropy.observe(h);
    }
    let tops: Vec<f64> = items.iter().map(|&(c, _)| c).collect();
    rt.recorder.batch_confidence_stddev.observe(std_dev(&tops));
    tops
}

/// Concatenates the batch, runs the engine and adds pooled outputs.
fn compute(
    rt: &ModelRuntime,
    backend: &mut dyn Backend,
    batch: &[Entry],
    size: usize,
) -> Result<(Vec<(String, Tensor)>, BatchTiming), InferError> {
    let t0 = Instant::now();
    let inputs = concat_inputs(batch, rt.config.max_batch_size > 0, rt.text.as_deref());
    let mask = rt
        .config
        .pooling
        .as_ref()
        .and_then(|p| inputs.iter().find(|(n, _)| *n == p.mask).map(|(_, t)| t.clone()));
    let t1 = Instant::now();
    let engine_out = backend.run(inputs, &rt.engine_outputs).map_err(|e| match e {
        BackendError::Input(m) => InferError::InvalidInput(m),
        BackendError::Engine(m) => InferError::Backend(m),
    })?;
    let t2 = Instant::now();
    let mut outputs: Vec<(String, Tensor)> = rt.engine_outputs.iter().cloned().zip(engine_out).collect();
    if let Some(p) = &rt.config.pooling {
        let states = outputs
            .iter()
            .find(|(n, _)| *n == p.source)
            .map(|(_, t)| t)
            .ok_or_else(|| InferError::Backend(format!("pooling source '{}' missing", p.source)))?;
        let mask = mask.ok_or_else(|| InferError::Backend(format!("pooling mask '{}' missing", p.mask)))?;
        let pooled = mean_pool(p, states, &mask).map_err(|e| InferError::Backend(e.to_string()))?;
        outputs.push((p.output.clone(), pooled));
    }
    let timing = BatchTiming {
        size,
        input: t1 - t0,
        infer: t2 - t1,
        output: t2.elapsed(),
    };
    Ok((outputs, timing))
}

fn concat_inputs(batch: &[Entry], batching: bool, text: Option<&TextPipeline>) -> Vec<(String, Tensor)> {
    if batch.len() == 1 || !batching {
        return batch[0].req.inputs.clone();
    }
    let mut out = Vec::with_capacity(batch[0].req.inputs.len());
    for (name, first) in &batch[0].req.inputs {
        let parts = batch.iter().map(|e| {
            &e.req
                .inputs
                .iter()
                .find(|(n, _)| n == name)
                .expect("batched requests share a signature")
                .1
        });
        let mut shape = first.shape.clone();
        shape[0] = batch.iter().map(|e| e.items as i64).sum();
        // Token sequences of different lengths are padded to the longest.
        let pad_to = text
            .filter(|t| t.is_token_input(name))
            .and_then(|_| parts.clone().filter_map(|p| p.shape.get(1).copied()).max());
        if let (Some(to), Some(dim)) = (pad_to, shape.get_mut(1)) {
            *dim = to;
        }
        let data = match &first.data {
            TensorData::Raw(_) => {
                let mut buf = BytesMut::new();
                for p in parts {
                    match pad_to {
                        Some(to) => buf.extend_from_slice(pad_tokens(p, to).raw_bytes()),
                        None => buf.extend_from_slice(p.raw_bytes()),
                    }
                }
                TensorData::Raw(buf.freeze())
            }
            TensorData::Strings(_) => {
                let mut items: Vec<Bytes> = Vec::new();
                for p in parts {
                    if let TensorData::Strings(s) = &p.data {
                        items.extend(s.iter().cloned());
                    }
                }
                TensorData::Strings(items)
            }
        };
        out.push((
            name.clone(),
            Tensor {
                dtype: first.dtype,
                shape,
                data,
            },
        ));
    }
    out
}

/// Cuts one request's rows out of the batch outputs and keeps the outputs it asked for.
fn slice_outputs(
    outputs: &[(String, Tensor)],
    offset: usize,
    items: usize,
    total: usize,
    wanted: &[String],
    batching: bool,
) -> Result<Vec<(String, Tensor)>, InferError> {
    wanted
        .iter()
        .map(|name| {
            let (_, t) = outputs
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| InferError::Backend(format!("output '{name}' was not produced")))?;
            if !batching || (offset == 0 && items == total) {
                return Ok((name.clone(), t.clone()));
            }
            if t.shape.first().copied() != Some(total as i64) {
                return Err(InferError::Backend(format!(
                    "output '{name}' has shape {:?}, expected batch dimension {total}",
                    t.shape
                )));
            }
            let mut shape = t.shape.clone();
            shape[0] = items as i64;
            let data = match &t.data {
                TensorData::Raw(b) => {
                    let row = b.len() / total;
                    TensorData::Raw(b.slice(offset * row..(offset + items) * row))
                }
                TensorData::Strings(s) => {
                    let row = s.len() / total;
                    TensorData::Strings(s[offset * row..(offset + items) * row].to_vec())
                }
            };
            Ok((
                name.clone(),
                Tensor {
                    dtype: t.dtype,
                    shape,
                    data,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The scheduler on a mock engine: no ONNX Runtime, so these run anywhere and
    //! can make the engine block, fail or panic on cue.

    use std::sync::mpsc as std_mpsc;

    use super::*;
    use crate::{
        backend::BackendError,
        model_metrics::{ModelLabels, ModelMetrics},
        tensor::DataType,
    };

    /// Identity on input `x` (INT64 [n, 1]); blocks on a gate when asked, fails on
    /// -2 and panics on -1; reports every batch size it ran.
    struct Mock {
        batches: std_mpsc::Sender<Vec<i64>>,
        ran_on: std_mpsc::Sender<(Vec<i64>, std::thread::ThreadId)>,
        gate: Option<std_mpsc::Receiver<()>>,
    }

    impl Backend for Mock {
        fn run(&mut self, inputs: Vec<(String, Tensor)>, outputs: &[String]) -> Result<Vec<Tensor>, BackendError> {
            let x = inputs[0].1.clone();
            let values = x.to_i64_vec().expect("INT64");
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
            let _ = self.batches.send(values.clone());
            let _ = self.ran_on.send((values.clone(), std::thread::current().id()));
            if values.contains(&-1) {
                panic!("the engine fell over");
            }
            if values.contains(&-2) {
                return Err(BackendError::Input("-2 is not a valid value".into()));
            }
            Ok(outputs.iter().map(|_| x.clone()).collect())
        }

        fn inputs(&self) -> Vec<(String, Option<DataType>)> {
            vec![("x".into(), Some(DataType::I64))]
        }

        fn outputs(&self) -> Vec<(String, Option<DataType>)> {
            vec![("y".into(), Some(DataType::I64))]
        }
    }

    struct Harness {
        scheduler: Scheduler,
        batches: std_mpsc::Receiver<Vec<i64>>,
        ran_on: std_mpsc::Receiver<(Vec<i64>, std::thread::ThreadId)>,
        gate: Option<std_mpsc::Sender<()>>,
    }

    fn harness(queue_size: usize, delay_us: u64, gated: bool) -> Harness {
        let config: ModelConfig = toml::from_str(&format!(
            r#"
            name = "mock"
            max_batch_size = 8
            [[input]]
            name = "x"
            data_type = "INT64"
            dims = [1]
            [[output]]
            name = "y"
            data_type = "INT64"
            dims = [1]
            [dynamic_batching]
            max_queue_delay_microseconds = {delay_us}
            max_queue_size = {queue_size}
            "#
        ))
        .expect("config");
        let metrics = lattice_observability::Metrics::new();
        let recorder = metrics.set::<ModelMetrics>().recorder(&ModelLabels {
            model_name: "mock".into(),
            model_version: "1".into(),
        });
        let runtime = Arc::new(ModelRuntime {
            engine_outputs: vec!["y".into()],
            config,
            text: None,
            stats: Stats::default(),
            recorder,
        });
        let (tx, batches) = std_mpsc::channel();
        let (gate_tx, gate_rx) = std_mpsc::channel();
        let (ran_tx, ran_on) = std_mpsc::channel();
        let mock = Mock {
            batches: tx,
            ran_on: ran_tx,
            gate: gated.then_some(gate_rx),
        };
        Harness {
            scheduler: Scheduler::start(runtime, vec![Box::new(mock)]),
            batches,
            ran_on,
            gate: gated.then_some(gate_tx),
        }
    }

    fn request(value: i64, priority: u8, deadline: Option<Instant>) -> InferRequest {
        InferRequest {
            id: value.to_string(),
            inputs: vec![("x".into(), Tensor::from_i64(vec![1, 1], &[value]))],
            outputs: vec!["y".into()],
            priority,
            deadline,
            warm_up: false,
        }
    }

    type Reply = oneshot::Receiver<Result<InferResponse, InferError>>;

    fn answer(rx: Reply) -> Result<i64, InferError> {
        let r = rx.blocking_recv().expect("answered")?;
        Ok(r.outputs[0].1.to_i64_vec().expect("INT64")[0])
    }

    /// Submits `first`, waits until the engine holds it at the gate, then submits
    /// the rest: they are all queued when the gate opens.
    fn queue_behind_a_blocked_engine(h: &mut Harness, first: InferRequest, rest: Vec<InferRequest>) -> Vec<Reply> {
        let mut replies = vec![h.scheduler.submit(first).expect("queued")];
        while h.scheduler.in_flight() == 0 {
            std::thread::yield_now();
        }
        replies.extend(rest.into_iter().map(|r| h.scheduler.submit(r).expect("queued")));
        replies
    }

    fn open_gate(h: &Harness, times: usize) {
        for _ in 0..times {
            h.gate.as_ref().expect("gated").send(()).expect("engine waiting");
        }
    }

    #[test]
    fn waiting_requests_share_a_batch_in_priority_order() {
        let mut h = harness(16, 0, true);
        let replies = queue_behind_a_blocked_engine(
            &mut h,
            request(1, 2, None),
            vec![request(10, 0, None), request(20, 5, None), request(21, 5, None)],
        );
        open_gate(&h, 3);
        for (rx, want) in replies.into_iter().zip([1, 10, 20, 21]) {
            assert_eq!(answer(rx), Ok(want));
        }
        let order: Vec<Vec<i64>> = h.batches.try_iter().collect();
        // What waited shares the next batch, realtime first, then background.
        assert_eq!(order, vec![vec![1], vec![20, 21, 10]]);
        settles_to_zero(&h.scheduler);
    }

    /// The in-flight count drops just after the answers are sent.
    fn settles_to_zero(s: &Scheduler) {
        let until = Instant::now() + Duration::from_secs(10);
        while s.in_flight() != 0 {
            assert!(Instant::now() < until, "in-flight stuck at {}", s.in_flight());
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let mut h = harness(2, 0, true);
        let replies = queue_behind_a_blocked_engine(
            &mut h,
            request(1, 2, None),
            vec![request(2, 2, None), request(3, 2, None)],
        );
        let refused = h.scheduler.submit(request(4, 2, None)).expect_err("full");
        assert!(
            matches!(refused, InferError::Overloaded { limit: 2, .. }),
            "{refused:?}"
        );
        open_gate(&h, 3);
        for rx in replies {
            answer(rx).expect("the queued ones are served");
        }
    }

    #[test]
    fn expired_and_abandoned_requests_are_skipped_before_compute() {
        let mut h = harness(16, 0, true);
        let past = Instant::now();
        let mut replies = queue_behind_a_blocked_engine(
            &mut h,
            request(1, 2, None),
            vec![request(2, 2, Some(past)), request(3, 2, None), request(4, 2, None)],
        );
        // The client of request 3 goes away.
        drop(replies.remove(2));
        open_gate(&h, 2);
        let mut replies = replies.into_iter();
        assert_eq!(answer(replies.next().unwrap()), Ok(1));
        assert_eq!(answer(replies.next().unwrap()), Err(InferError::DeadlineExceeded));
        assert_eq!(answer(replies.next().unwrap()), Ok(4));
        let ran: Vec<i64> = h.batches.try_iter().flatten().collect();
        assert_eq!(ran, vec![1, 4], "neither the expired nor the abandoned request ran");
    }

    #[test]
    fn an_engine_panic_fails_its_batch_and_the_instance_keeps_serving() {
        let h = harness(16, 0, false);
        let rx = h.scheduler.submit(request(-1, 2, None)).expect("queued");
        assert!(matches!(answer(rx), Err(InferError::Backend(_))));
        let rx = h.scheduler.submit(request(7, 2, None)).expect("queued");
        assert_eq!(answer(rx), Ok(7));
        // The in-flight count survives the unwind.
        settles_to_zero(&h.scheduler);
    }

    #[test]
    fn a_bad_input_fails_only_its_own_request_in_a_merged_batch() {
        let mut h = harness(16, 0, true);
        let replies = queue_behind_a_blocked_engine(
            &mut h,
            request(1, 2, None),
            vec![request(5, 2, None), request(-2, 2, None), request(6, 2, None)],
        );
        // The merged batch fails, then each member runs alone.
        open_gate(&h, 5);
        let got: Vec<_> = replies.into_iter().map(answer).collect();
        assert_eq!(got[0], Ok(1));
        assert_eq!(got[1], Ok(5));
        assert!(matches!(got[2], Err(InferError::InvalidInput(_))), "{:?}", got[2]);
        assert_eq!(got[3], Ok(6));
    }

    #[test]
    fn a_light_request_runs_on_the_calling_thread_only_when_an_instance_is_idle() {
        let mut h = harness(16, 0, true);
        // No batch has run yet: how long one takes is unknown, so nothing runs here.
        let back = h.scheduler.run_here(request(3, 2, None)).expect_err("unmeasured model");
        let rx = h.scheduler.submit(back).expect("queued");
        open_gate(&h, 1);
        assert_eq!(answer(rx), Ok(3));
        settles_to_zero(&h.scheduler);
        // Measured as light now; its only instance is busy and a request is queued.
        let replies = queue_behind_a_blocked_engine(&mut h, request(4, 2, None), vec![request(5, 2, None)]);
        let back = h.scheduler.run_here(request(6, 2, None)).expect_err("instance busy");
        open_gate(&h, 2);
        for (rx, want) in replies.into_iter().zip([4, 5]) {
            assert_eq!(answer(rx), Ok(want));
        }
        settles_to_zero(&h.scheduler);
        h.gate.take();
        let caller = std::thread::current().id();
        let answered = h.scheduler.run_here(back).expect("idle instance, light model");
        assert_eq!(answered.expect("computed").outputs[0].1.to_i64_vec(), Some(vec![6]));
        let (ran, on) = h.ran_on.try_iter().last().expect("the engine ran");
        assert_eq!((ran, on), (vec![6], caller), "computed on the calling thread");
        settles_to_zero(&h.scheduler);
    }
}
