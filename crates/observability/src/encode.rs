//! Scrape-time encoding helpers for the collectors every crate registers: one gauge,
//! or a gauge family from rows computed at scrape.

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{gauge::ConstGauge, MetricType},
};

/// One unlabelled gauge; absent, not zero, when there is no value.
pub fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: Option<f64>) -> Result<(), std::fmt::Error> {
    if let Some(v) = v {
        ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
    }
    Ok(())
}

pub fn gauge_family_f64<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(L, f64)>,
) -> Result<(), std::fmt::Error> {
    gauge_family(enc, name, help, rows)
}

pub fn gauge_family<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(L, V)>,
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    for (labels, v) in rows {
        let g = ConstGauge::new(v);
        g.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}
