//! The Kubernetes manifests under deploy/k8s, checked offline on what `kubectl
//! kustomize` really renders: every overlay, and every combination of the components
//! an overlay can pick. Each render is checked for what would make a cluster refuse it
//! or make part of it not work:
//!
//! - core kinds deserialise strictly into their k8s-openapi types (a field the type
//!   does not know is an error), KEDA and Istio kinds validate against the JSON
//!   schemas of their upstream CRDs (fetched by scripts/setup.sh, unknown fields an
//!   error);
//! - at most one autoscaler (HPA or ScaledObject) per workload, and no `spec.replicas`
//!   on a workload an autoscaler owns;
//! - scaler addresses fully qualified, in the render's namespace when they name one of
//!   its Services;
//! - every DestinationRule subset selects pods of some workload in the render;
//! - every ConfigMap, Secret, PVC, Service and ServiceAccount a workload references is
//!   in the render or listed in deploy/k8s/prerequisites.yaml.
//!
//! And the values that must agree with the binary do: ports, probes, drain timing, the
//! metric names the HPA, adapter rules and ScaledObjects read.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::ConfigMap, core::v1::Service,
    policy::v1::PodDisruptionBudget,
};
use lattice_inference::{ErrorType, ModelLabels, ModelMetrics};
use lattice_observability::Metrics;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/k8s")
        .canonicalize()
        .unwrap()
}

fn repo_root() -> PathBuf {
    k8s_dir().join("../..").canonicalize().unwrap()
}

// ---------------------------------------------------------------------------
// Rendering

/// A kubectl whose kustomize is v5: `LATTICE_KUBECTL`, the one scripts/setup.sh puts
/// in the venv, or the one on PATH.
fn kubectl() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(k) = std::env::var_os("LATTICE_KUBECTL") {
        candidates.push(PathBuf::from(k));
    }
    candidates.push(repo_root().join(".venv/bin/kubectl"));
    candidates.push(PathBuf::from("kubectl"));
    for k in &candidates {
        let Ok(out) = Command::new(k).args(["version", "--client"]).output() else {
            continue;
        };
        if String::from_utf8_lossy(&out.stdout).contains("Kustomize Version: v5") {
            return k.clone();
        }
    }
    panic!("no kubectl with kustomize v5 (tried {candidates:?}): run scripts/setup.sh, or set LATTICE_KUBECTL");
}

struct Render {
    /// The overlay, or the components of a generated kustomization.
    name: String,
    namespace: String,
    docs: Vec<Value>,
}

impl Render {
    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    fn typed<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        let v = self
            .get(kind, name)
            .unwrap_or_else(|| panic!("{}: {kind}/{name} missing", self.name));
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {kind}/{name}: {e}", self.name))
    }
}

fn kustomize(kubectl: &Path, dir: &Path, name: &str) -> Result<Render, String> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("{name}: running kubectl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{name}: kubectl kustomize failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        docs.push(Value::deserialize(doc).map_err(|e| format!("{name}: {e}"))?);
    }
    let namespaces: BTreeSet<&str> = docs
        .iter()
        .filter_map(|d| d["metadata"]["namespace"].as_str())
        .collect();
    let [namespace] = namespaces.into_iter().collect::<Vec<_>>()[..] else {
        return Err(format!("{name}: the render must set exactly one namespace"));
    };
    let namespace = namespace.to_string();
    Ok(Render {
        name: name.to_string(),
        namespace,
        docs,
    })
}

fn overlays() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(k8s_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}

/// The component groups: at most one of a group per render (each claims the same
/// workload's replica count). Every directory under components/ must be named here.
const SERVER_AUTOSCALERS: [&str; 3] = ["hpa", "keda-external", "keda-prometheus"];
const QUEUE_SCALERS: [&str; 2] = ["queue-jetstream", "queue-kafka"];
const OPTIONAL: [&str; 2] = ["redis", "canary"];

/// The replacement the overlays picking keda-external carry (see that component).
const SCALER_ADDRESS_REPLACEMENT: &str = "replacements:
  - source: {kind: Service, name: lattice-grpc, fieldPath: metadata.namespace}
    targets:
      - select: {kind: ScaledObject, name: lattice-external}
        fieldPaths: [spec.triggers.0.metadata.scalerAddress]
        options: {delimiter: \".\", index: 1}
";

/// Renders base plus `components` in namespace `namespace` through a kustomization
/// written to a temporary directory.
fn render_components(
    kubectl: &Path,
    namespace: &str,
    components: &[&str],
    with_replacement: bool,
) -> Result<Render, String> {
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().canonicalize().unwrap();
    // kustomize takes only relative paths.
    let up = "../".repeat(here.components().count() - 1);
    let k8s = format!("{up}{}", k8s_dir().strip_prefix("/").unwrap().display());
    let mut text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {namespace}\nresources:\n  - {k8s}/base\ncomponents:\n"
    );
    for c in components {
        text.push_str(&format!("  - {k8s}/components/{c}\n"));
    }
    if with_replacement {
        text.push_str(SCALER_ADDRESS_REPLACEMENT);
    }
    std::fs::write(here.join("kustomization.yaml"), text).unwrap();
    kustomize(kubectl, &here, &format!("components [{}]", components.join(", ")))
}

