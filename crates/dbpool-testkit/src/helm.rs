//! The Helm chart and the kustomize base as tests see them: running `helm` (the pinned v3 that
//! hack/build-helm.sh builds; `make test` puts it first on PATH), rendering the chart, parsing
//! multi-document YAML into JSON values, and piping manifests into `kubectl`.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::OnceLock,
};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::kube::kubeconfig_path;

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    // This crate lives in crates/dbpool-testkit of the workspace.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/dbpool-operator")
}

/// The kustomize base.
pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The `helm` binary: the one on PATH when it is Helm 3 (what `make test` arranges), else the
/// one hack/build-helm.sh builds (at once when cached; minutes on a machine that never built it).
pub fn helm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(helm) = on_path("helm") {
            let version = std::process::Command::new(&helm)
                .args(["version", "--short"])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            if version.starts_with("v3.") {
                return helm;
            }
        }
        let script = repo_root().join("hack/build-helm.sh");
        let out = std::process::Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}); `make test` builds helm before the tests",
            script.display(),
            out.status
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("helm")
    })
    .clone()
}

fn describe(what: &str, args: &[OsString], out: &Output) -> String {
    format!(
        "{what} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn collect<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Runs `helm ARGS` (no cluster access: helm gets no kubeconfig of a real cluster).
pub async fn helm<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = collect(args);
    tokio::process::Command::new(helm_bin())
        .args(&args)
        .env("KUBECONFIG", "/dev/null")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run helm {args:?}: {e}"))
}

/// Like [`helm`], and panics with its output unless it succeeded; returns stdout.
pub async fn helm_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = collect(args);
    let out = helm(&args).await;
    assert!(out.status.success(), "{}", describe("helm", &args, &out));
    String::from_utf8(out.stdout).expect("helm printed UTF-8")
}

/// `helm template RELEASE <chart> --namespace NAMESPACE EXTRA...`: the rendered manifests.
pub async fn template(release: &str, namespace: &str, extra: &[&str]) -> String {
    let chart = chart_dir();
    let mut args: Vec<OsString> = vec![
        "template".into(),
        release.into(),
        chart.into_os_string(),
        "--namespace".into(),
        namespace.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    helm_ok(args).await
}

/// Runs `kubectl ARGS` against the test control plane with `input` on stdin.
pub async fn kubectl_stdin<I, S>(args: I, input: &str) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = collect(args);
    let mut child = tokio::process::Command::new("kubectl")
        .args(&args)
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kubectl {args:?}: {e}"));
    let mut stdin = child.stdin.take().expect("kubectl stdin");
    let input = input.to_owned();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
        let _ = stdin.shutdown().await;
    });
    let out = child
        .wait_with_output()
        .await
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
    let _ = writer.await;
    out
}

/// Like [`kubectl_stdin`], and panics with its output unless it succeeded; returns stdout.
pub async fn kubectl_stdin_ok<I, S>(args: I, input: &str) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = collect(args);
    let out = kubectl_stdin(&args, input).await;
    assert!(
        out.status.success(),
        "{}\ninput:\n{input}",
        describe("kubectl", &args, &out)
    );
    String::from_utf8(out.stdout).expect("kubectl printed UTF-8")
}

/// Every non-empty document of a multi-document YAML text.
pub fn parse_docs(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("parsing YAML: {e}"));
    docs.into_iter()
        .filter(|d| !d.is_null() && d.as_object().is_some_and(|o| !o.is_empty()))
        .collect()
}

/// Serializes objects back into one multi-document YAML text.
pub fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_saphyr::to_string(d).expect("serializable"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `kind/namespace/name` of an object (namespace empty when cluster-scoped or unset).
pub fn key(doc: &Value) -> String {
    let s = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or("");
    format!(
        "{}/{}/{}",
        s("/kind"),
        s("/metadata/namespace"),
        s("/metadata/name")
    )
}

/// Objects keyed by [`key`]; panics on duplicates.
pub fn by_key(docs: &[Value]) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for doc in docs {
        let k = key(doc);
        assert!(
            map.insert(k.clone(), doc.clone()).is_none(),
            "two objects {k}"
        );
    }
    map
}

/// The objects of kind `kind`.
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
        .collect()
}

/// The one object of kind `kind`; panics unless there is exactly one.
pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind}, found {}: {:?}",
        found.len(),
        found.iter().map(|d| key(d)).collect::<Vec<_>>()
    );
    found[0]
}

/// The sorted kinds of `docs`, one entry per object.
pub fn kinds(docs: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = docs
        .iter()
        .filter_map(|d| d.get("kind").and_then(Value::as_str).map(str::to_owned))
        .collect();
    kinds.sort();
    kinds
}

/// The `args` of the operator container of a rendered Deployment.
pub fn container_args(deployment: &Value) -> Vec<String> {
    deployment
        .pointer("/spec/template/spec/containers/0/args")
        .and_then(Value::as_array)
        .expect("the operator container has args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

/// The value of `--flag=value` among `args`.
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
}

/// A path from `from` (a directory) to `to`, relative, as kustomize wants for a base outside the
/// overlay's directory.
pub fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from = from.canonicalize().expect("existing directory");
    let to = to.canonicalize().expect("existing path");
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in from.components().skip(common) {
        rel.push("..");
    }
    for part in to.components().skip(common) {
        rel.push(part);
    }
    rel
}
