//! The engine boundary. The scheduler only sees [`Backend`], and the loader builds
//! instances through a [`BackendFactory`]; ONNX Runtime lives in [`onnx`], the one
//! module that knows `ort`, so the repository and the scheduler run in tests on a
//! mock backend without the engine library.

use crate::{
    config::ModelConfig,
    tensor::{DataType, Tensor},
};

/// Why an engine run failed: the request's fault or the engine's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The engine refused the input (a value or shape the model cannot take); the
    /// caller can fix it.
    #[error("{0}")]
    Input(String),
    /// Anything else: a fault of the server or the model.
    #[error("{0}")]
    Engine(String),
}

/// One loaded model instance. An instance runs one batch at a time on the thread that
/// owns it; parallelism comes from several instances.
pub trait Backend: Send {
    /// Runs the model. `inputs` are named and already batched; the result holds the
    /// requested outputs in the order of `outputs`.
    fn run(&mut self, inputs: Vec<(String, Tensor)>, outputs: &[String]) -> Result<Vec<Tensor>, BackendError>;

    /// Input names and datatypes the engine itself reports, to check a config against.
    fn inputs(&self) -> Vec<(String, Option<DataType>)>;
    fn outputs(&self) -> Vec<(String, Option<DataType>)>;
}

/// Builds a model version's instances (`cfg.instance_group.count` of them) from the
/// bytes of its model file.
pub trait BackendFactory: Send + Sync {
    fn instances(&self, model: &[u8], cfg: &ModelConfig) -> Result<Vec<Box<dyn Backend>>, BackendError>;
}

pub mod onnx {
    //! ONNX Runtime through `ort` with `load-dynamic`: the shared library comes from the
    //! `onnxruntime` wheel that setup installs, never from a download at build time.

    use std::{path::Path, sync::OnceLock};

