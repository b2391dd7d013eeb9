//! Engine-choice benchmark: ONNX Runtime (`ort`, load-dynamic) vs pure-Rust `tract-onnx`
//! on the models bundled with Lattice. Prints a markdown table to stdout; progress and
//! errors go to stderr.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

const ORT_LIB: &str = ".venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0";
const WARMUP_RUNS: usize = 50;
const MEASURE_FOR: Duration = Duration::from_secs(2);
const MIN_RUNS: usize = 20;

enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

struct Input {
    name: &'static str,
    shape: Vec<usize>,
    data: Data,
}

struct Case {
    model: &'static str,
    batches: &'static [usize],
    /// Outputs compared between engines (all FP32).
    outputs: &'static [&'static str],
    inputs: fn(usize) -> Vec<Input>,
}

/// Deterministic pseudo-random numbers so every run of the benchmark sees the same inputs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

fn magika_inputs(n: usize) -> Vec<Input> {
    let mut rng = Lcg(1);
    // Byte values 0..=255, with a padded tail (256 is Magika's padding token).
    let data = (0..n * 2048)
        .map(|i| {
            if i % 2048 < 1900 {
                (rng.next() % 256) as i32
            } else {
                256
            }
        })
        .collect();
    vec![Input {
        name: "bytes",
        shape: vec![n, 2048],
        data: Data::I32(data),
    }]
}

fn minilm_inputs(n: usize) -> Vec<Input> {
    const SEQ: usize = 19;
    let mut rng = Lcg(2);
    let ids = (0..n)
        .flat_map(|_| {
            let body: Vec<i64> = (0..SEQ - 2).map(|_| 1000 + (rng.next() % 19000) as i64).collect();
            std::iter::once(101).chain(body).chain(std::iter::once(102))
        })
        .collect();
    let shape = vec![n, SEQ];
    vec![
        Input {
            name: "input_ids",
            shape: shape.clone(),
            data: Data::I64(ids),
        },
        Input {
            name: "attention_mask",
            shape: shape.clone(),
            data: Data::I64(vec![1; n * SEQ]),
        },
        Input {
            name: "token_type_ids",
            shape,
            data: Data::I64(vec![0; n * SEQ]),
        },
    ]
}

fn silero_inputs(_n: usize) -> Vec<Input> {
    let mut rng = Lcg(3);
    // 64 samples of context + a 512-sample chunk at 16 kHz: a 440 Hz tone plus noise.
    let audio = (0..576)
        .map(|i| {
            let t = i as f32 / 16000.0;
            0.3 * (2.0 * std::f32::consts::PI * 440.0 * t).sin() + 0.01 * (rng.next() as f32 / u32::MAX as f32 - 0.5)
        })
        .collect();
    vec![
        Input {
            name: "input",
            shape: vec![1, 576],
            data: Data::F32(audio),
        },
        Input {
            name: "state",
            shape: vec![2, 1, 128],
            data: Data::F32(vec![0.0; 256]),
        },
        Input {
            name: "sr",
            shape: vec![],
            data: Data::I64(vec![16000]),
        },
    ]
}

trait Engine {
    /// Runs once and returns the requested outputs, flattened.
    fn run(&mut self, inputs: &[Input]) -> Result<Vec<Vec<f32>>>;
}

struct Ort {
    session: ort::session::Session,
    outputs: &'static [&'static str],
}

impl Ort {
    fn load(
        env: &ort::environment::Environment,
        path: &Path,
        threads: usize,
        outputs: &'static [&'static str],
    ) -> Result<Self> {
        let session = ort::session::Session::builder(env)?
            .with_intra_threads(threads)
            .map_err(|e| anyhow!("{e}"))?
            .with_inter_threads(1)
            .map_err(|e| anyhow!("{e}"))?
            .commit_from_file(path)?;
        Ok(Ort { session, outputs })
    }
}

