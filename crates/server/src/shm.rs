//! Triton's system shared memory extension: a co-located client puts tensors in a
//! POSIX shared-memory object, registers a window of it as a named region, and names
//! the region in an input's or an output's parameters instead of sending the bytes
//! through the socket.
//!
//! # How a region is held
//!
//! Registering opens `/dev/shm/<key>` read-write and keeps the file descriptor; the
//! server never `mmap`s it. Inputs are read and outputs written with `pread`/`pwrite`
//! at the region's offset. A mapping would give the same single copy (the engine
//! needs the input in its own buffer either way), but a client that truncates the
//! object after registering would turn every later access through a mapping into a
//! SIGBUS that kills the server; through the descriptor, a truncated object is a
//! short read, which becomes an error for that request only. It also needs no
//! `unsafe`. Before a write, the object's current size is checked, so a write never
//! extends an object the client shrank.
//!
//! Unregistering drops the registry's handle; a request that already looked the
//! region up keeps its own (`Arc<Region>`) until it finishes, as Triton lets
//! in-flight requests finish on a region being unregistered.
//!
//! The key is hostile: it names one entry of `/dev/shm` (leading slashes dropped, as
//! `shm_open` does), nothing with `/`, NUL, `.` or `..`, at most 255 bytes, opened
//! with `O_NOFOLLOW` and refused unless it is a regular file. The number of regions
//! and their total size are bounded ([`Limits`]), and so is what one request reads
//! from regions (the body limit: shared memory moves no more per request than the
//! socket would).

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::PathBuf,
    sync::Arc,
};

use bytes::Bytes;
use lattice_inference::{
    repository::echo,
    tensor::{element_count, parse_wire_strings},
    DataType, RequestParts, Tensor, TensorData,
};
use parking_lot::Mutex;

/// Where POSIX shared-memory objects live on Linux (`shm_open` is a file there).
pub const SHM_DIR: &str = "/dev/shm";
/// Longest key, after its leading slashes: one file name (`NAME_MAX`).
pub const MAX_KEY: usize = 255;
/// Longest region name.
pub const MAX_NAME: usize = 256;
/// Keys Triton keeps for its Python backend; refused with Triton's text.
const RESERVED_PREFIX: &str = "triton_python_backend_shm_region_";

// === Limits ===

/// Bounds on what clients may register.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Off: register and unregister answer 501 / UNIMPLEMENTED (status still works).
    pub enabled: bool,
    /// Regions registered at once.
    pub max_regions: usize,
    /// Sum of the registered regions' `byte_size`.
    pub max_bytes: u64,
    /// The directory keys name entries of; [`SHM_DIR`] outside tests.
    pub dir: PathBuf,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            enabled: true,
            max_regions: 64,
            max_bytes: 1 << 30,
            dir: PathBuf::from(SHM_DIR),
        }
    }
}

// === ShmError ===

/// What can go wrong with a region; each variant has one kind in the error table
/// (`crate::error`). Texts follow Triton's where clients match on them.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ShmError {
    #[error("system shared memory is disabled on this server (started with --system-shared-memory off)")]
    Disabled,
    #[error("CUDA shared memory is not supported: this server has no GPU; use system shared memory (v2/systemsharedmemory) instead")]
    CudaUnsupported,
    /// A request that names a region, key, offset or size that cannot be right.
    #[error("{0}")]
    Invalid(String),
    #[error("shared memory region '{0}' already in manager")]
    Duplicate(String),
    #[error("cannot register shared memory region '{name}': {limit} regions are registered, the server's limit (--shm-max-regions); unregister one first")]
    TooManyRegions { name: String, limit: usize },
    #[error("cannot register shared memory region '{name}': {byte_size} bytes would bring the registered total above the server's limit of {limit} (--shm-max-bytes); unregister a region first")]
    TooManyBytes { name: String, byte_size: u64, limit: u64 },
    #[error("Unable to find shared memory region: '{0}'")]
    UnknownRegion(String),
    #[error("Unable to find system shared memory region: '{0}'")]
    UnknownStatus(String),
    #[error("Unable to find cuda shared memory region: '{0}'")]
    UnknownCudaRegion(String),
    #[error("The region named '{0}' is registered as system shared memory, not CUDA shared memory")]
    NotCuda(String),
    /// The object shrank after it was registered.
    #[error("shared memory region '{name}' (key '{key}') now holds {size} bytes, but the request uses it up to byte {end}; the object was truncated after it was registered: register it again")]
    Truncated {
        name: String,
        key: String,
        size: u64,
        end: u64,
    },
    #[error("shared-memory inputs of this request total more than {limit} bytes, the server's per-request limit (--max-body-bytes)")]
    InputsTooLarge { limit: usize },
    /// The object could not be read or written for a reason that is not the client's.
    #[error("shared memory region '{name}': {reason}")]
    Io { name: String, reason: String },
}

