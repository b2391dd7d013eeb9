//! GPU figures from NVIDIA's NVML, read at scrape time. NVML is loaded at run time
//! (`libnvidia-ml.so`, via `nvml-wrapper`): on a machine without an NVIDIA driver
//! `init` fails, nothing is registered, and no `gpu_*` series exist. Absent, not
//! zero: a dashboard must not read "0 % busy" off a machine that has no GPU.

use nvml_wrapper::{enum_wrappers::device::TemperatureSensor, Nvml};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
};

pub struct GpuCollector {
    nvml: Nvml,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

impl GpuCollector {
    /// The collector, or why there is none (no driver, no device).
    pub fn probe() -> Result<GpuCollector, NoGpu> {
        let nvml = Nvml::init().map_err(NoGpu::Nvml)?;
        match nvml.device_count() {
            Ok(0) => Err(NoGpu::NoDevice),
            Ok(_) => Ok(GpuCollector { nvml }),
            Err(e) => Err(NoGpu::Nvml(e)),
        }
    }
}

/// Why there are no GPU figures.
#[derive(Debug)]
pub enum NoGpu {
    /// No driver, or NVML failed.
    Nvml(nvml_wrapper::error::NvmlError),
    NoDevice,
}

impl std::fmt::Display for NoGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoGpu::Nvml(e) => write!(f, "NVML unavailable: {e}"),
            NoGpu::NoDevice => f.write_str("NVML found no GPU"),
        }
    }
}

impl std::error::Error for NoGpu {}

impl std::fmt::Debug for GpuCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCollector").finish_non_exhaustive()
    }
}

impl Collector for GpuCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let count = self.nvml.device_count().unwrap_or(0);
        let mut util = Vec::new();
        let mut used = Vec::new();
        let mut total = Vec::new();
        let mut temp = Vec::new();
        let mut power = Vec::new();
        for i in 0..count {
            let Ok(d) = self.nvml.device_by_index(i) else { continue };
            let label = GpuLabel { gpu: i.to_string() };
            // A figure the device does not report is skipped, not zeroed.
            if let Ok(u) = d.utilization_rates() {
                util.push((label.clone(), f64::from(u.gpu) / 100.0));
            }
            if let Ok(m) = d.memory_info() {
                used.push((label.clone(), m.used as f64));
                total.push((label.clone(), m.total as f64));
            }
            if let Ok(t) = d.temperature(TemperatureSensor::Gpu) {
                temp.push((label.clone(), f64::from(t)));
            }
            if let Ok(p) = d.power_usage() {
                power.push((label, f64::from(p) / 1000.0));
            }
        }
        crate::encode::gauge_family_f64(
            &mut enc,
            "gpu_utilization_ratio",
            "Share of time a kernel ran on the GPU (NVML)",
            util,
        )?;
        crate::encode::gauge_family_f64(&mut enc, "gpu_memory_used_bytes", "GPU memory in use (NVML)", used)?;
        crate::encode::gauge_family_f64(&mut enc, "gpu_memory_total_bytes", "GPU memory installed (NVML)", total)?;
        crate::encode::gauge_family_f64(&mut enc, "gpu_temperature_celsius", "GPU die temperature (NVML)", temp)?;
        crate::encode::gauge_family_f64(&mut enc, "gpu_power_watts", "GPU power draw (NVML)", power)
    }
}

#[cfg(test)]
mod tests {
    use super::GpuCollector;
    use crate::Metrics;

    #[test]
    fn gpu_series_exist_exactly_when_nvml_sees_a_gpu() {
        let text = Metrics::new().encode();
        match GpuCollector::probe() {
            Ok(_) => assert!(text.contains("gpu_memory_total_bytes{gpu=\"0\"}"), "{text}"),
            // CPU-only: absent, not zero.
            Err(why) => {
                assert!(!text.contains("gpu_"), "no GPU ({why}) but GPU series exported");
            }
        }
    }
}
