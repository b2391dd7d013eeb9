//! A load request's `config` parameter: JSON in Triton's field names, as
//! `GET v2/models/{m}/config` answers them, applied over the model's `config.toml`.
//!
//! The fields the JSON names replace the file's; the ones it leaves out keep the
//! file's values (Triton would fill them from the model; Lattice has the file).
//! Unknown fields are refused, as Triton refuses them. Numbers may be JSON numbers
//! or numeric strings (protobuf's JSON form, which tritonclient's example uses).

use serde_json::{Map, Value};

use crate::config::{DynamicBatching, ModelConfig, TensorConfig, VersionPolicy};

/// Largest override accepted, in bytes: a config is a few KiB.
pub const MAX_OVERRIDE_BYTES: usize = 64 * 1024;
/// Most inputs or outputs an override may declare.
const MAX_TENSORS: usize = 256;
const MAX_DIMS: usize = 16;

/// Why an override cannot be applied; the caller's to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config override: {0}")]
pub struct OverrideError(String);

fn bad<T>(m: impl Into<String>) -> Result<T, OverrideError> {
    Err(OverrideError(m.into()))
}

fn int(v: &Value, what: &str) -> Result<i64, OverrideError> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .map_or_else(|| bad(format!("'{what}' must be an integer")), Ok)
}

fn uint(v: &Value, what: &str) -> Result<usize, OverrideError> {
    usize::try_from(int(v, what)?).or_else(|_| bad(format!("'{what}' must not be negative")))
}

fn object<'a>(v: &'a Value, what: &str, known: &[&str]) -> Result<&'a Map<String, Value>, OverrideError> {
    let Value::Object(m) = v else {
        return bad(format!("'{what}' must be an object"));
    };
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return bad(format!("unknown field '{}' in '{what}'", crate::repository::echo(k)));
    }
    Ok(m)
}

fn array<'a>(v: &'a Value, what: &str, max: usize) -> Result<&'a Vec<Value>, OverrideError> {
    match v {
        Value::Array(a) if a.len() <= max => Ok(a),
        Value::Array(_) => bad(format!("'{what}' has more than {max} entries")),
        _ => bad(format!("'{what}' must be an array")),
    }
}

fn tensors(v: &Value, what: &str, base: &[TensorConfig]) -> Result<Vec<TensorConfig>, OverrideError> {
    array(v, what, MAX_TENSORS)?
        .iter()
        .map(|t| {
            let m = object(
                t,
                what,
                &[
                    "name",
                    "data_type",
                    "dims",
                    "optional",
                    "label_filename",
                    "format",
                    "reshape",
                    "is_shape_tensor",
                ],
            )?;
            let name = match m.get("name") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                _ => return bad(format!("every '{what}' entry needs a 'name'")),
            };
            let data_type = match m.get("data_type") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return bad(format!(
                        "{what} '{}' needs a 'data_type'",
                        crate::repository::echo(&name)
                    ))
                }
            };
            let dims = match m.get("dims") {
                Some(d) => array(d, "dims", MAX_DIMS)?
                    .iter()
                    .map(|x| int(x, "dims"))
                    .collect::<Result<Vec<_>, _>>()?,
                None => return bad(format!("{what} '{}' needs 'dims'", crate::repository::echo(&name))),
            };
            // Lattice's own per-tensor settings (warm-up fill, allowed values) stay.
            let mut t = base.iter().find(|b| b.name == name).cloned().unwrap_or(TensorConfig {
                name: name.clone(),
                data_type: String::new(),
                dims: Vec::new(),
                optional: false,
                zeros_if_absent: false,
                warmup_fill: None,
                allowed_values: None,
            });
            t.data_type = data_type;
            t.dims = dims;
            if let Some(o) = m.get("optional") {
                t.optional = o
                    .as_bool()
                    .map_or_else(|| bad(format!("'optional' of '{}' must be a bool", t.name)), Ok)?;
            }
            Ok(t)
        })
        .collect()
}

