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
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use lattice_observability::{quality::std_dev, Metrics, ModelRecorder};

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
/// Request id of the warm-up inference a new version runs before it serves; it is
/// kept out of the metrics.
pub const WARM_UP_ID: &str = "lattice-warm-up";

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
    pub metrics: Arc<Metrics>,
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
}

/// Cheap-to-clone handle to a model version's queue and instances.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

impl Scheduler {
    /// Starts one thread per backend instance.
    pub fn start(runtime: Arc<ModelRuntime>, backends: Vec<Box<dyn Backend>>) -> Scheduler {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            available: Condvar::new(),
            runtime,
            in_flight: AtomicUsize::new(0),
        });
        for (i, backend) in backends.into_iter().enumerate() {
            let shared = shared.clone();
            let name = format!("infer-{}-{i}", shared.runtime.config.name);
            thread::Builder::new()
                .name(name)
                .spawn(move || instance_task(shared, backend))
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

fn instance_task(shared: Arc<Shared>, mut backend: Box<dyn Backend>) {
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
        run_batch(&rt, backend.as_mut(), batch, size);
    }
    // Release the engine session before the thread ends, then hand freed heap pages
    // back to the OS so unloading a model lowers RSS.
    drop(backend);
    trim_heap();
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

#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

fn run_batch(rt: &ModelRuntime, backend: &mut dyn Backend, batch: Vec<Entry>, size: usize) {
    let started = Instant::now();
    // A panic in the engine or in pooling answers this batch with an error instead of
    // ending the instance thread, which would leave the model unable to serve.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compute(rt, backend, &batch, size)))
        .unwrap_or_else(|_| Err(InferError::Backend("the model instance panicked on this batch".into())));
    let compute_time = started.elapsed();
    match result {
        Ok((outputs, timing)) => {
            rt.stats.record_batch(&timing);
            let (m, rec) = (&rt.metrics, &rt.recorder);
            let recording = rec.enabled() && batch.iter().any(|e| e.req.id != WARM_UP_ID);
            if recording {
                rec.batch_size.observe(size as f64);
                rec.compute_duration.observe(compute_time.as_secs_f64());
                m.observe_service_time(compute_time.as_secs_f64() / size.max(1) as f64);
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
                    m.observe_queue_time(queued.as_secs_f64());
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
                run_batch(rt, backend, vec![e], items);
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
        let pooled = mean_pool(p, states, &mask).map_err(InferError::Backend)?;
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
