//! The real control plane that `make test` (or `eval "$(make -s env-up)"`) starts: a client for
//! it, the DbPool CRD installed once, a fresh namespace per test, and small helpers (Secrets,
//! `kubectl`, applying YAML).
//!
//! The kubeconfig comes from `DBPOOL_TEST_KUBECONFIG` (which `make test` exports), else from
//! `KUBECONFIG` when that is the environment's; the tests never guess a cluster.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dbpool_api::DbPool;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, CustomResourceExt, ResourceExt,
    api::{DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{GroupVersionKind, TypeMeta},
    discovery,
};

use crate::wait::wait_for;

/// Field manager of every server-side apply the tests make.
pub const FIELD_MANAGER: &str = "dbpool-tests";
/// Label on every namespace a test creates.
pub const TEST_LABEL: &str = "dbpool.io/test";
/// How long the CRD may take to become Established (and served).
pub const CRD_DEADLINE: Duration = Duration::from_secs(60);

/// The context name hack/env.sh writes into its kubeconfig.
pub const ENV_CONTEXT: &str = "dbpool-env";

/// Path of the kubeconfig of the test control plane; panics with instructions when none is set.
///
/// `DBPOOL_TEST_KUBECONFIG` is used as given. A plain `KUBECONFIG` is used only when its current
/// context is the one hack/env.sh writes, so that tests never create namespaces in whatever
/// cluster a person's shell happens to point at.
pub fn kubeconfig_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("DBPOOL_TEST_KUBECONFIG").filter(|v| !v.is_empty()) {
            return PathBuf::from(path);
        }
        let Some(path) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) else {
            panic!(
                "no control plane: KUBECONFIG is not set. These tests need the real \
                 kube-apiserver that `make test` starts; to run them by hand, start one with \
                 `eval \"$(make -s env-up)\"` and run cargo test in that shell (stop it with \
                 `make env-down`)"
            );
        };
        let path = PathBuf::from(path);
        let context = Kubeconfig::read_from(&path)
            .ok()
            .and_then(|k| k.current_context);
        assert!(
            context.as_deref() == Some(ENV_CONTEXT),
            "KUBECONFIG={} has current context {context:?}, not the test environment's \
             {ENV_CONTEXT:?}: run `eval \"$(make -s env-up)\"` first (or set \
             DBPOOL_TEST_KUBECONFIG to use this cluster deliberately)",
            path.display()
        );
        path
    })
    .clone()
}

/// A client for the test control plane.
pub async fn client() -> Client {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read kubeconfig {}: {e}; is the environment up? (`make env-up`)",
            path.display()
        )
    });
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {}: {e}", path.display()));
    Client::try_from(config).expect("kube client")
}

