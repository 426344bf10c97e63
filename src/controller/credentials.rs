//! Reading the Secrets a DbPool refers to, only when they consent, without reading them on every
//! probe.
//!
//! Lives here: the consent rule's enforcement (a Secret is read only if it carries the label
//! `dbpool.io/credentials: "true"` and names the pool's host in `dbpool.io/allowed-hosts`), and a
//! cache of the Secrets the pools use, keyed by Secret and invalidated by the Secret's
//! resourceVersion, which a metadata-only watch of consenting Secrets keeps current (so Secret data
//! is fetched once per change, not per probe, and no other Secret is ever read, listed or cached).
//! Cached values no pool refers to are evicted. Errors name the Secret and key to fix; they never
//! contain a Secret's data, and a missing Secret reads the same as one that does not consent.
//! Must not live here: the watch itself (`watches`) or what a failure does to the pool (`reconcile`).

use super::{
    api_permits::{ApiPermits, Priority},
    error::CredentialError,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::FutureExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};

use crate::{
    api::{DbPool, SecretKeyRef, secret_consents},
    probe::Password,
};

/// What the probe needs from Secrets, plus a fingerprint that changes when any of them changes.
pub struct Credentials {
    /// The password, when the spec names one.
    pub password: Option<Password>,
    /// The CA bundle, when the spec names one.
    pub ca_pem: Option<Vec<u8>>,
    /// resourceVersions of the Secrets used; a change means "probe again now".
    pub fingerprint: String,
}

#[derive(Clone)]
struct CachedSecret {
    resource_version: Option<String>,
    data: std::collections::BTreeMap<String, Vec<u8>>,
}

/// Secret reader with a resourceVersion-keyed cache.
pub struct SecretCache {
    client: Client,
    meta: Store<PartialObjectMeta<Secret>>,
    pools: Store<DbPool>,
    cache: Mutex<HashMap<(String, String), CachedSecret>>,
    api_permits: Arc<ApiPermits>,
}

impl SecretCache {
    /// A cache over `meta`, a reflector store fed by a metadata watch on consenting Secrets;
    /// `pools` (the DbPool store) says which cached values are still referenced. Reads from the
    /// apiserver take a permit of `api_permits`.
    pub fn new(
        client: Client,
        meta: Store<PartialObjectMeta<Secret>>,
        pools: Store<DbPool>,
        api_permits: Arc<ApiPermits>,
    ) -> Self {
        Self {
            client,
            meta,
            pools,
            cache: Mutex::new(HashMap::new()),
            api_permits,
        }
    }

    /// Reads the password and CA the spec refers to, for a pool connecting to `host`.
    pub async fn load(
        &self,
        namespace: &str,
        host: &str,
        password: Option<&SecretKeyRef>,
        ca: Option<&SecretKeyRef>,
    ) -> Result<Credentials, CredentialError> {
        let mut fingerprint = String::new();
        let password = match password {
            Some(r) => {
                let (bytes, rv) = self.key(namespace, host, r).await?;
                fingerprint.push_str(&rv);
                let text = String::from_utf8(bytes).map_err(|_| CredentialError::NotText {
                    name: r.name.clone(),
                    key: r.key.clone(),
                })?;
                Some(Password::new(text))
            }
            None => None,
        };
        let ca_pem = match ca {
            Some(r) => {
                let (bytes, rv) = self.key(namespace, host, r).await?;
                fingerprint.push('/');
                fingerprint.push_str(&rv);
                Some(bytes)
            }
            None => None,
        };
        Ok(Credentials {
            password,
            ca_pem,
            fingerprint,
        })
    }

    async fn key(
        &self,
        namespace: &str,
        host: &str,
        r: &SecretKeyRef,
    ) -> Result<(Vec<u8>, String), CredentialError> {
        let refused = || CredentialError::NotFoundOrNotOptedIn {
            namespace: namespace.to_owned(),
            name: r.name.clone(),
            key: r.key.clone(),
            host: host.to_owned(),
        };
        // Consent is judged on the watched metadata before anything is read: a Secret the watch
        // has not seen (missing, or without the label) is never fetched.
        let watched = ObjectRef::new(&r.name).within(namespace);
        let meta = match self.meta.get(&watched) {
            Some(meta) => meta,
            None => {
                // Before the watch's first list, absence proves nothing: say so (the reconcile
                // stops there, and the list's events trigger the pool again), so that a restart
                // neither reports present Secrets as missing nor takes their arrival for a
                // changed Secret. (Checked, not awaited: nothing blocks a reconcile.)
                if self.meta.wait_until_ready().now_or_never().is_none() {
                    return Err(CredentialError::NotSynced {
                        name: r.name.clone(),
                    });
                }
                return Err(refused());
            }
        };
        if !secret_consents(
            meta.metadata.labels.as_ref(),
            meta.metadata.annotations.as_ref(),
            host,
        ) {
            return Err(refused());
        }
        let watched_rv = meta.metadata.resource_version.clone();
        let secret = self
            .cached_or_fetched(namespace, host, r, watched_rv)
            .await?;
        let value =
            secret
                .data
                .get(&r.key)
                .cloned()
                .ok_or_else(|| CredentialError::KeyMissing {
                    namespace: namespace.to_owned(),
                    name: r.name.clone(),
                    key: r.key.clone(),
                })?;
        Ok((value, secret.resource_version.unwrap_or_default()))
    }