fn dynamic_batching(v: &Value, base: Option<&DynamicBatching>) -> Result<DynamicBatching, OverrideError> {
    let m = object(
        v,
        "dynamic_batching",
        &[
            "preferred_batch_size",
            "max_queue_delay_microseconds",
            "preserve_ordering",
            "priority_levels",
            "default_priority_level",
            "default_queue_policy",
            "priority_queue_policy",
        ],
    )?;
    let mut db = base.cloned().unwrap_or_default();
    if let Some(p) = m.get("preferred_batch_size") {
        db.preferred_batch_size = array(p, "preferred_batch_size", 64)?
            .iter()
            .map(|x| uint(x, "preferred_batch_size"))
            .collect::<Result<_, _>>()?;
    }
    if let Some(d) = m.get("max_queue_delay_microseconds") {
        db.max_queue_delay_microseconds = uint(d, "max_queue_delay_microseconds")? as u64;
    }
    if let Some(q) = m.get("default_queue_policy") {
        let q = object(
            q,
            "default_queue_policy",
            &[
                "max_queue_size",
                "default_timeout_microseconds",
                "allow_timeout_override",
                "timeout_action",
            ],
        )?;
        if let Some(s) = q.get("max_queue_size") {
            db.max_queue_size = uint(s, "max_queue_size")?;
        }
        if let Some(t) = q.get("default_timeout_microseconds") {
            db.default_timeout_microseconds = uint(t, "default_timeout_microseconds")? as u64;
        }
    }
    Ok(db)
}