/// Every overlay, then every valid combination of components (Redis always: without
/// it the store's Service is missing, see `the_checks_catch_the_known_mistakes`).
fn all_renders(kubectl: &Path) -> Vec<Render> {
    let mut renders = Vec::new();
    for dir in overlays() {
        let name = format!("overlay {}", dir.file_name().unwrap().to_string_lossy());
        renders.push(kustomize(kubectl, &dir, &name).unwrap());
    }
    let mut known: BTreeSet<&str> = SERVER_AUTOSCALERS.into_iter().collect();
    known.extend(QUEUE_SCALERS);
    known.extend(OPTIONAL);
    for e in std::fs::read_dir(k8s_dir().join("components")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            known.contains(name.as_str()),
            "component {name} is in no group of this test: add it"
        );
    }
    for server in [None].into_iter().chain(SERVER_AUTOSCALERS.map(Some)) {
        for queue in [None].into_iter().chain(QUEUE_SCALERS.map(Some)) {
            for canary in [false, true] {
                let mut components: Vec<&str> = vec!["redis"];
                components.extend(server);
                components.extend(queue);
                if canary {
                    components.push("canary");
                }
                // Not the overlays' namespace: the render's own must flow everywhere.
                let r = render_components(kubectl, "lattice-test", &components, server == Some("keda-external"));
                renders.push(r.unwrap());
            }
        }
    }
    renders
}

// ---------------------------------------------------------------------------
// Schemas

/// Deserialises `v` into `T` and back: a field `T` does not know is dropped on the way
/// and shows as a difference, so unknown fields are errors.
fn strict_core<T: DeserializeOwned + Serialize>(v: &Value) -> Result<(), String> {
    let typed: T =
        serde_path_to_error::deserialize(v.clone()).map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed).unwrap();
    match first_difference(v, &back, String::new()) {
        None => Ok(()),
        Some(path) => Err(format!("field {path} is not in the schema (or not as written)")),
    }
}

fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let p = format!("{path}.{k}");
                match y.get(k) {
                    Some(vb) => {
                        if let Some(d) = first_difference(va, vb, p) {
                            return Some(d);
                        }
                    }
                    None => return Some(p),
                }
            }
            // Keys only the serialiser writes (apiVersion and kind of an embedded
            // object) are not the document's.
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(path),
    }
}

fn core_schema_problem(doc: &Value) -> Option<Result<(), String>> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    Some(match (api, kind) {
        ("v1", "Namespace") => strict_core::<core::Namespace>(doc),
        ("v1", "ServiceAccount") => strict_core::<core::ServiceAccount>(doc),
        ("v1", "Service") => strict_core::<core::Service>(doc),
        ("v1", "ConfigMap") => strict_core::<core::ConfigMap>(doc),
        ("v1", "Secret") => strict_core::<core::Secret>(doc),
        ("v1", "PersistentVolumeClaim") => strict_core::<core::PersistentVolumeClaim>(doc),
        ("apps/v1", "Deployment") => strict_core::<apps::Deployment>(doc),
        ("apps/v1", "StatefulSet") => strict_core::<apps::StatefulSet>(doc),
        ("rbac.authorization.k8s.io/v1", "Role") => strict_core::<rbac::Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict_core::<rbac::RoleBinding>(doc),
        ("policy/v1", "PodDisruptionBudget") => strict_core::<PodDisruptionBudget>(doc),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => strict_core::<HorizontalPodAutoscaler>(doc),
        _ => return None,
    })
}

/// CRD kinds the render may hold, by (apiVersion, kind): the schema file under
/// .cache/crd-schemas (deploy/k8s/CRD-SCHEMAS.lock says where each comes from).
fn crd_schema_file(api: &str, kind: &str) -> Option<&'static str> {
    Some(match (api, kind) {
        ("keda.sh/v1alpha1", "ScaledObject") => "keda.sh/ScaledObject_v1alpha1.json",
        ("keda.sh/v1alpha1", "ScaledJob") => "keda.sh/ScaledJob_v1alpha1.json",
        ("keda.sh/v1alpha1", "TriggerAuthentication") => "keda.sh/TriggerAuthentication_v1alpha1.json",
        ("keda.sh/v1alpha1", "ClusterTriggerAuthentication") => "keda.sh/ClusterTriggerAuthentication_v1alpha1.json",
        // Istio serves v1, v1beta1 and v1alpha3 from one schema.
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1", "VirtualService") => {
            "networking.istio.io/VirtualService_v1beta1.json"
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1", "DestinationRule") => {
            "networking.istio.io/DestinationRule_v1beta1.json"
        }
        _ => return None,
    })
}