    use bytes::{Bytes, BytesMut};
    use ort::{
        ep,
        session::{builder::GraphOptimizationLevel, Session},
        value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType},
    };

    use super::{Backend, BackendError, BackendFactory};
    use crate::{
        config::{EngineConfig, ModelConfig, OptimizationLevel},
        tensor::{DataType, Tensor, TensorData},
    };

    /// ONNX Runtime says INVALID_ARGUMENT when the input does not fit the graph (a
    /// dimension, a rank, a type); that is the request's fault. Its own prefix
    /// ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :") is dropped.
    fn classify(e: &ort::Error) -> BackendError {
        let text = e.to_string();
        let text = text
            .rsplit_once("INVALID_ARGUMENT :")
            .map_or(text.as_str(), |(_, rest)| rest)
            .trim()
            .to_string();
        match e.code() {
            ort::error::ErrorCode::InvalidArgument => {
                BackendError::Input(format!("the model rejected the input: {text}"))
            }
            _ => BackendError::Engine(text),
        }
    }

    /// The library scripts/setup.sh installs under `<root>/.venv`:
    /// `.venv/lib/python*/site-packages/onnxruntime/capi/libonnxruntime.so.<version>`.
    pub fn find_library(root: &Path) -> Option<std::path::PathBuf> {
        let lib = std::fs::read_dir(root.join(".venv/lib")).ok()?;
        let mut found: Vec<std::path::PathBuf> = lib
            .flatten()
            .filter_map(|py| std::fs::read_dir(py.path().join("site-packages/onnxruntime/capi")).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        // Prefer the versioned file (libonnxruntime.so.1.x.y) over a bare symlink.
        found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        found.into_iter().next()
    }

    static RUNTIME: OnceLock<Result<ort::environment::Environment, BackendError>> = OnceLock::new();

    /// Loads the ONNX Runtime library once per process. Later calls return the first
    /// result, whatever path they pass: a process has one runtime.
    pub fn init(library: &Path) -> Result<(), BackendError> {
        RUNTIME
            .get_or_init(|| {
                if !library.exists() {
                    return Err(BackendError::Engine(format!(
                        "ONNX Runtime library not found at {} (run scripts/setup.sh or pass --ort-library)",
                        library.display()
                    )));
                }
                ort::init_from(library)
                    .map_err(|e| {
                        BackendError::Engine(format!("cannot load ONNX Runtime from {}: {e}", library.display()))
                    })?
                    .with_name("lattice")
                    .with_telemetry(false)
                    .build()
                    .map_err(|e| BackendError::Engine(e.to_string()))
            })
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
    }

    fn env() -> Result<&'static ort::environment::Environment, BackendError> {
        match RUNTIME.get() {
            Some(Ok(env)) => Ok(env),
            Some(Err(e)) => Err(e.clone()),
            None => Err(BackendError::Engine("ONNX Runtime is not initialised".to_string())),
        }
    }

    /// Builds ONNX Runtime sessions; the runtime must be initialised ([`init`]).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct OnnxFactory;

    impl BackendFactory for OnnxFactory {
        fn instances(&self, model: &[u8], cfg: &ModelConfig) -> Result<Vec<Box<dyn Backend>>, BackendError> {
            let options = SessionOptions::new(cfg.instance_group.intra_op_threads, &cfg.engine);
            (0..cfg.instance_group.count)
                .map(|_| OnnxBackend::new(model, &options).map(|b| Box::new(b) as Box<dyn Backend>))
                .collect()
        }
    }

    pub struct OnnxBackend {
        session: Session,
    }

    /// Everything a session is built with, from the model config.
    #[derive(Clone, Debug)]
    pub struct SessionOptions {
        pub intra_op_threads: usize,
        pub engine: EngineConfig,
    }

    impl SessionOptions {
        pub fn new(intra_op_threads: usize, engine: &EngineConfig) -> SessionOptions {
            SessionOptions {
                intra_op_threads,
                engine: engine.clone(),
            }
        }
    }

    impl OnnxBackend {
        /// Builds a session from model bytes (the caller memory-maps the file once and
        /// builds every instance from the same mapping).
        pub fn new(model: &[u8], options: &SessionOptions) -> Result<OnnxBackend, BackendError> {
            let e = &options.engine;
            let level = match e.optimization_level {
                OptimizationLevel::Disabled => GraphOptimizationLevel::Disable,
                OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
                OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
                OptimizationLevel::All => GraphOptimizationLevel::Level3,
            };
            fn s<E: std::fmt::Display>(e: E) -> BackendError {
                BackendError::Engine(e.to_string())
            }
            let session = Session::builder(env()?)
                .map_err(s)?
                .with_optimization_level(level)
                .map_err(s)?
                .with_intra_threads(options.intra_op_threads)
                .map_err(s)?
                .with_inter_threads(1)
                .map_err(s)?
                // Pool threads that spin between parallel sections keep a core busy
                // while a request is being read or answered; off, they sleep.
                .with_intra_op_spinning(e.allow_spinning)
                .map_err(s)?
                .with_inter_op_spinning(e.allow_spinning)
                .map_err(s)?
                .with_execution_providers([ep::CPU::default().with_arena_allocator(e.cpu_arena).build()])
                .map_err(s)?
                .with_prepacking(e.prepacking)
                .map_err(s)?
                .commit_from_memory(model)
                .map_err(s)?;
            Ok(OnnxBackend { session })
        }
    }

    fn dtype_of(t: &ValueType) -> Option<DataType> {
        match t {
            ValueType::Tensor { ty, .. } => from_ort(*ty),
            _ => None,
        }
    }

    fn from_ort(t: TensorElementType) -> Option<DataType> {
        Some(match t {
            TensorElementType::Float32 => DataType::F32,
            TensorElementType::Float64 => DataType::F64,
            TensorElementType::Float16 => DataType::F16,
            TensorElementType::Bfloat16 => DataType::Bf16,
            TensorElementType::Uint8 => DataType::U8,
            TensorElementType::Uint16 => DataType::U16,
            TensorElementType::Uint32 => DataType::U32,
            TensorElementType::Uint64 => DataType::U64,
            TensorElementType::Int8 => DataType::I8,
            TensorElementType::Int16 => DataType::I16,
            TensorElementType::Int32 => DataType::I32,
            TensorElementType::Int64 => DataType::I64,
            TensorElementType::Bool => DataType::Bool,
            TensorElementType::String => DataType::Bytes,
            _ => return None,
        })
    }

    /// Decodes little-endian bytes into a typed vector for the engine.
    macro_rules! typed {
        ($bytes:expr, $t:ty, $n:expr) => {
            $bytes
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
                .collect::<Vec<$t>>()
        };
    }

    fn to_ort(name: &str, t: Tensor) -> Result<DynValue, BackendError> {
        let shape = t.shape.clone();
        let err = |e: ort::Error| match classify(&e) {
            BackendError::Input(m) => BackendError::Input(format!("input '{name}': {m}")),
            BackendError::Engine(m) => BackendError::Engine(format!("input '{name}': {m}")),
        };
        let b = match &t.data {
            TensorData::Raw(b) => b.clone(),
            TensorData::Strings(items) => return strings::to_ort(shape, items).map_err(err),
        };
        let v = match t.dtype {
            DataType::F32 => OrtTensor::from_array((shape, typed!(b, f32, 4))).map(|v| v.into_dyn()),
            DataType::F64 => OrtTensor::from_array((shape, typed!(b, f64, 8))).map(|v| v.into_dyn()),
            DataType::I64 => OrtTensor::from_array((shape, typed!(b, i64, 8))).map(|v| v.into_dyn()),
            DataType::I32 => OrtTensor::from_array((shape, typed!(b, i32, 4))).map(|v| v.into_dyn()),
            DataType::I16 => OrtTensor::from_array((shape, typed!(b, i16, 2))).map(|v| v.into_dyn()),
            DataType::I8 => OrtTensor::from_array((shape, typed!(b, i8, 1))).map(|v| v.into_dyn()),
            DataType::U64 => OrtTensor::from_array((shape, typed!(b, u64, 8))).map(|v| v.into_dyn()),
            DataType::U32 => OrtTensor::from_array((shape, typed!(b, u32, 4))).map(|v| v.into_dyn()),
            DataType::U16 => OrtTensor::from_array((shape, typed!(b, u16, 2))).map(|v| v.into_dyn()),
            DataType::U8 => OrtTensor::from_array((shape, b.to_vec())).map(|v| v.into_dyn()),
            DataType::Bool => {
                OrtTensor::from_array((shape, b.iter().map(|&x| x != 0).collect::<Vec<bool>>())).map(|v| v.into_dyn())
            }
            DataType::F16 => OrtTensor::from_array((shape, typed!(b, half::f16, 2))).map(|v| v.into_dyn()),
            DataType::Bf16 => OrtTensor::from_array((shape, typed!(b, half::bf16, 2))).map(|v| v.into_dyn()),
            DataType::Bytes => unreachable!("BYTES handled above"),
        };
        v.map_err(err)
    }

    fn le_bytes<T: Copy, const N: usize>(data: &[T], f: impl Fn(T) -> [u8; N]) -> Bytes {
        let mut out = BytesMut::with_capacity(data.len() * N);
        for &x in data {
            out.extend_from_slice(&f(x));
        }
        out.freeze()
    }

    fn from_ort_value(name: &str, v: &DynValue) -> Result<Tensor, BackendError> {
        let dtype = dtype_of(v.dtype())
            .ok_or_else(|| BackendError::Engine(format!("output '{name}' has a type Lattice cannot serve")))?;
        let err = |e: ort::Error| BackendError::Engine(format!("output '{name}': {e}"));
        macro_rules! raw {
            ($t:ty) => {{
                let (shape, data) = v.try_extract_tensor::<$t>().map_err(err)?;
                (shape.to_vec(), le_bytes(data, <$t>::to_le_bytes))
            }};
        }
        let (shape, bytes) = match dtype {
            DataType::F32 => raw!(f32),
            DataType::F64 => raw!(f64),
            DataType::I64 => raw!(i64),
            DataType::I32 => raw!(i32),
            DataType::I16 => raw!(i16),
            DataType::I8 => raw!(i8),
            DataType::U64 => raw!(u64),
            DataType::U32 => raw!(u32),
            DataType::U16 => raw!(u16),
            DataType::U8 => raw!(u8),
            DataType::F16 => raw!(half::f16),
            DataType::Bf16 => raw!(half::bf16),
            DataType::Bool => {
                let (shape, data) = v.try_extract_tensor::<bool>().map_err(err)?;
                (
                    shape.to_vec(),
                    data.iter().map(|&b| b as u8).collect::<Vec<u8>>().into(),
                )
            }
            DataType::Bytes => {
                let shape = match v.dtype() {
                    ValueType::Tensor { shape, .. } => shape.to_vec(),
                    _ => return Err(BackendError::Engine(format!("output '{name}' is not a tensor"))),
                };
                let items = strings::from_ort(v, &shape).map_err(err)?;
                return Ok(Tensor::strings(shape, items));
            }
        };
        Ok(Tensor::raw(dtype, shape, bytes))
    }

    /// Whether an input holds BYTES elements that are not plain text (not UTF-8, or
    /// with a NUL byte): a model that fails on them failed on the caller's value.
    fn unusual_strings(inputs: &[(String, Tensor)]) -> Option<String> {
        inputs.iter().find_map(|(name, t)| match &t.data {
            TensorData::Strings(items) if items.iter().any(|i| i.contains(&0) || std::str::from_utf8(i).is_err()) => {
                Some(name.clone())
            }
            _ => None,
        })
    }

    /// BYTES tensors through ONNX Runtime's length-carrying string API, so any bytes
    /// (NUL, not UTF-8) reach the model and come back exactly; the `ort` helpers go
    /// through C strings and UTF-8.
    #[allow(unsafe_code)]
    mod strings {
        use std::ptr;

        use bytes::Bytes;
        use ort::{
            memory::Allocator,
            value::{DynTensor, DynValue, TensorElementType},
            AsPointer,
        };

        pub fn to_ort(shape: Vec<i64>, items: &[Bytes]) -> ort::Result<DynValue> {
            let n = crate::tensor::element_count(&shape)
                .ok_or_else(|| ort::Error::new(format!("invalid shape {shape:?}")))?;
            if n != items.len() {
                return Err(ort::Error::new(format!(
                    "shape {shape:?} needs {n} BYTES elements, got {}",
                    items.len()
                )));
            }
            let mut value = DynTensor::new(&Allocator::default(), TensorElementType::String, shape)?;
            for (index, item) in items.iter().enumerate() {
                let mut buf: *mut std::ffi::c_char = ptr::null_mut();
                // SAFETY: `value` is a live string tensor of `n` elements and
                // `index < n`; ONNX Runtime sizes element `index` to exactly
                // `item.len()` bytes owned by the tensor and returns it in `buf`, into
                // which exactly that many bytes are copied. No pointer outlives the
                // call; the status is released by `result_from_status`.
                unsafe {
                    let status =
                        (ort::api().GetResizedStringTensorElementBuffer)(value.ptr_mut(), index, item.len(), &mut buf);
                    ort::Error::result_from_status(status)?;
                    if !item.is_empty() {
                        if buf.is_null() {
                            return Err(ort::Error::new("ONNX Runtime gave no buffer for a string element"));
                        }
                        ptr::copy_nonoverlapping(item.as_ptr(), buf.cast::<u8>(), item.len());
                    }
                }
            }
            Ok(value.into_dyn())
        }

        pub fn from_ort(value: &DynValue, shape: &[i64]) -> ort::Result<Vec<Bytes>> {
            let n = crate::tensor::element_count(shape)
                .ok_or_else(|| ort::Error::new(format!("invalid output shape {shape:?}")))?;
            let mut total = 0usize;
            // SAFETY: `value` is a live string tensor (its type was checked by the
            // caller); ONNX Runtime writes one usize.
            unsafe {
                ort::Error::result_from_status((ort::api().GetStringTensorDataLength)(value.ptr(), &mut total))?;
            }
            let mut content = vec![0u8; total];
            let mut offsets = vec![0usize; n];
            if n > 0 {
                // SAFETY: `content` has `total` bytes and `offsets` `n` entries, the
                // sizes ONNX Runtime was told; it writes no more than that.
                unsafe {
                    ort::Error::result_from_status((ort::api().GetStringTensorContent)(
                        value.ptr(),
                        content.as_mut_ptr().cast(),
                        total,
                        offsets.as_mut_ptr(),
                        n,
                    ))?;
                }
            }
            let content = Bytes::from(content);
            let mut items = Vec::with_capacity(n);
            for i in 0..n {
                let start = offsets[i];
                let end = offsets.get(i + 1).copied().unwrap_or(total);
                if start > end || end > total {
                    return Err(ort::Error::new("ONNX Runtime gave inconsistent string offsets"));
                }
                items.push(content.slice(start..end));
            }
            Ok(items)
        }
    }

    impl Backend for OnnxBackend {
        fn run(&mut self, inputs: Vec<(String, Tensor)>, outputs: &[String]) -> Result<Vec<Tensor>, BackendError> {
            let unusual = unusual_strings(&inputs);
            let values = inputs
                .into_iter()
                .map(|(name, t)| to_ort(&name, t).map(|v| (name, v)))
                .collect::<Result<Vec<_>, _>>()?;
            let result = self.session.run(values).map_err(|e| match (classify(&e), unusual) {
                // String operators fail in their own ways (not always INVALID_ARGUMENT)
                // on bytes they cannot read; that is a value the model cannot take.
                (BackendError::Engine(m), Some(input)) => BackendError::Input(format!(
                    "the model cannot take input '{input}' (BYTES that are not UTF-8 text or hold a NUL byte): {m}"
                )),
                (other, _) => other,
            })?;
            outputs
                .iter()
                .map(|name| {
                    let v = result
                        .get(name)
                        .ok_or_else(|| BackendError::Engine(format!("model produced no output '{name}'")))?;
                    from_ort_value(name, v)
                })
                .collect()
        }

        fn inputs(&self) -> Vec<(String, Option<DataType>)> {
            self.session
                .inputs()
                .iter()
                .map(|o| (o.name().to_string(), dtype_of(o.dtype())))
                .collect()
        }

        fn outputs(&self) -> Vec<(String, Option<DataType>)> {
            self.session
                .outputs()
                .iter()
                .map(|o| (o.name().to_string(), dtype_of(o.dtype())))
                .collect()
        }
    }
}
