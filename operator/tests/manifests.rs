//! The generated files stay true to the code: the CRD in manifests/ and in
//! the Helm chart is what the operator's types generate, and the chart
//! renders exactly the install bundle in manifests/. There is no helm
//! binary here, so the chart's templates keep to a small subset of Helm's
//! language (values, release and chart fields, `default`, `toJson`, and
//! whole-line `if`/`end`), which this test renders; a construct outside it
//! fails the test.
//!
//! `SHOAL_UPDATE_MANIFESTS=1 cargo test -p shoal-operator --test manifests`
//! rewrites the generated files.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use shoal_operator::crd::StorageCluster;

const NAMESPACE: &str = "shoal-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn updating() -> bool {
    std::env::var_os("SHOAL_UPDATE_MANIFESTS").is_some()
}

/// Compares a generated file with its source of truth (or rewrites it).
fn check_generated(path: &str, expected: &str) {
    if updating() {
        std::fs::write(root().join(path), expected).unwrap();
    }
    assert!(
        read(path) == expected,
        "{path} is stale: run `make manifests` (SHOAL_UPDATE_MANIFESTS=1 cargo test -p shoal-operator --test manifests)"
    );
}

/// Looks a dotted path (`.Values.image.tag`) up in the template context.
fn lookup(context: &Value, path: &str) -> Value {
    let mut v = context;
    for part in path.trim_start_matches('.').split('.') {
        v = v
            .get(part)
            .unwrap_or_else(|| panic!("template refers to missing {path}"));
    }
    v.clone()
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
        && v.as_str() != Some("")
        && v.as_i64() != Some(0)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One `{{ … }}` expression.
fn eval(expr: &str, context: &Value) -> String {
    let expr = expr.trim();
    if let Some((value, fallback)) = expr.split_once("| default") {
        let v = lookup(context, value.trim());
        return if truthy(&v) {
            show(&v)
        } else {
            show(&lookup(context, fallback.trim()))
        };
    }
    if let Some(path) = expr.strip_prefix("toJson ") {
        return lookup(context, path.trim()).to_string();
    }
    assert!(
        expr.starts_with('.') && !expr.contains(' '),
        "unsupported template expression {expr:?}"
    );
    show(&lookup(context, expr))
}

/// Renders a template in the subset described at the top.
fn render(template: &str, context: &Value) -> String {
    let mut out = String::new();
    let mut shown = vec![true];
    for line in template.lines() {
        let t = line.trim();
        if let Some(cond) = t.strip_prefix("{{- if ").and_then(|c| c.strip_suffix("}}")) {
            let on = *shown.last().unwrap() && truthy(&lookup(context, cond.trim()));
            shown.push(on);
            continue;
        }
        if t == "{{- end }}" {
            shown.pop();
            assert!(!shown.is_empty(), "unbalanced {{{{- end }}}}");
            continue;
        }
        if !*shown.last().unwrap() {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").expect("unclosed {{") + start;
            out.push_str(&eval(&rest[start + 2..end], context));
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    assert_eq!(shown.len(), 1, "unclosed {{{{- if }}}}");
    out
}

fn context(values: Value) -> Value {
    let chart: Value = serde_saphyr::from_str(&read("charts/shoal/Chart.yaml")).unwrap();
    json!({
        "Values": values,
        "Release": {"Name": "shoal", "Namespace": NAMESPACE},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
    })
}

fn default_values() -> Value {
    serde_saphyr::from_str(&read("charts/shoal/values.yaml")).unwrap()
}

/// The chart's templates rendered in name order, as YAML documents.
fn render_chart(values: Value) -> Vec<String> {
    let context = context(values);
    let mut templates: Vec<PathBuf> = std::fs::read_dir(root().join("charts/shoal/templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    templates.sort();
    templates
        .iter()
        .flat_map(|p| {
            let rendered = render(&std::fs::read_to_string(p).unwrap(), &context);
            rendered
                .split("\n---\n")
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn parse_all(docs: &[String]) -> Vec<Value> {
    docs.iter()
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

#[test]
fn the_crd_files_are_what_the_types_generate() {
    let crd = shoal_operator::crd_yaml();
    check_generated("manifests/crd.yaml", &crd);
    check_generated("charts/shoal/crds/storagecluster.yaml", &crd);
    let parsed: Value = serde_saphyr::from_str(&crd).unwrap();
    assert_eq!(parsed["spec"]["group"], "shoal.io");
    assert_eq!(parsed["spec"]["names"]["shortNames"][0], "shoal");
    let version = &parsed["spec"]["versions"][0];
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Replication",
            "Failure domain",
            "Ready",
            "Capacity",
            "Used",
            "Phase",
            "Age"
        ]
    );
    let replication =
        &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["replication"];
    assert_eq!(
        (
            replication["minimum"].as_f64(),
            replication["maximum"].as_f64()
        ),
        (Some(1.0), Some(7.0))
    );
}

#[test]
fn the_chart_renders_the_install_bundle() {
    let namespace = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    app.kubernetes.io/name: shoal"
    );
    let mut docs = vec![namespace];
    docs.extend(render_chart(default_values()));
    let bundle = format!(
        "# Generated from charts/shoal with its default values (see operator/tests/manifests.rs).\n{}\n",
        docs.join("\n---\n")
    );
    check_generated("manifests/install.yaml", &bundle);
    let parsed = parse_all(&docs);
    let kinds: Vec<&str> = parsed.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "Deployment",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding"
        ]
    );
    let image = parsed[1]["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert_eq!(image, "ghcr.io/shoal-storage/shoal-operator:0.1.0");
}

#[test]
fn the_chart_can_make_a_valid_storage_cluster() {
    let mut values = default_values();
    values["storageCluster"]["create"] = json!(true);
    values["storageCluster"]["replication"] = json!(2);
    values["storageCluster"]["failureDomain"] = json!("rack");
    values["image"]["tag"] = json!("v9");
    let docs = parse_all(&render_chart(values));
    let sc = docs.iter().find(|d| d["kind"] == "StorageCluster").unwrap();
    let sc: StorageCluster = serde_json::from_value(sc.clone()).unwrap();
    assert_eq!(sc.spec.replication, 2);
    assert_eq!(sc.spec.placement.failure_domain.as_str(), "rack");
    assert_eq!(sc.metadata.namespace.as_deref(), Some(NAMESPACE));
    let image = docs[0]["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert_eq!(image, "ghcr.io/shoal-storage/shoal-operator:v9");
}

#[test]
fn values_follow_their_schema() {
    let schema: Value = serde_json::from_str(&read("charts/shoal/values.schema.json")).unwrap();
    let values = default_values();
    let allowed: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    for key in values.as_object().unwrap().keys() {
        assert!(
            allowed.contains(&key),
            "values.yaml key {key} is not in the schema"
        );
    }
    for key in schema["required"].as_array().unwrap() {
        assert!(
            values.get(key.as_str().unwrap()).is_some(),
            "values.yaml lacks {key}"
        );
    }
}

#[test]
fn the_examples_parse() {
    for entry in std::fs::read_dir(root().join("manifests/examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!docs.is_empty());
        for doc in docs {
            if doc["kind"] == "StorageCluster" {
                let sc: StorageCluster = serde_json::from_value(doc).unwrap();
                assert_eq!(sc.spec.replication, 3);
                assert_eq!(sc.spec.storage_classes.len(), 2);
            }
        }
    }
}