/// The API server prunes (or, with strict field validation, refuses) fields a CRD
/// schema does not declare; JSON Schema allows them. Closing every object that lists
/// its properties, unless it preserves unknown fields, makes them errors here too, as
/// kubeconform's strict mode does. `nullable` is OpenAPI's, spelt as a null type.
fn strictify(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            if m.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::String(t)) = m.get("type").cloned() {
                    m.insert("type".into(), json!([t, "null"]));
                }
            }
            let preserve = m.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if m.contains_key("properties") && !m.contains_key("additionalProperties") && !preserve {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            m.values_mut().for_each(strictify);
        }
        Value::Array(a) => a.iter_mut().for_each(strictify),
        _ => {}
    }
}

struct CrdSchemas {
    validators: BTreeMap<&'static str, jsonschema::Validator>,
}

impl CrdSchemas {
    fn load() -> Self {
        let dir = repo_root().join(".cache/crd-schemas");
        let mut validators = BTreeMap::new();
        for (api, kind) in [
            ("keda.sh/v1alpha1", "ScaledObject"),
            ("keda.sh/v1alpha1", "ScaledJob"),
            ("keda.sh/v1alpha1", "TriggerAuthentication"),
            ("keda.sh/v1alpha1", "ClusterTriggerAuthentication"),
            ("networking.istio.io/v1", "VirtualService"),
            ("networking.istio.io/v1", "DestinationRule"),
        ] {
            let file = crd_schema_file(api, kind).unwrap();
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("CRD schema {} unreadable ({e}): run scripts/setup.sh", path.display()));
            let mut schema: Value = serde_json::from_str(&text).unwrap();
            // Metadata is ObjectMeta, checked through k8s-openapi instead (the schema
            // points at it by an id the package resolves at run time).
            schema["properties"]["metadata"] = json!({"type": "object"});
            // apiVersion is the one the document is served as (see crd_schema_file).
            schema["properties"]["apiVersion"] = json!({"type": "string"});
            strictify(&mut schema);
            validators.insert(file, jsonschema::validator_for(&schema).unwrap());
        }
        Self { validators }
    }

    fn check(&self, doc: &Value) -> Option<Result<(), String>> {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let file = crd_schema_file(api, kind)?;
        let errors: Vec<String> = self.validators[file]
            .iter_errors(doc)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        let meta = strict_core::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(&doc["metadata"])
            .err()
            .map(|e| format!("metadata: {e}"));
        let all: Vec<String> = errors.into_iter().chain(meta).collect();
        Some(if all.is_empty() { Ok(()) } else { Err(all.join("; ")) })
    }
}

// ---------------------------------------------------------------------------
// The checks: each returns the problems it finds in one render.

fn id(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn check_schemas(r: &Render, crds: &CrdSchemas) -> Vec<String> {
    r.docs
        .iter()
        .filter_map(|d| {
            let result = core_schema_problem(d)
                .or_else(|| crds.check(d))
                .unwrap_or_else(|| Err(format!("no schema for {} {}", d["apiVersion"], d["kind"])));
            result.err().map(|e| format!("{}: {e}", id(d)))
        })
        .collect()
}

/// (kind, name) of the workload each autoscaler targets.
fn autoscalers(r: &Render) -> Vec<(String, (String, String))> {
    let mut out = Vec::new();
    for h in r.of_kind("HorizontalPodAutoscaler") {
        let t = &h["spec"]["scaleTargetRef"];
        out.push((
            id(h),
            (
                t["kind"].as_str().unwrap_or("").into(),
                t["name"].as_str().unwrap_or("").into(),
            ),
        ));
    }
    for s in r.of_kind("ScaledObject") {
        let t = &s["spec"]["scaleTargetRef"];
        // KEDA's default target kind.
        let kind = t["kind"].as_str().unwrap_or("Deployment");
        out.push((id(s), (kind.into(), t["name"].as_str().unwrap_or("").into())));
    }
    out
}

fn check_autoscalers(r: &Render) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_target: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (scaler, target) in autoscalers(r) {
        by_target.entry(target).or_default().push(scaler);
    }
    for ((kind, name), scalers) in by_target {
        if scalers.len() > 1 {
            problems.push(format!(
                "{kind}/{name} is scaled by {}: KEDA refuses a ScaledObject whose target is already managed, and two autoscalers fight over the count",
                scalers.join(" and ")
            ));
        }
        match r.get(&kind, &name) {
            None => problems.push(format!(
                "{} target {kind}/{name} is not in the render",
                scalers.join(", ")
            )),
            Some(w) if !w["spec"]["replicas"].is_null() => problems.push(format!(
                "{kind}/{name} sets spec.replicas though {} owns it: every apply resets the autoscaler's count",
                scalers.join(", ")
            )),
            Some(_) => {}
        }
    }
    problems
}