    /// The Secret's data at `watched_rv`: from the cache when it holds that version, else read
    /// once under an API permit (many pools may share this Secret: whoever waited for the permit
    /// finds it fetched).
    async fn cached_or_fetched(
        &self,
        namespace: &str,
        host: &str,
        r: &SecretKeyRef,
        watched_rv: Option<String>,
    ) -> Result<CachedSecret, CredentialError> {
        let id = (namespace.to_owned(), r.name.clone());
        let fresh = || {
            self.cache
                .lock()
                .ok()
                .and_then(|c| c.get(&id).cloned())
                .filter(|c| watched_rv.is_some() && c.resource_version == watched_rv)
        };
        if let Some(cached) = fresh() {
            return Ok(cached);
        }
        let _permit = self.api_permits.acquire(Priority::First, namespace).await;
        if let Some(cached) = fresh() {
            return Ok(cached);
        }
        let fetched = self.fetch(namespace, host, r).await?;
        self.insert(id.clone(), fetched.clone());
        Ok(fetched)
    }

    /// Caches `secret` under `id`, first evicting every value no pool refers to any more, so the
    /// cache never holds more than the pools' references.
    fn insert(&self, id: (String, String), secret: CachedSecret) {
        let referenced: std::collections::HashSet<(String, String)> = self
            .pools
            .state()
            .iter()
            .flat_map(|pool| {
                let ns = pool.metadata.namespace.clone().unwrap_or_default();
                let db = &pool.spec.database;
                [db.password_secret_ref.as_ref(), db.ca_secret_ref.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(move |r| (ns.clone(), r.name.clone()))
            })
            .collect();
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|key, _| referenced.contains(key));
            cache.insert(id, secret);
        }
    }

    async fn fetch(
        &self,
        namespace: &str,
        host: &str,
        r: &SecretKeyRef,
    ) -> Result<CachedSecret, CredentialError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let refused = || CredentialError::NotFoundOrNotOptedIn {
            namespace: namespace.to_owned(),
            name: r.name.clone(),
            key: r.key.clone(),
            host: host.to_owned(),
        };
        match api.get_opt(&r.name).await {
            // The object read is authoritative: consent withdrawn since the watch saw it counts.
            Ok(Some(secret))
                if !secret_consents(
                    secret.metadata.labels.as_ref(),
                    secret.metadata.annotations.as_ref(),
                    host,
                ) =>
            {
                Err(refused())
            }
            Ok(Some(secret)) => {
                // stringData is write-only: the apiserver merges it into data and never returns it.
                let data = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                Ok(CachedSecret {
                    resource_version: secret.metadata.resource_version,
                    data,
                })
            }
            Ok(None) => Err(refused()),
            Err(source) => Err(CredentialError::Api {
                name: r.name.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn pool(ns: &str, name: &str, secret: &str) -> DbPool {
        let mut pool: DbPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "name": name, "namespace": ns },
            "spec": { "database": {
                "host": "db", "dbname": "app", "user": "app",
                "passwordSecretRef": { "name": secret, "key": "password" }
            } }
        }))
        .expect("a DbPool");
        pool.metadata.namespace = Some(ns.to_owned());
        pool
    }

    fn cached(secret: &str) -> CachedSecret {
        CachedSecret {
            resource_version: Some("1".to_owned()),
            data: std::collections::BTreeMap::from([(
                "password".to_owned(),
                secret.as_bytes().to_vec(),
            )]),
        }
    }

    #[tokio::test]
    async fn cached_values_no_pool_refers_to_are_evicted() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("URL"));
        let client = Client::try_from(config).expect("client");
        let (meta, _meta_writer) = reflector::store::<PartialObjectMeta<Secret>>();
        let (pools, mut pools_writer) = reflector::store::<DbPool>();
        let cache = SecretCache::new(client, meta, pools, Arc::new(ApiPermits::new(1)));
        let id = |ns: &str, name: &str| (ns.to_owned(), name.to_owned());

        pools_writer.apply_watcher_event(&watcher::Event::Apply(pool("a", "p1", "s1")));
        pools_writer.apply_watcher_event(&watcher::Event::Apply(pool("a", "p2", "s2")));
        cache.insert(id("a", "s1"), cached("one"));
        cache.insert(id("a", "s2"), cached("two"));
        assert_eq!(cache.cache.lock().expect("lock").len(), 2);

        // p2 is deleted: its Secret's value goes at the next insert.
        pools_writer.apply_watcher_event(&watcher::Event::Delete(pool("a", "p2", "s2")));
        cache.insert(id("a", "s1"), cached("one again"));
        let keys: Vec<_> = cache.cache.lock().expect("lock").keys().cloned().collect();
        assert_eq!(keys, [id("a", "s1")]);
    }
}
