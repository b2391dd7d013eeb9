//! Process and runtime figures read from /proc at scrape time, with the names the
//! Prometheus client libraries use (`process_*`). Values that cannot be read on this
//! platform are absent, not zero; so is GPU memory, as no GPU is queried.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};

use crate::encode::gauge;

#[derive(Debug)]
pub struct ProcessCollector {
    runtime: Option<tokio::runtime::Handle>,
}

impl ProcessCollector {
    pub fn new() -> ProcessCollector {
        ProcessCollector {
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture.
const USER_HZ: f64 = 100.0;

fn status_kb(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            status_kb(&status, "VmRSS:").map(|k| k * 1024.0),
        )?;
        gauge(
            &mut enc,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            status_kb(&status, "VmSize:").map(|k| k * 1024.0),
        )?;
        gauge(
            &mut enc,
            "process_threads",
            "OS threads in the process",
            status_kb(&status, "Threads:"),
        )?;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            let c = ConstCounter::new((u + s) / USER_HZ);
            c.encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?)?;
        }
        let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            btime.zip(ticks(19)).map(|(b, t)| b + t / USER_HZ),
        )?;
        let fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
        gauge(&mut enc, "process_open_fds", "Open file descriptors", fds)?;
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| {
            l.lines()
                .find(|x| x.starts_with("Max open files"))
                .and_then(|x| x.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
        gauge(&mut enc, "process_max_fds", "Limit of open file descriptors", max_fds)?;
        if let Some(rt) = &self.runtime {
            let m = rt.metrics();
            gauge(
                &mut enc,
                "tokio_workers",
                "Worker threads of the async runtime",
                Some(m.num_workers() as f64),
            )?;
            gauge(
                &mut enc,
                "tokio_alive_tasks",
                "Tasks alive in the async runtime",
                Some(m.num_alive_tasks() as f64),
            )?;
            gauge(
                &mut enc,
                "tokio_global_queue_depth",
                "Tasks waiting in the runtime's global queue",
                Some(m.global_queue_depth() as f64),
            )?;
        }
        Ok(())
    }
}