fn invalid(m: impl Into<String>) -> ShmError {
    ShmError::Invalid(m.into())
}

// === Region ===

/// One registered window of a shared-memory object.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    /// The key as the client sent it (status echoes it).
    pub key: String,
    /// Where the window starts in the object.
    pub offset: u64,
    pub byte_size: u64,
    file: File,
}

/// A tensor's place in a region, from request parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl Region {
    /// Triton's checks of a window within the region, in its order; the start of
    /// the window in the object.
    fn window(&self, offset: u64, byte_size: u64) -> Result<u64, ShmError> {
        let name = echo(&self.name);
        if offset >= self.byte_size {
            return Err(invalid(format!("Invalid offset for shared memory region: '{name}'")));
        }
        let end = offset.checked_add(byte_size).ok_or_else(|| {
            invalid(format!(
                "Integer overflow detected: byte_size ({byte_size}) + offset ({offset}) exceeds maximum value ({}) for region '{name}'",
                u64::MAX
            ))
        })?;
        if end > self.byte_size {
            return Err(invalid(format!(
                "Invalid offset + byte size for shared memory region: '{name}'"
            )));
        }
        // Cannot overflow: registration checked offset + byte_size against the object.
        Ok(self.offset + offset)
    }

    fn truncated(&self, end: u64) -> ShmError {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        ShmError::Truncated {
            name: echo(&self.name).into_owned(),
            key: echo(&self.key).into_owned(),
            size,
            end,
        }
    }

    fn io(&self, e: io::Error) -> ShmError {
        ShmError::Io {
            name: echo(&self.name).into_owned(),
            reason: e.to_string(),
        }
    }

    /// Reads `byte_size` bytes at `offset` within the region.
    fn read(&self, offset: u64, byte_size: u64) -> Result<Bytes, ShmError> {
        let at = self.window(offset, byte_size)?;
        let len = usize::try_from(byte_size).map_err(|_| invalid("shared memory byte size does not fit in memory"))?;
        let mut buf = vec![0u8; len];
        match self.file.read_exact_at(&mut buf, at) {
            Ok(()) => Ok(Bytes::from(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated(at + byte_size)),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Writes `data` at `offset` within the region, into a window of `byte_size`.
    fn write(&self, output: &str, offset: u64, byte_size: u64, data: &[u8]) -> Result<(), ShmError> {
        let at = self.window(offset, byte_size)?;
        let len = data.len() as u64;
        if len > byte_size {
            return Err(invalid(format!(
                "shared memory size specified with the request for output '{}' ({byte_size} bytes) should be at least {len} bytes to hold the results",
                echo(output)
            )));
        }
        // A write past the object's end would grow it back: refuse instead.
        let size = self.file.metadata().map_err(|e| self.io(e))?.len();
        if at + len > size {
            return Err(self.truncated(at + len));
        }
        self.file.write_all_at(data, at).map_err(|e| self.io(e))
    }
}

// === Registry ===

/// The registered regions, shared by both protocols; cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    limits: Arc<Limits>,
    /// By name. A std-style lock held only for map operations, never across I/O.
    regions: Arc<Mutex<BTreeMap<String, Arc<Region>>>>,
}

/// A region's status, as both protocols report it.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// Checks a key and gives the file name it stands for.
fn key_file(name: &str, key: &str) -> Result<String, ShmError> {
    let bad = |why: &str| {
        invalid(format!(
            "cannot register shared memory region '{}' - invalid shm key '{}': {why}",
            echo(name),
            echo(key)
        ))
    };
    let file = key.trim_start_matches('/');
    if file.is_empty() {
        return Err(invalid(format!(
            "cannot register shared memory region '{}' - invalid shm key '{}'",
            echo(name),
            echo(key)
        )));
    }
    if file.starts_with(RESERVED_PREFIX) {
        return Err(invalid(format!(
            "cannot register shared memory region '{}' with key '{}' as the key contains the reserved prefix '{RESERVED_PREFIX}'",
            echo(name),
            echo(key)
        )));
    }
    if file.len() > MAX_KEY {
        return Err(bad(&format!("a key is at most {MAX_KEY} bytes")));
    }
    if file.contains(['/', '\0']) || file == "." || file == ".." {
        return Err(bad(
            "a key names one shared-memory object: no '/' after the first character, no NUL, not '.' or '..'",
        ));
    }
    Ok(file.to_string())
}

impl Registry {
    pub fn new(limits: Limits) -> Registry {
        Registry {
            limits: Arc::new(limits),
            regions: Arc::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Registers `byte_size` bytes of the object `key` from `offset` as `name`.
    pub fn register(&self, name: &str, key: &str, offset: u64, byte_size: u64) -> Result<(), ShmError> {
        if !self.limits.enabled {
            return Err(ShmError::Disabled);
        }
        if name.is_empty() {
            return Err(invalid(
                "'region name' is necessary to register system shared memory region",
            ));
        }
        if name.len() > MAX_NAME {
            return Err(invalid(format!("a region name is at most {MAX_NAME} bytes")));
        }
        let file_name = key_file(name, key)?;
        if self.regions.lock().contains_key(name) {
            return Err(ShmError::Duplicate(echo(name).into_owned()));
        }
        let invalid_args = |why: String| {
            invalid(format!(
                "failed to register shared memory region '{}': invalid args: {why}",
                echo(name)
            ))
        };
        if byte_size == 0 {
            return Err(invalid_args("byte_size must be at least 1".into()));
        }
        let end = offset
            .checked_add(byte_size)
            .ok_or_else(|| invalid_args(format!("offset {offset} + byte_size {byte_size} overflows")))?;
        // O_NOFOLLOW: a symlink planted in /dev/shm must not lead elsewhere;
        // O_NONBLOCK: opening a FIFO planted there must not wait.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(self.limits.dir.join(&file_name))
            .map_err(|e| invalid(format!("Unable to open shared memory region: '{}': {e}", echo(key))))?;
        let meta = file
            .metadata()
            .map_err(|e| invalid(format!("Unable to open shared memory region: '{}': {e}", echo(key))))?;
        if !meta.is_file() {
            return Err(invalid(format!(
                "Unable to open shared memory region: '{}': not a shared-memory object",
                echo(key)
            )));
        }
        if end > meta.len() {
            return Err(invalid_args(format!(
                "offset {offset} + byte_size {byte_size} is past the end of the object ({} bytes)",
                meta.len()
            )));
        }
        let mut regions = self.regions.lock();
        // Checked again under the lock: another registration may have won meanwhile.
        if regions.contains_key(name) {
            return Err(ShmError::Duplicate(echo(name).into_owned()));
        }
        if regions.len() >= self.limits.max_regions {
            return Err(ShmError::TooManyRegions {
                name: echo(name).into_owned(),
                limit: self.limits.max_regions,
            });
        }
        let total = regions.values().map(|r| r.byte_size).fold(0u64, u64::saturating_add);
        if total.checked_add(byte_size).is_none_or(|t| t > self.limits.max_bytes) {
            return Err(ShmError::TooManyBytes {
                name: echo(name).into_owned(),
                byte_size,
                limit: self.limits.max_bytes,
            });
        }
        regions.insert(
            name.to_string(),
            Arc::new(Region {
                name: name.to_string(),
                key: key.to_string(),
                offset,
                byte_size,
                file,
            }),
        );
        Ok(())
    }

    /// Unregisters `name`, or every region when `None`; an unknown name is not an
    /// error (Triton's rule).
    pub fn unregister(&self, name: Option<&str>) -> Result<(), ShmError> {
        if !self.limits.enabled {
            return Err(ShmError::Disabled);
        }
        let mut regions = self.regions.lock();
        match name {
            Some(n) => {
                regions.remove(n);
            }
            None => regions.clear(),
        }
        Ok(())
    }

    /// The status of `name`, or of every region (by name) when `None`.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<Status>, ShmError> {
        let regions = self.regions.lock();
        let status = |r: &Region| Status {
            name: r.name.clone(),
            key: r.key.clone(),
            offset: r.offset,
            byte_size: r.byte_size,
        };
        match name {
            Some(n) => regions
                .get(n)
                .map(|r| vec![status(r)])
                .ok_or_else(|| ShmError::UnknownStatus(echo(n).into_owned())),
            None => Ok(regions.values().map(|r| status(r)).collect()),
        }
    }

    /// CUDA status on a server without a GPU: no regions; a name is unknown (or a
    /// system region), as Triton's CPU build answers.
    pub fn cuda_status(&self, name: Option<&str>) -> Result<(), ShmError> {
        match name {
            None => Ok(()),
            Some(n) if self.regions.lock().contains_key(n) => Err(ShmError::NotCuda(echo(n).into_owned())),
            Some(n) => Err(ShmError::UnknownCudaRegion(echo(n).into_owned())),
        }
    }

    fn get(&self, name: &str) -> Result<Arc<Region>, ShmError> {
        self.regions
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ShmError::UnknownRegion(echo(name).into_owned()))
    }

    /// Fills the inputs that name a region (`refs`: index into `parts.inputs`) from
    /// it, and looks up the regions outputs are to be written into. `budget` bounds
    /// the bytes read for this request.
    pub fn prepare(
        &self,
        model: &str,
        parts: &mut RequestParts,
        refs: Refs,
        budget: usize,
    ) -> Result<Targets, ShmError> {
        if refs.is_empty() {
            return Ok(Targets::default());
        }
        let mut read = 0usize;
        for (i, r) in refs.inputs {
            let Some((name, tensor)) = parts.inputs.get_mut(i) else {
                continue;
            };
            let region = self.get(&r.region)?;
            if let Some(size) = tensor.dtype.size() {
                let n = element_count(&tensor.shape)
                    .ok_or_else(|| invalid(format!("input '{}': invalid shape {:?}", echo(name), tensor.shape)))?;
                let expected = n.checked_mul(size);
                if expected.map(|e| e as u64) != Some(r.byte_size) {
                    return Err(invalid(format!(
                        "input byte size mismatch for input '{}' for model '{}'. Expected {}, got {}",
                        echo(name),
                        echo(model),
                        expected.map_or_else(|| "more than fits in memory".to_string(), |e| e.to_string()),
                        r.byte_size
                    )));
                }
            }
            read = usize::try_from(r.byte_size)
                .ok()
                .and_then(|b| read.checked_add(b))
                .filter(|&t| t <= budget)
                .ok_or(ShmError::InputsTooLarge { limit: budget })?;
            let bytes = region.read(r.offset, r.byte_size)?;
            tensor.data = match tensor.dtype {
                DataType::Bytes => TensorData::Strings(
                    parse_wire_strings(bytes).map_err(|e| invalid(format!("input '{}': {e}", echo(name))))?,
                ),
                _ => TensorData::Raw(bytes),
            };
        }
        let mut outputs = Vec::with_capacity(refs.outputs.len());
        for (name, r) in refs.outputs {
            let region = self.get(&r.region)?;
            region.window(r.offset, r.byte_size)?;
            outputs.push((name, region, r));
        }
        Ok(Targets { outputs })
    }
}

// === Refs, Targets, Placed ===

/// The shared-memory parameters of one request, as the edge decoded them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Refs {
    /// Index into the request's inputs, and where its bytes are.
    pub inputs: Vec<(usize, TensorRef)>,
    /// Requested output name, and where it goes.
    pub outputs: Vec<(String, TensorRef)>,
}