/// `host` of `host:port` or `scheme://host:port/...`.
fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

fn port_of(addr: &str) -> Option<i64> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    hostport.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// A Service address seen from outside the render's namespace (KEDA dials from its
/// own): `<svc>.<ns>.svc[.cluster.local]`. Returns (svc, ns).
fn qualified_service(host: &str) -> Option<(&str, &str)> {
    let labels: Vec<&str> = host.split('.').collect();
    match labels[..] {
        [svc, ns, "svc"] | [svc, ns, "svc", "cluster", "local"] => Some((svc, ns)),
        _ => None,
    }
}

fn service_has_port(svc: &Value, port: i64) -> bool {
    svc["spec"]["ports"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["port"].as_i64() == Some(port)))
}

fn check_scaler_addresses(r: &Render, pre: &Prerequisites) -> Vec<String> {
    let mut problems = Vec::new();
    for so in r.of_kind("ScaledObject").chain(r.of_kind("ScaledJob")) {
        for t in so["spec"]["triggers"].as_array().into_iter().flatten() {
            for key in [
                "scalerAddress",
                "serverAddress",
                "bootstrapServers",
                "natsServerMonitoringEndpoint",
            ] {
                let Some(addr) = t["metadata"][key].as_str() else {
                    continue;
                };
                let host = host_of(addr);
                match qualified_service(host) {
                    None => problems.push(format!(
                        "{} {key} {addr}: not <svc>.<ns>.svc[.cluster.local]:<port>; KEDA resolves it from its own namespace",
                        id(so)
                    )),
                    Some((svc, ns)) if ns == r.namespace => match r.get("Service", svc) {
                        None => problems.push(format!("{} {key} {addr}: no Service {svc} in the render", id(so))),
                        Some(s) if !port_of(addr).is_some_and(|p| service_has_port(s, p)) => {
                            problems.push(format!("{} {key} {addr}: Service {svc} has no such port", id(so)))
                        }
                        Some(_) => {}
                    },
                    Some((svc, ns)) => {
                        if SCALERS_OF_THIS_RENDER.contains(&svc) {
                            problems.push(format!(
                                "{} {key} {addr}: names namespace {ns}, the render's is {}",
                                id(so),
                                r.namespace
                            ));
                        } else if !pre.services.contains(&format!("{svc}.{ns}.svc")) {
                            problems.push(pre.missing(&id(so), &format!("Service {svc}.{ns}.svc")));
                        }
                    }
                }
            }
        }
    }
    problems
}

/// Services of this render that scalers dial: an address naming one of them in another
/// namespace is a stale namespace, not an outside dependency.
const SCALERS_OF_THIS_RENDER: [&str; 2] = ["lattice-grpc", "lattice"];

/// Pod templates of the render: (workload id, labels, pod spec).
fn pod_templates(r: &Render) -> Vec<(String, serde_json::Map<String, Value>, &Value)> {
    r.docs
        .iter()
        .filter(|d| ["Deployment", "StatefulSet", "DaemonSet", "Job"].contains(&d["kind"].as_str().unwrap_or("")))
        .map(|d| {
            let t = &d["spec"]["template"];
            let labels = t["metadata"]["labels"].as_object().cloned().unwrap_or_default();
            (id(d), labels, &t["spec"])
        })
        .collect()
}

