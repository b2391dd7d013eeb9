//! Load traces: requests arriving per second, read from a two-column CSV.
//!
//! ```text
//! second,arrivals
//! 0,98
//! 1,103
//! ```
//!
//! Seconds must increase; a gap means seconds without arrivals, so sparse traces
//! stay short. Errors name the line, because traces are usually edited by hand or
//! exported from a spreadsheet.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest trace accepted: a week. A typo such as `36000000` for `3600` would
/// otherwise allocate a huge trace of zeros before anyone notices.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;

/// Arrivals per second, index = second since the start of the trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    arrivals: Vec<u32>,
}

/// Why a trace could not be read.
#[derive(Debug)]
pub enum TraceError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No header line, or nothing at all.
    Empty,
    /// The first line is not `second,arrivals`.
    Header {
        found: String,
    },
    /// A data line is malformed; `line` counts from 1 and includes the header.
    Line {
        line: usize,
        message: String,
    },
    /// A header and no data.
    NoData,
}

// === Trace ===

impl Trace {
    pub fn new(arrivals: Vec<u32>) -> Self {
        Trace { arrivals }
    }

    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, TraceError> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or(TraceError::Empty)?;
        let columns: Vec<String> = header.split(',').map(|c| c.trim().to_ascii_lowercase()).collect();
        if columns != ["second", "arrivals"] {
            return Err(TraceError::Header {
                found: header.trim().to_string(),
            });
        }
        let mut arrivals: Vec<u32> = Vec::new();
        for (index, line) in lines {
            let line_no = index + 1;
            let bad = |message: String| TraceError::Line { line: line_no, message };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [second, count] = fields[..] else {
                return Err(bad(format!(
                    "expected 2 fields `second,arrivals`, found {}",
                    fields.len()
                )));
            };
            let second: u64 = second
                .parse()
                .map_err(|_| bad(format!("second `{second}` is not a non-negative integer")))?;
            let count: u32 = count
                .parse()
                .map_err(|_| bad(format!("arrivals `{count}` is not a non-negative integer")))?;
            if second > MAX_SECONDS {
                return Err(bad(format!(
                    "second {second} is beyond the one-week limit ({MAX_SECONDS})"
                )));
            }
            let next = arrivals.len() as u64;
            if second < next {
                return Err(bad(format!(
                    "second {second} does not increase (expected {next} or later)"
                )));
            }
            arrivals.resize(second as usize, 0);
            arrivals.push(count);
        }
        if arrivals.is_empty() {
            return Err(TraceError::NoData);
        }
        Ok(Trace { arrivals })
    }

    /// The trace as CSV, in the format [`Trace::parse`] reads.
    pub fn to_csv(&self) -> String {
        let mut out = String::with_capacity(self.arrivals.len() * 10 + 16);
        out.push_str("second,arrivals\n");
        for (second, count) in self.arrivals.iter().enumerate() {
            out.push_str(&format!("{second},{count}\n"));
        }
        out
    }

    pub fn arrivals(&self) -> &[u32] {
        &self.arrivals
    }

    /// Length in seconds.
    pub fn len(&self) -> usize {
        self.arrivals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.arrivals.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.arrivals.iter().map(|&a| u64::from(a)).sum()
    }
}

// === TraceError ===

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceError::Io { path, source } => write!(f, "cannot read trace {}: {source}", path.display()),
            TraceError::Empty => write!(f, "trace is empty: expected a `second,arrivals` header"),
            TraceError::Header { found } => {
                write!(f, "line 1: expected the header `second,arrivals`, found `{found}`")
            }
            TraceError::Line { line, message } => write!(f, "line {line}: {message}"),
            TraceError::NoData => write!(f, "trace has a header but no data lines"),
        }
    }
}

impl std::error::Error for TraceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TraceError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