impl Engine for Ort {
    fn run(&mut self, inputs: &[Input]) -> Result<Vec<Vec<f32>>> {
        use ort::value::Tensor;
        let values = inputs
            .iter()
            .map(|i| {
                let shape: Vec<i64> = i.shape.iter().map(|&d| d as i64).collect();
                let v = match &i.data {
                    Data::F32(d) => Tensor::from_array((shape, d.clone()))?.into_dyn(),
                    Data::I32(d) => Tensor::from_array((shape, d.clone()))?.into_dyn(),
                    Data::I64(d) => Tensor::from_array((shape, d.clone()))?.into_dyn(),
                };
                Ok((i.name, v))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self.session.run(values)?;
        self.outputs
            .iter()
            .map(|name| {
                let v = out.get(name).with_context(|| format!("ort: no output {name}"))?;
                Ok(v.try_extract_tensor::<f32>()?.1.to_vec())
            })
            .collect()
    }
}

#[cfg(feature = "tract")]
mod tract {
    use super::*;
    use std::collections::HashMap;
    use tract_onnx::prelude::*;

    pub struct Tract {
        state: TypedSimpleState,
        /// For each model input (in the model's order), the index into our `Input` list.
        input_order: Vec<usize>,
        output_index: Vec<usize>,
    }

    /// How input shapes are made concrete before optimisation.
    #[derive(Clone, Copy)]
    pub enum Shapes {
        /// Override every input fact with the exact shape of the data.
        Fixed,
        /// Keep the model's declared (symbolic) input facts, then bind each symbol to
        /// the size it has in the data. Needed when the file's value_info names the
        /// same symbols: a fixed input of 19 cannot unify with a declared `sequence`.
        BindSymbols,
    }

    impl Tract {
        pub fn load(path: &Path, inputs: &[Input], outputs: &[&str], shapes: Shapes) -> Result<Self> {
            let mut model = tract_onnx::onnx().model_for_path(path)?;
            let model = match shapes {
                Shapes::Fixed => {
                    for ix in 0..model.input_outlets()?.len() {
                        let i = &inputs[input_pos(&model, ix, inputs)?];
                        let dt = match i.data {
                            Data::F32(_) => f32::datum_type(),
                            Data::I32(_) => i32::datum_type(),
                            Data::I64(_) => i64::datum_type(),
                        };
                        model.set_input_fact(ix, dt.fact(&*i.shape).into())?;
                    }
                    model.into_optimized()?
                }
                Shapes::BindSymbols => {
                    let typed = model.into_typed()?;
                    let mut symbols = HashMap::new();
                    for ix in 0..typed.input_outlets()?.len() {
                        let i = &inputs[input_pos(&typed, ix, inputs)?];
                        for (dim, &n) in typed.input_fact(ix)?.shape.iter().zip(&i.shape) {
                            if let TDim::Sym(s) = dim {
                                symbols.insert(s.clone(), TDim::from(n));
                            }
                        }
                    }
                    typed.set_symbols(&symbols)?.into_optimized()?
                }
            };
            let input_order = (0..model.input_outlets()?.len())
                .map(|ix| input_pos(&model, ix, inputs))
                .collect::<Result<_>>()?;
            let labels: Vec<Option<&str>> = model.output_outlets()?.iter().map(|&o| model.outlet_label(o)).collect();
            let output_index = outputs
                .iter()
                .map(|name| {
                    labels
                        .iter()
                        .position(|l| *l == Some(name))
                        .with_context(|| format!("tract: no output {name} (outputs: {labels:?})"))
                })
                .collect::<Result<_>>()?;
            let plan: Arc<TypedSimplePlan> = model.into_runnable()?;
            Ok(Tract {
                state: plan.spawn()?,
                input_order,
                output_index,
            })
        }
    }

    /// Where the data for the model's `ix`-th input is in `inputs`, matched by name.
    fn input_pos<F: Fact + Clone + 'static, O>(model: &Graph<F, O>, ix: usize, inputs: &[Input]) -> Result<usize>
    where
        O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
    {
        let name = &model.node(model.input_outlets()?[ix].node).name;
        inputs
            .iter()
            .position(|i| i.name == *name)
            .with_context(|| format!("tract: model input {name} has no data"))
    }

    impl Engine for Tract {
        fn run(&mut self, inputs: &[Input]) -> Result<Vec<Vec<f32>>> {
            let values = self
                .input_order
                .iter()
                .map(|&pos| {
                    let i = &inputs[pos];
                    let t = match &i.data {
                        Data::F32(d) => Tensor::from_shape(&i.shape, d.as_slice())?,
                        Data::I32(d) => Tensor::from_shape(&i.shape, d.as_slice())?,
                        Data::I64(d) => Tensor::from_shape(&i.shape, d.as_slice())?,
                    };
                    Ok(t.into_tvalue())
                })
                .collect::<Result<TVec<_>>>()?;
            let out = self.state.run(values)?;
            self.output_index
                .iter()
                .map(|&ix| Ok(out[ix].to_plain_array_view::<f32>()?.iter().copied().collect()))
                .collect()
        }
    }
}

/// Median latency of back-to-back runs after a warm-up.
fn p50(engine: &mut dyn Engine, inputs: &[Input]) -> Result<Duration> {
    for _ in 0..WARMUP_RUNS {
        engine.run(inputs)?;
    }
    let mut times = vec![];
    let start = Instant::now();
    while start.elapsed() < MEASURE_FOR || times.len() < MIN_RUNS {
        let t = Instant::now();
        engine.run(inputs)?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f32> {
    let mut max = 0f32;
    for (x, y) in a.iter().zip(b) {
        anyhow::ensure!(x.len() == y.len(), "output sizes differ: {} vs {}", x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            // f32::max would silently drop a NaN.
            max = if d.is_nan() || max.is_nan() {
                f32::NAN
            } else {
                max.max(d)
            };
        }
    }
    Ok(max)
}

struct Row {
    model: &'static str,
    engine: &'static str,
    threads: usize,
    batch: usize,
    result: Result<Measured, String>,
}

struct Measured {
    load: Duration,
    p50: Duration,
    diff: Option<f32>,
}

/// Loads with `load`, measures, and compares against `reference` (the ort 1-thread outputs).
fn measure<E: Engine>(
    load: impl FnOnce() -> Result<E>,
    inputs: &[Input],
    reference: Option<&[Vec<f32>]>,
) -> Result<(Measured, Vec<Vec<f32>>)> {
    let t = Instant::now();
    let mut engine = load()?;
    let load = t.elapsed();
    let outputs = engine.run(inputs)?;
    let diff = reference.map(|r| max_abs_diff(r, &outputs)).transpose()?;
    let p50 = p50(&mut engine, inputs)?;
    Ok((Measured { load, p50, diff }, outputs))
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(ORT_LIB));
    let t = Instant::now();
    let env = ort::init_from(&lib)
        .with_context(|| format!("loading {}", lib.display()))?
        .build()?;
    eprintln!("ort environment init (dlopen + env): {} ms", ms(t.elapsed()));

    let cases = [
        Case {
            model: "magika",
            batches: &[1, 8],
            outputs: &["target_label"],
            inputs: magika_inputs,
        },
        Case {
            model: "minilm",
            batches: &[1, 8],
            outputs: &["last_hidden_state"],
            inputs: minilm_inputs,
        },
        Case {
            model: "silero_vad",
            batches: &[1],
            outputs: &["output", "stateN"],
            inputs: silero_inputs,
        },
    ];

    // Optional comma-separated filter, e.g. MODELS=minilm,magika.
    let only = std::env::var("MODELS").ok();
    let selected = |m: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == m));

    let mut rows = vec![];
    for case in cases.iter().filter(|c| selected(c.model)) {
        let path = root.join("models").join(case.model).join("1/model.onnx");
        for &batch in case.batches {
            let inputs = (case.inputs)(batch);
            let row = |engine, threads, result: Result<Measured>| {
                let result = result.map_err(|e| format!("{e:#}"));
                if let Err(e) = &result {
                    eprintln!("{} {engine} {threads}t b{batch}: FAILED: {e}", case.model);
                }
                Row {
                    model: case.model,
                    engine,
                    threads,
                    batch,
                    result,
                }
            };

            let mut reference = None;
            for threads in [1, 2] {
                eprintln!("{} ort {threads}t b{batch}", case.model);
                let r = measure(
                    || Ort::load(&env, &path, threads, case.outputs),
                    &inputs,
                    reference.as_deref(),
                );
                let r = r.map(|(m, out)| {
                    reference.get_or_insert(out);
                    m
                });
                rows.push(row("ort", threads, r));
            }

            #[cfg(feature = "tract")]
            {
                use tract::{Shapes, Tract};
                eprintln!("{} tract 1t b{batch}", case.model);
                let fixed = measure(
                    || Tract::load(&path, &inputs, case.outputs, Shapes::Fixed),
                    &inputs,
                    reference.as_deref(),
                );
                let failed = fixed.is_err();
                rows.push(row("tract", 1, fixed.map(|(m, _)| m)));
                if failed {
                    eprintln!("{} tract, bound symbols 1t b{batch}", case.model);
                    let bound = measure(
                        || Tract::load(&path, &inputs, case.outputs, Shapes::BindSymbols),
                        &inputs,
                        reference.as_deref(),
                    );
                    rows.push(row("tract, bound symbols", 1, bound.map(|(m, _)| m)));
                }
            }
        }
    }

    println!("| model | engine | threads | batch | load ms | p50 ms | items/s | p50 / ort-1t p50 | max \\|diff\\| vs ort-1t |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.model == r.model && b.batch == r.batch && b.engine == "ort" && b.threads == 1)
            .and_then(|b| b.result.as_ref().ok());
        let cells = match &r.result {
            Ok(m) => format!(
                "{} | {} | {:.0} | {} | {}",
                ms(m.load),
                ms(m.p50),
                r.batch as f64 / m.p50.as_secs_f64(),
                base.map_or("n/a".into(), |b| format!(
                    "{:.2}",
                    m.p50.as_secs_f64() / b.p50.as_secs_f64()
                )),
                m.diff.map_or("(reference)".into(), |d| format!("{d:.2e}")),
            ),
            Err(e) => format!("FAILED: `{}` | | | |", e.replace('|', "\\|").replace('\n', " ")),
        };
        println!("| {} | {} | {} | {} | {cells} |", r.model, r.engine, r.threads, r.batch);
    }
    Ok(())
}
