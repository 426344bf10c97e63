//! Talking to the cluster the way kubectl does.
//!
//! Lives here: the client built from `--kubeconfig` / `KUBECONFIG` / `~/.kube/config` (or the
//! in-cluster service account) with `--context`, the namespace (`-n`, else the context's), and
//! the few API calls the verbs make (get, list, annotate, events, SelfSubjectReview). Must not
//! live here: wording of output or findings (`render`, `diagnose`).

use std::{collections::BTreeMap, path::PathBuf};

use dbpool_api::DbPool;
use k8s_openapi::api::{authentication::v1::SelfSubjectReview, core::v1::Event};
use kube::{
    Api, Client, Config,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::Error;

/// The connection flags kubectl users expect.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Connection {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

/// A client and the namespace the verbs work in.
pub struct Cluster {
    /// The apiserver client.
    pub client: Client,
    /// The namespace from `-n` or the context.
    pub namespace: String,
}

impl Cluster {
    /// Connects as kubectl would with these flags.
    pub async fn connect(flags: &Connection) -> Result<Self, Error> {
        let options = KubeConfigOptions {
            context: flags.context.clone(),
            cluster: None,
            user: None,
        };
        let config = match &flags.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| Error::new(format!("reading {}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kubeconfig, &options).await?
            }
            None => match Config::from_kubeconfig(&options).await {
                Ok(config) => config,
                Err(err) if flags.context.is_none() => Config::incluster().map_err(|_| {
                    Error::new(format!(
                        "no kubeconfig ({err}) and not running in a cluster"
                    ))
                })?,
                Err(err) => return Err(err.into()),
            },
        };
        let namespace = flags
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)?;
        Ok(Self { client, namespace })
    }

    /// DbPools in the namespace, or in every namespace.
    pub fn pools(&self, all_namespaces: bool) -> Api<DbPool> {
        if all_namespaces {
            Api::all(self.client.clone())
        } else {
            Api::namespaced(self.client.clone(), &self.namespace)
        }
    }

    /// Pool `name` in the namespace, with a kubectl-like error if it does not exist.
    pub async fn pool(&self, name: &str) -> Result<DbPool, Error> {
        match self.pools(false).get(name).await {
            Ok(pool) => Ok(pool),
            Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::new(format!(
                "dbpool {name:?} not found in namespace {:?}",
                self.namespace
            ))),
            Err(err) => Err(err.into()),
        }
    }

    /// Sets (Some) or removes (None) annotations of pool `name` with a merge patch.
    pub async fn annotate(
        &self,
        name: &str,
        annotations: BTreeMap<&str, Option<String>>,
    ) -> Result<DbPool, Error> {
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        Ok(self
            .pools(false)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?)
    }

    /// The events about pool `name`, oldest first.
    pub async fn events(&self, name: &str) -> Result<Vec<Event>, Error> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("involvedObject.kind=DbPool,involvedObject.name={name}");
        let mut events = api
            .list(&ListParams::default().fields(&selector))
            .await?
            .items;
        events.sort_by_key(crate::render::event_time);
        Ok(events)
    }

    /// Who the credentials authenticate as (a SelfSubjectReview, authentication.k8s.io/v1).
    pub async fn whoami(&self) -> Result<String, Error> {
        let api: Api<SelfSubjectReview> = Api::all(self.client.clone());
        let review = api
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .map_err(|e| Error::new(format!("SelfSubjectReview (who am I?) failed: {e}")))?;
        review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::new("the SelfSubjectReview named no user".to_owned()))
    }
}