fn version_policy(v: &Value) -> Result<VersionPolicy, OverrideError> {
    let m = object(v, "version_policy", &["latest", "all", "specific"])?;
    if m.len() != 1 {
        return bad("'version_policy' must hold exactly one of 'latest', 'all', 'specific'");
    }
    if let Some(l) = m.get("latest") {
        let l = object(l, "latest", &["num_versions"])?;
        let n = l.get("num_versions").map_or(Ok(1), |n| uint(n, "num_versions"))?;
        return Ok(VersionPolicy::Latest { num_versions: n });
    }
    if let Some(a) = m.get("all") {
        object(a, "all", &[])?;
        return Ok(VersionPolicy::All {});
    }
    let s = object(&m["specific"], "specific", &["versions"])?;
    let versions = match s.get("versions") {
        Some(v) => array(v, "versions", 1024)?
            .iter()
            .map(|x| int(x, "versions"))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(VersionPolicy::Specific { versions })
}

/// Applies `text` (the `config` load parameter) over `base`, the model's file config.
pub fn apply(base: &ModelConfig, text: &str) -> Result<ModelConfig, OverrideError> {
    if text.len() > MAX_OVERRIDE_BYTES {
        return bad(format!("{} bytes, above the limit of {MAX_OVERRIDE_BYTES}", text.len()));
    }
    let v: Value = serde_json::from_str(text).map_err(|e| OverrideError(format!("not JSON: {e}")))?;
    let m = object(
        &v,
        "config",
        &[
            "name",
            "platform",
            "backend",
            "max_batch_size",
            "input",
            "output",
            "instance_group",
            "dynamic_batching",
            "version_policy",
            "default_model_filename",
        ],
    )?;
    let mut cfg = base.clone();
    if let Some(n) = m.get("name") {
        match n {
            Value::String(s) if s.is_empty() || *s == base.name => {}
            _ => return bad(format!("'name' must be '{}' or empty", base.name)),
        }
    }
    for (key, allowed) in [
        ("platform", &["onnxruntime_onnx", ""][..]),
        ("backend", &["onnxruntime", ""][..]),
        ("default_model_filename", &["model.onnx", ""][..]),
    ] {
        if let Some(p) = m.get(key) {
            if !matches!(p, Value::String(s) if allowed.contains(&s.as_str())) {
                return bad(format!("'{key}' must be one of {allowed:?}"));
            }
        }
    }
    if let Some(b) = m.get("max_batch_size") {
        cfg.max_batch_size = uint(b, "max_batch_size")?;
    }
    if let Some(i) = m.get("input") {
        cfg.input = tensors(i, "input", &base.input)?;
    }
    if let Some(o) = m.get("output") {
        cfg.output = tensors(o, "output", &base.output)?;
    }
    if let Some(g) = m.get("instance_group") {
        let mut count = 0usize;
        for e in array(g, "instance_group", 16)? {
            let e = object(
                e,
                "instance_group",
                &["name", "kind", "count", "gpus", "profile", "passive", "host_policy"],
            )?;
            if let Some(k) = e.get("kind") {
                if !matches!(k, Value::String(s) if s == "KIND_CPU" || s == "KIND_AUTO") {
                    return bad("instance_group 'kind' must be KIND_CPU or KIND_AUTO on this server");
                }
            }
            let c = e.get("count").map_or(Ok(1), |c| uint(c, "count"))?;
            count = count.saturating_add(c);
        }
        if !(1..=64).contains(&count) {
            return bad("instance_group counts must add up to 1..=64");
        }
        cfg.instance_group.count = count;
    }
    if let Some(d) = m.get("dynamic_batching") {
        cfg.dynamic_batching = Some(dynamic_batching(d, base.dynamic_batching.as_ref())?);
    }
    if let Some(p) = m.get("version_policy") {
        cfg.version_policy = version_policy(p)?;
    }
    cfg.validate().map_err(|e| OverrideError(e.to_string()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ModelConfig {
        toml::from_str(
            r#"
            name = "m"
            max_batch_size = 8
            [[input]]
            name = "x"
            data_type = "TYPE_INT32"
            dims = [16]
            warmup_fill = 3.0
            [[output]]
            name = "y"
            data_type = "TYPE_INT32"
            dims = [16]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn named_fields_replace_the_file_and_the_rest_stays() {
        let c = apply(&base(), r#"{"max_batch_size": "16"}"#).unwrap();
        assert_eq!(c.max_batch_size, 16);
        assert_eq!(c.input, base().input);
        let c = apply(
            &base(),
            r#"{"name":"m","max_batch_size":4,"input":[{"name":"x","data_type":"TYPE_INT32","dims":["16"]}],
               "instance_group":[{"kind":"KIND_CPU","count":2}],
               "dynamic_batching":{"max_queue_delay_microseconds":50,"default_queue_policy":{"max_queue_size":7}},
               "version_policy":{"specific":{"versions":[1]}}}"#,
        )
        .unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.input[0].warmup_fill, Some(3.0));
        assert_eq!(c.instance_group.count, 2);
        assert_eq!(c.dynamic_batching.as_ref().unwrap().max_queue_size, 7);
        assert_eq!(c.version_policy, VersionPolicy::Specific { versions: vec![1] });
    }

    #[test]
    fn malformed_overrides_are_refused() {
        for bad in [
            "{",
            "[]",
            r#"{"max_batch_size": "many"}"#,
            r#"{"max_batch_size": -1}"#,
            r#"{"inputs": []}"#,
            r#"{"name": "other"}"#,
            r#"{"input": [{"name": "x", "data_type": "TYPE_NOPE", "dims": [16]}]}"#,
            r#"{"input": [{"name": "x", "dims": [16]}]}"#,
            r#"{"instance_group": [{"kind": "KIND_GPU"}]}"#,
            r#"{"version_policy": {"latest": {}, "all": {}}}"#,
        ] {
            assert!(apply(&base(), bad).is_err(), "{bad}");
        }
        let huge = format!("{{\"name\": \"{}\"}}", "m".repeat(MAX_OVERRIDE_BYTES));
        assert!(apply(&base(), &huge).unwrap_err().to_string().contains("limit"));
    }
}