impl Refs {
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }

    /// An input that names a region: its tensor, without data until
    /// [`Registry::prepare`] reads it.
    pub fn pending_input(dtype: DataType, shape: Vec<i64>) -> Tensor {
        Tensor {
            dtype,
            shape,
            data: match dtype {
                DataType::Bytes => TensorData::Strings(Vec::new()),
                _ => TensorData::Raw(Bytes::new()),
            },
        }
    }
}

/// Regions a request's outputs go to, held from before the run to after the write.
#[derive(Debug, Default)]
pub struct Targets {
    outputs: Vec<(String, Arc<Region>, TensorRef)>,
}

/// An output written into a region: what the answer says instead of its data.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacedOutput {
    pub region: String,
    pub offset: u64,
    /// The bytes written (the output's wire size).
    pub byte_size: u64,
}

/// The outputs of one answer that were written into regions, by name.
#[derive(Clone, Debug, Default)]
pub struct Placed(Vec<(String, PlacedOutput)>);

impl Placed {
    pub fn get(&self, name: &str) -> Option<&PlacedOutput> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }
}

impl Targets {
    /// Writes each output that has a target into its region.
    pub fn write(&self, outputs: &[(String, Tensor)]) -> Result<Placed, ShmError> {
        let mut placed = Vec::with_capacity(self.outputs.len());
        for (name, region, r) in &self.outputs {
            let Some((_, t)) = outputs.iter().find(|(n, _)| n == name) else {
                continue;
            };
            let wire = t.to_wire_bytes();
            region.write(name, r.offset, r.byte_size, &wire)?;
            placed.push((
                name.clone(),
                PlacedOutput {
                    region: r.region.clone(),
                    offset: r.offset,
                    byte_size: wire.len() as u64,
                },
            ));
        }
        Ok(Placed(placed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(dir: &std::path::Path) -> Registry {
        Registry::new(Limits {
            max_regions: 2,
            max_bytes: 64,
            dir: dir.to_path_buf(),
            ..Limits::default()
        })
    }

    #[test]
    fn keys_name_one_object() {
        assert_eq!(key_file("r", "/abc").unwrap(), "abc");
        assert_eq!(key_file("r", "//abc").unwrap(), "abc");
        for bad in [
            "",
            "/",
            "//",
            "/a/b",
            "../x",
            "/..",
            ".",
            "a\0b",
            "/triton_python_backend_shm_region_1",
        ] {
            assert!(matches!(key_file("r", bad), Err(ShmError::Invalid(_))), "{bad:?}");
        }
        assert!(key_file("r", &"k".repeat(MAX_KEY + 1)).is_err());
    }

    #[test]
    fn truncated_object_fails_the_request_not_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obj");
        std::fs::write(&path, [7u8; 32]).unwrap();
        let reg = registry(dir.path());
        reg.register("r", "/obj", 0, 32).unwrap();
        let region = reg.get("r").unwrap();
        assert_eq!(&region.read(8, 8).unwrap()[..], &[7u8; 8]);
        // The client shrinks the object after registering.
        File::options().write(true).open(&path).unwrap().set_len(4).unwrap();
        assert!(matches!(
            region.read(8, 8),
            Err(ShmError::Truncated { size: 4, end: 16, .. })
        ));
        assert!(matches!(
            region.write("o", 8, 8, &[1; 8]),
            Err(ShmError::Truncated { .. })
        ));
        // And the write did not grow it back.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4);
    }

    #[test]
    fn limits_and_windows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("obj"), [0u8; 64]).unwrap();
        let reg = registry(dir.path());
        assert!(matches!(reg.register("a", "obj", 60, 8), Err(ShmError::Invalid(_))));
        assert!(matches!(
            reg.register("a", "obj", u64::MAX, 8),
            Err(ShmError::Invalid(_))
        ));
        reg.register("a", "obj", 0, 40).unwrap();
        assert_eq!(reg.register("a", "obj", 0, 8), Err(ShmError::Duplicate("a".into())));
        assert!(matches!(
            reg.register("b", "obj", 0, 40),
            Err(ShmError::TooManyBytes { .. })
        ));
        reg.register("b", "obj", 40, 24).unwrap();
        assert!(matches!(
            reg.register("c", "obj", 0, 1),
            Err(ShmError::TooManyRegions { .. })
        ));
        let a = reg.get("a").unwrap();
        assert!(a.window(40, 1).is_err());
        assert!(a.window(39, 2).is_err());
        assert!(a.window(1, u64::MAX).is_err());
        assert_eq!(a.window(39, 1).unwrap(), 39);
        assert!(reg.get("b").unwrap().window(0, 24).is_ok_and(|at| at == 40));
        reg.unregister(Some("a")).unwrap();
        reg.unregister(Some("ghost")).unwrap();
        // A request that looked the region up still reads it after unregister.
        assert_eq!(a.read(0, 4).unwrap().len(), 4);
        assert_eq!(reg.status(None).unwrap().len(), 1);
        reg.unregister(None).unwrap();
        assert!(reg.status(None).unwrap().is_empty());
    }

    #[test]
    fn symlinks_and_fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, [0u8; 16]).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        let reg = registry(dir.path());
        assert!(matches!(reg.register("r", "link", 0, 8), Err(ShmError::Invalid(_))));
        let status = std::process::Command::new("mkfifo")
            .arg(dir.path().join("fifo"))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(matches!(reg.register("r", "fifo", 0, 8), Err(ShmError::Invalid(_))));
    }
}