fn selects(selector: &serde_json::Map<String, Value>, labels: &serde_json::Map<String, Value>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn check_destination_rules(r: &Render) -> Vec<String> {
    let mut problems = Vec::new();
    let pods = pod_templates(r);
    for dr in r.of_kind("DestinationRule") {
        let host = dr["spec"]["host"].as_str().unwrap_or("");
        let svc_name = host.split('.').next().unwrap_or("");
        let Some(svc) = r.get("Service", svc_name) else {
            problems.push(format!("{}: host {host} is no Service of the render", id(dr)));
            continue;
        };
        let svc_selector = svc["spec"]["selector"].as_object().cloned().unwrap_or_default();
        for subset in dr["spec"]["subsets"].as_array().into_iter().flatten() {
            let labels = subset["labels"].as_object().cloned().unwrap_or_default();
            let backed = pods
                .iter()
                .any(|(_, pod_labels, _)| selects(&svc_selector, pod_labels) && selects(&labels, pod_labels));
            if !backed {
                problems.push(format!(
                    "{}: subset {} selects no pod of Service {svc_name} in the render: its share of traffic gets 503s",
                    id(dr),
                    subset["name"]
                ));
            }
        }
    }
    problems
}

/// What the render may rely on without containing it (deploy/k8s/prerequisites.yaml).
struct Prerequisites {
    crds: BTreeSet<String>,
    apis: BTreeSet<String>,
    services: BTreeSet<String>,
    objects: BTreeSet<String>,
}

impl Prerequisites {
    fn load() -> Self {
        let text = std::fs::read_to_string(k8s_dir().join("prerequisites.yaml")).unwrap();
        let v: Value = serde_norway::from_str(&text).unwrap();
        let keys = |k: &str| -> BTreeSet<String> {
            v[k].as_object()
                .unwrap_or_else(|| panic!("prerequisites.yaml: {k} must be a map"))
                .keys()
                .cloned()
                .collect()
        };
        Self {
            crds: keys("crds"),
            apis: keys("apis"),
            services: keys("services"),
            objects: keys("objects"),
        }
    }

    fn missing(&self, by: &str, what: &str) -> String {
        format!("{by} references {what}, which is neither in the render nor listed in deploy/k8s/prerequisites.yaml")
    }
}

fn check_references(r: &Render, pre: &Prerequisites) -> Vec<String> {
    let mut problems = Vec::new();
    let need = |by: &str, kind: &str, name: &str| {
        (r.get(kind, name).is_none() && !pre.objects.contains(&format!("{kind}/{name}")))
            .then(|| pre.missing(by, &format!("{kind}/{name}")))
    };
    for (w, _, pod) in pod_templates(r) {
        if let Some(sa) = pod["serviceAccountName"].as_str() {
            problems.extend(need(&w, "ServiceAccount", sa));
        }
        for s in pod["imagePullSecrets"].as_array().into_iter().flatten() {
            problems.extend(need(&w, "Secret", s["name"].as_str().unwrap_or("")));
        }
        for v in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(c) = v["persistentVolumeClaim"]["claimName"].as_str() {
                problems.extend(need(&w, "PersistentVolumeClaim", c));
            }
            if let Some(c) = v["configMap"]["name"].as_str() {
                problems.extend(need(&w, "ConfigMap", c));
            }
            if let Some(s) = v["secret"]["secretName"].as_str() {
                problems.extend(need(&w, "Secret", s));
            }
        }
        let containers = pod["containers"].as_array().into_iter().flatten();
        let init = pod["initContainers"].as_array().into_iter().flatten();
        for c in containers.chain(init) {
            for e in c["envFrom"].as_array().into_iter().flatten() {
                if let Some(n) = e["configMapRef"]["name"].as_str() {
                    problems.extend(need(&w, "ConfigMap", n));
                }
                if let Some(n) = e["secretRef"]["name"].as_str() {
                    problems.extend(need(&w, "Secret", n));
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(n) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    problems.extend(need(&w, "ConfigMap", n));
                }
                if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    problems.extend(need(&w, "Secret", n));
                }
                // A URL naming a Service: a bare name or this namespace's must be in
                // the render, another namespace's a prerequisite.
                let Some(value) = e["value"].as_str() else { continue };
                if !value.contains("://") {
                    continue;
                }
                let host = host_of(value);
                let by = format!("{w} env {}", e["name"].as_str().unwrap_or(""));
                if !host.contains('.') {
                    problems.extend(need(&by, "Service", host));
                } else if let Some((svc, ns)) = qualified_service(host) {
                    if ns == r.namespace {
                        problems.extend(need(&by, "Service", svc));
                    } else if !pre.services.contains(&format!("{svc}.{ns}.svc")) {
                        problems.push(pre.missing(&by, &format!("Service {svc}.{ns}.svc")));
                    }
                }
            }
        }
    }
    for sts in r.of_kind("StatefulSet") {
        if let Some(s) = sts["spec"]["serviceName"].as_str() {
            problems.extend(need(&id(sts), "Service", s));
        }
    }
    for rb in r.of_kind("RoleBinding") {
        for s in rb["subjects"].as_array().into_iter().flatten() {
            if s["kind"] == "ServiceAccount" && s["namespace"].as_str().is_none_or(|ns| ns == r.namespace) {
                problems.extend(need(&id(rb), "ServiceAccount", s["name"].as_str().unwrap_or("")));
            }
        }
        if rb["roleRef"]["kind"] == "Role" {
            problems.extend(need(&id(rb), "Role", rb["roleRef"]["name"].as_str().unwrap_or("")));
        }
    }
    for d in &r.docs {
        let api = d["apiVersion"].as_str().unwrap_or("");
        if let Some((group, _)) = api
            .split_once('/')
            .filter(|(g, _)| g.contains('.') && !g.ends_with(".k8s.io"))
        {
            let crd = format!("{group}/{}", d["kind"].as_str().unwrap_or(""));
            if !pre.crds.contains(&crd) {
                problems.push(pre.missing(&id(d), &format!("CRD {crd}")));
            }
        }
    }
    for h in r.of_kind("HorizontalPodAutoscaler") {
        let custom = h["spec"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["type"] == "Pods" || m["type"] == "Object");
        if custom && !pre.apis.contains("custom.metrics.k8s.io") {
            problems.push(pre.missing(&id(h), "API custom.metrics.k8s.io"));
        }
    }
    problems
}