static CRD_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Server-side applies the DbPool CRD (the same object as crds/dbpool.yaml, which a unit test
/// keeps in step) and waits until it is Established. Idempotent, and safe to call from many tests
/// and test binaries at once: the apply is forced under one field manager, and a conflict from a
/// concurrent writer is retried.
pub async fn install_crd(client: &Client) {
    if CRD_INSTALLED.load(Ordering::Acquire) {
        return;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DbPool::crd();
    let name = crd.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    wait_for("the DbPool CRD to be applied", CRD_DEADLINE, || {
        let (crds, crd, name, params) = (&crds, &crd, &name, &params);
        async move {
            match crds.patch(name, params, &Patch::Apply(crd)).await {
                Ok(_) => Some(()),
                Err(kube::Error::Api(status)) if status.code == 409 || status.code >= 500 => None,
                Err(e) => panic!("applying CRD {name}: {e}"),
            }
        }
    })
    .await;
    wait_for("the DbPool CRD to be Established", CRD_DEADLINE, || {
        let (crds, name) = (&crds, &name);
        async move {
            let crd = crds.get(name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;
    // Established means served; make sure this client sees the resource too before returning.
    let pools: Api<DbPool> = Api::all(client.clone());
    wait_for("DbPools to be listable", CRD_DEADLINE, || {
        let pools = &pools;
        async move { pools.list(&Default::default()).await.ok().map(|_| ()) }
    })
    .await;
    CRD_INSTALLED.store(true, Ordering::Release);
}

/// A namespace name no other test (in this or another process) uses: `<prefix>-<unique>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let prefix = prefix.trim_matches('-');
    let prefix = if prefix.is_empty() { "t" } else { prefix };
    format!(
        "{prefix}-{:x}{:x}{:05x}",
        std::process::id(),
        n,
        nanos & 0xfffff
    )
}

/// A fresh namespace for one test. Dropping it deletes the namespace in the background (through
/// `kubectl`, so the deletion does not depend on the test's runtime still running); there is no
/// kube-controller-manager, so it stays Terminating until the environment goes down, which is
/// harmless. Call [`TestNamespace::cleanup`] to delete it and wait for the API to accept that.
pub struct TestNamespace {
    name: String,
    client: Client,
    deleted: bool,
}

impl TestNamespace {
    /// Creates a namespace named after the running test (libtest names each test's thread after
    /// it) plus a unique suffix, labelled `dbpool.io/test=true`.
    pub async fn new(client: &Client) -> Self {
        let thread = std::thread::current();
        let test = thread
            .name()
            .and_then(|n| n.rsplit("::").next())
            .filter(|n| *n != "main")
            .unwrap_or("test");
        let prefix: String = test.chars().take(40).collect();
        Self::with_prefix(client, &prefix).await
    }

    /// Creates a namespace called `<prefix>-<unique suffix>`, labelled `dbpool.io/test=true`.
    pub async fn with_prefix(client: &Client, prefix: &str) -> Self {
        let name = unique_name(prefix);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(TEST_LABEL.to_owned(), "true".to_owned())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        Self {
            name,
            client: client.clone(),
            deleted: false,
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A typed API for resources in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace now and waits until the API server has accepted the deletion.
    pub async fn cleanup(mut self) {
        self.deleted = true;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        match namespaces
            .delete(&self.name, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => panic!("deleting namespace {}: {e}", self.name),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Fire and forget: the child outlives the test process if need be. The DbPools go
        // first and explicitly: without kube-controller-manager (the tests run none) a deleted
        // namespace stays Terminating with everything in it, and a cluster-wide operator of a
        // later test would reconcile every DbPool an earlier test left there.
        let script = format!(
            "kubectl delete dbpools --all -n {ns} --wait=false --ignore-not-found; \
             kubectl delete namespace {ns} --wait=false --ignore-not-found",
            ns = self.name
        );
        let _ = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("KUBECONFIG", kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

/// The usual start of an end-to-end test: a client of the test control plane, the CRD installed,
/// a fresh namespace, and in it a Secret `secret` holding `key: value` that consents to host
/// 127.0.0.1 (where every test database listens).
pub async fn namespace_with_secret(
    secret: &str,
    key: &str,
    value: &str,
) -> (Client, TestNamespace) {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    create_consenting_secret(&client, ns.name(), secret, key, value, &["127.0.0.1"]).await;
    (client, ns)
}

/// Creates an Opaque Secret `name` in `ns` holding `key: value` that consents to being used by
/// DbPools whose host is one of `hosts`: the label `dbpool.io/credentials: "true"` and the
/// annotation `dbpool.io/allowed-hosts`. Every test, the demo and the benchmark create their
/// Secrets with this.
pub async fn create_consenting_secret(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
    value: &str,
    hosts: &[&str],
) -> Secret {
    let metadata = ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(BTreeMap::from([(
            dbpool_api::CREDENTIALS_LABEL.to_owned(),
            "true".to_owned(),
        )])),
        annotations: Some(BTreeMap::from([(
            dbpool_api::ALLOWED_HOSTS_ANNOTATION.to_owned(),
            hosts.join(","),
        )])),
        ..ObjectMeta::default()
    };
    create_secret_with(client, ns, metadata, key, value).await
}

/// Creates an Opaque Secret `name` in `ns` holding `key: value` *without* consent (no label, no
/// annotation): for tests that prove such a Secret is never read.
pub async fn create_secret_without_consent(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
    value: &str,
) -> Secret {
    let metadata = ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    };
    create_secret_with(client, ns, metadata, key, value).await
}

async fn create_secret_with(
    client: &Client,
    ns: &str,
    metadata: ObjectMeta,
    key: &str,
    value: &str,
) -> Secret {
    let name = metadata.name.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata,
        string_data: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("creating Secret {ns}/{name}: {e}"))
}

/// Runs `kubectl ARGS` (the kubectl on PATH, which the environment puts first and which matches
/// the apiserver's version) against the test control plane and returns what it did.
pub async fn kubectl<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    tokio::process::Command::new("kubectl")
        .args(&args)
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl {args:?}: {e}; the environment puts the matching kubectl \
                 first on PATH (`make test`, or `eval \"$(make -s env-up)\"`)"
            )
        })
}

/// Like [`kubectl`], and panics with its output unless it succeeded; returns its stdout.
pub async fn kubectl_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = kubectl(&args).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl printed UTF-8")
}

/// Server-side applies every document of a (multi-document) YAML text, namespaced ones into `ns`,
/// and returns the objects as stored. Kinds are resolved through discovery, so CRDs work once
/// established.
pub async fn apply_yaml(client: &Client, ns: &str, yaml: &str) -> Vec<DynamicObject> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("parsing YAML: {e}"));
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let object: DynamicObject =
            serde_json::from_value(doc).unwrap_or_else(|e| panic!("not a Kubernetes object: {e}"));
        let types: &TypeMeta = object
            .types
            .as_ref()
            .expect("every document has apiVersion and kind");
        let gvk = GroupVersionKind::try_from(types).expect("valid apiVersion");
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("discovering {gvk:?}: {e}"));
        let api: Api<DynamicObject> = if caps.scope == discovery::Scope::Namespaced {
            Api::namespaced_with(client.clone(), ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        let name = object.name_any();
        let stored = api
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", gvk.kind));
        applied.push(stored);
    }
    applied
}