fn all_problems(r: &Render, crds: &CrdSchemas, pre: &Prerequisites) -> Vec<String> {
    let mut p = check_schemas(r, crds);
    p.extend(check_autoscalers(r));
    p.extend(check_scaler_addresses(r, pre));
    p.extend(check_destination_rules(r));
    p.extend(check_references(r, pre));
    p
}

#[test]
fn every_render_passes_the_cluster_checks() {
    let kubectl = kubectl();
    let crds = CrdSchemas::load();
    let pre = Prerequisites::load();
    let renders = all_renders(&kubectl);
    let mut failures = Vec::new();
    let mut kinds = BTreeSet::new();
    for r in &renders {
        for p in all_problems(r, &crds, &pre) {
            failures.push(format!("{}: {p}", r.name));
        }
        kinds.extend(r.docs.iter().map(|d| d["kind"].as_str().unwrap().to_string()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The checks above had something to look at.
    for k in [
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "VirtualService",
        "DestinationRule",
        "StatefulSet",
        "PersistentVolumeClaim",
        "Namespace",
    ] {
        assert!(kinds.contains(k), "no render holds a {k}");
    }
    let production = renders.iter().find(|r| r.name == "overlay production").unwrap();
    assert_eq!(production.namespace, "lattice");
    assert_eq!(autoscalers(production).len(), 2, "the server's and the consumers'");
}

/// Each check fails on the mistake it exists for: the checks are not vacuous.
#[test]
fn the_checks_catch_the_known_mistakes() {
    let kubectl = kubectl();
    let crds = CrdSchemas::load();
    let pre = Prerequisites::load();
    let problems = |components: &[&str], replacement: bool| {
        let r = render_components(&kubectl, "lattice-test", components, replacement).unwrap();
        all_problems(&r, &crds, &pre).join("\n")
    };
    let has = |p: &str, needle: &str| assert!(p.contains(needle), "expected {needle:?} in:\n{p}");

    // Two autoscalers on one workload.
    let p = problems(&["redis", "hpa", "keda-prometheus", "canary"], false);
    has(
        &p,
        "Deployment/lattice is scaled by HorizontalPodAutoscaler/lattice and ScaledObject/lattice-prometheus",
    );
    let p = problems(&["redis", "queue-jetstream", "queue-kafka"], false);
    has(&p, "Deployment/lattice-consume is scaled by");
    // The scaler address without the overlay's namespace.
    let p = problems(&["redis", "keda-external"], false);
    has(&p, "names namespace lattice, the render's is lattice-test");
    // No Redis and not listed as a prerequisite.
    let p = problems(&["hpa"], false);
    has(
        &p,
        "Deployment/lattice env LATTICE_MEMORY_STORE references Service/redis",
    );

    // A canary subset without canary pods, a bare scaler address, replicas under an
    // autoscaler, an unknown field in a core kind and in a CRD kind.
    let mut r = render_components(&kubectl, "lattice-test", &["redis", "keda-external", "canary"], true).unwrap();
    assert!(all_problems(&r, &crds, &pre).is_empty());
    r.docs.retain(|d| d["metadata"]["name"] != "lattice-canary");
    for d in &mut r.docs {
        match id(d).as_str() {
            "ScaledObject/lattice-external" => {
                d["spec"]["triggers"][0]["metadata"]["scalerAddress"] = json!("lattice-grpc:8001");
                d["spec"]["minReplicas"] = json!(1);
            }
            "VirtualService/lattice" => d["spec"]["http"][0]["route"][0]["destination"]["subnet"] = json!("canary"),
            "Deployment/lattice" => {
                d["spec"]["replicas"] = json!(3);
                d["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = json!({});
            }
            _ => {}
        }
    }
    let p = all_problems(&r, &crds, &pre).join("\n");
    has(&p, "subset \"canary\" selects no pod");
    has(&p, "scalerAddress lattice-grpc:8001: not <svc>.<ns>.svc");
    has(
        &p,
        "Deployment/lattice sets spec.replicas though ScaledObject/lattice-external owns it",
    );
    has(
        &p,
        "Deployment/lattice: field .spec.template.spec.containers[0].readinesProbe is not in the schema",
    );
    has(
        &p,
        "ScaledObject/lattice-external: Additional properties are not allowed ('minReplicas' was unexpected)",
    );
}

// ---------------------------------------------------------------------------
// Agreement with the binary

/// Names the metrics registry declares, plus the scrape-time series it exposes once
/// it serves a model.
fn registry_names() -> BTreeSet<String> {
    let m = Metrics::new();
    lattice_server::register_metric_sets(&m);
    let labels = ModelLabels {
        model_name: "m".into(),
        model_version: "1".into(),
    };
    let model = m.set::<ModelMetrics>();
    let rec = model.recorder(&labels);
    model.track_model(&rec, 1, Box::new(|| 0), vec![("x:mean".into(), vec![1.0])], 1, 1);
    // The recent-latency summary and the drift gauge need a sample.
    rec.observe_inference(Duration::from_millis(1), Some(0.9), ErrorType::None, None);
    rec.observe_features(&[1.0]);
    use lattice_server::replica_signals::{Load, ReplicaSignals, Snapshot};
    m.set::<ReplicaSignals>().read_from(Box::new(|| {
        Some(Snapshot {
            load: Load {
                in_flight: 0,
                queued: 0,
                capacity: 1,
            },
            qps: 0.0,
            queue_p95: Some(0.001),
            service: Some(0.001),
        })
    }));
    let mut names = lattice_observability::metrics::series_names(&m.encode());
    names.extend(m.declared_series().iter().cloned());
    names
}

fn env(container: &k8s_openapi::api::core::v1::Container, key: &str) -> Option<String> {
    container.env.as_ref()?.iter().find(|e| e.name == key)?.value.clone()
}

/// The serving pod (stable or canary): ports as the binary's flags say, probes on real
/// routes, drain inside the grace period, the pod-deletion-cost sidecar, a shared store.
/// Returns the container ports by name.
fn check_server(r: &Render, name: &str) -> BTreeMap<String, i32> {
    let d: Deployment = r.typed("Deployment", name);
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let ports: BTreeMap<String, i32> = c
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    for (port, flag, default) in [
        ("http", "LATTICE_HTTP_PORT", 8000),
        ("grpc", "LATTICE_GRPC_PORT", 8001),
        ("metrics", "LATTICE_METRICS_PORT", 8002),
    ] {
        assert_eq!(ports[port], default, "{name}: {port} port is the binary's default");
        assert_eq!(env(c, flag).map(|v| v.parse::<i32>().unwrap()), Some(default), "{flag}");
    }
    for probe in [&c.startup_probe, &c.readiness_probe] {
        let path = probe.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert_eq!(path, "/v2/health/ready");
    }
    let live = c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(live.path.as_deref(), Some("/v2/health/live"));
    let grace = pod.termination_grace_period_seconds.unwrap();
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    let pre_stop: i64 = pre_stop.exec.as_ref().unwrap().command.as_ref().unwrap()[1]
        .parse()
        .unwrap();
    let drain: i64 = env(c, "LATTICE_DRAIN_TIMEOUT_SECS").unwrap().parse().unwrap();
    assert!(
        grace > pre_stop + drain,
        "{name}: grace {grace} > preStop {pre_stop} + drain {drain}"
    );
    // The pod-deletion-cost patcher goes through the sidecar, with RBAC to patch pods.
    assert_eq!(env(c, "LATTICE_POD_DELETION_COST").as_deref(), Some("on"));
    let proxy_port = env(c, "LATTICE_KUBE_API").unwrap();
    let sidecar = pod
        .containers
        .iter()
        .find(|c| c.name == "kubectl-proxy")
        .expect("kubectl-proxy sidecar");
    assert!(sidecar
        .args
        .as_ref()
        .unwrap()
        .iter()
        .any(|a| proxy_port.ends_with(a.trim_start_matches("--port="))));
    // Several replicas: the agent store must be the shared one, not a pod-local file.
    let store: lattice_agent::store::StoreUrl = env(c, "LATTICE_MEMORY_STORE").unwrap().parse().unwrap();
    assert!(matches!(store, lattice_agent::store::StoreUrl::Redis(_)), "{store:?}");
    ports
}

fn check_agrees_with_binary(r: &Render, names: &BTreeSet<String>) {
    let ports = check_server(r, "lattice");
    if r.get("Deployment", "lattice-canary").is_some() {
        assert_eq!(
            check_server(r, "lattice-canary"),
            ports,
            "the canary serves as stable does"
        );
    }
    let role: k8s_openapi::api::rbac::v1::Role = r.typed("Role", "lattice-pod-deletion-cost");
    let rule = &role.rules.as_ref().unwrap()[0];
    assert!(rule.resources.as_ref().unwrap().contains(&"pods".to_string()));
    assert!(rule.verbs.contains(&"patch".to_string()));

    // gRPC is headless and on the gRPC port.
    let grpc: Service = r.typed("Service", "lattice-grpc");
    let spec = grpc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.ports.unwrap()[0].port, ports["grpc"]);
    let _: Service = r.typed("Service", "lattice");
    let pdb: PodDisruptionBudget = r.typed("PodDisruptionBudget", "lattice");
    assert!(pdb.spec.unwrap().min_available.is_some());

    // The HPA reads series the registry declares, through the adapter's rules.
    if r.get("HorizontalPodAutoscaler", "lattice").is_some() {
        let hpa: HorizontalPodAutoscaler = r.typed("HorizontalPodAutoscaler", "lattice");
        let hspec = hpa.spec.unwrap();
        assert!(hspec.max_replicas > hspec.min_replicas.unwrap());
        let behavior = hspec.behavior.unwrap();
        assert_eq!(behavior.scale_up.unwrap().stabilization_window_seconds, Some(0));
        assert!(behavior.scale_down.unwrap().stabilization_window_seconds.unwrap() >= 300);
        let adapter: ConfigMap = r.typed("ConfigMap", "prometheus-adapter-lattice");
        let rules: Value = serde_norway::from_str(&adapter.data.unwrap()["config.yaml"]).unwrap();
        let exposed: BTreeSet<String> = rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| {
                let series = rule["seriesQuery"].as_str().unwrap().split('{').next().unwrap();
                assert!(names.contains(series), "adapter rule reads undeclared {series}");
                rule["name"]["as"].as_str().unwrap().to_string()
            })
            .collect();
        for m in hspec.metrics.unwrap() {
            let name = m.pods.expect("per-pod custom metrics").metric.name;
            assert!(names.contains(&name), "HPA reads undeclared {name}");
            assert!(exposed.contains(&name), "no adapter rule exposes {name}");
        }
    }

    // KEDA: the external scaler is this binary's gRPC port on the headless Service.
    if let Some(ext) = r.get("ScaledObject", "lattice-external") {
        let trigger = &ext["spec"]["triggers"][0];
        assert!(["external", "external-push"].contains(&trigger["type"].as_str().unwrap()));
        let addr = trigger["metadata"]["scalerAddress"].as_str().unwrap();
        assert_eq!(
            addr,
            format!("lattice-grpc.{}.svc.cluster.local:{}", r.namespace, ports["grpc"])
        );
        for key in trigger["metadata"].as_object().unwrap().keys() {
            assert!(
                [
                    "scalerAddress",
                    "policy",
                    "model",
                    "targetPerReplica",
                    "activationThreshold"
                ]
                .contains(&key.as_str()),
                "unknown scaler metadata {key}"
            );
        }
        if let Some(policy) = trigger["metadata"]["policy"].as_str() {
            assert!(["predictive", "demand"].contains(&policy), "scaler policy {policy}");
        }
    }
    if let Some(prom) = r.get("ScaledObject", "lattice-prometheus") {
        let query = prom["spec"]["triggers"][0]["metadata"]["query"].as_str().unwrap();
        let used: Vec<&str> = query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("ai_") || t.starts_with("inference_"))
            .collect();
        assert!(!used.is_empty());
        for n in used {
            assert!(names.contains(n), "ScaledObject query reads undeclared {n}");
        }
    }
    let consume: Deployment = r.typed("Deployment", "lattice-consume");
    let cpod = consume.spec.unwrap().template.spec.unwrap();
    let ack_wait: i64 = env(&cpod.containers[0], "LATTICE_ACK_WAIT_SECS")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cpod.termination_grace_period_seconds.unwrap() > ack_wait);
    if let Some(js) = r.get("ScaledObject", "lattice-consume") {
        assert_eq!(js["spec"]["triggers"][0]["type"], "nats-jetstream");
        assert_eq!(
            js["spec"]["triggers"][0]["metadata"]["stream"].as_str(),
            env(&cpod.containers[0], "LATTICE_JOBS_STREAM").as_deref()
        );
        assert_eq!(
            js["spec"]["triggers"][0]["metadata"]["consumer"].as_str(),
            env(&cpod.containers[0], "LATTICE_DURABLE").as_deref()
        );
    }
    if let Some(kafka) = r.get("ScaledObject", "lattice-consume-kafka") {
        assert_eq!(kafka["spec"]["triggers"][0]["type"], "kafka");
        assert_eq!(
            kafka["spec"]["triggers"][0]["metadata"]["consumerGroup"].as_str(),
            env(&cpod.containers[0], "LATTICE_DURABLE").as_deref()
        );
    }

    // Canary routing targets subsets the DestinationRule defines, weights sum to 100.
    if let (Some(vs), Some(dr)) = (r.get("VirtualService", "lattice"), r.get("DestinationRule", "lattice")) {
        let subsets: BTreeSet<&str> = dr["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        let weighted = vs["spec"]["http"][1]["route"].as_array().unwrap();
        assert_eq!(weighted.iter().map(|w| w["weight"].as_i64().unwrap()).sum::<i64>(), 100);
        for route in vs["spec"]["http"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| h["route"].as_array().unwrap())
        {
            assert!(subsets.contains(route["destination"]["subset"].as_str().unwrap()));
        }
    }
}

#[test]
fn every_render_agrees_with_the_binary() {
    let kubectl = kubectl();
    let names = registry_names();
    for r in all_renders(&kubectl) {
        check_agrees_with_binary(&r, &names);
    }
}
