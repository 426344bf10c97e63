//! Reading the Secrets a DbPool refers to, without reading them on every probe.
//!
//! Lives here: a cache of the Secret keys the pools use, keyed by Secret and invalidated by the
//! Secret's resourceVersion, which a metadata-only watch keeps current (so Secret data is fetched
//! once per change, not per probe, and no other Secret in the cluster is ever read). Errors name
//! the Secret and key to fix; they never contain a Secret's data.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};

use crate::{api::SecretKeyRef, probe::Password};

/// What the probe needs from Secrets, plus a fingerprint that changes when any of them changes.
pub struct Credentials {
    /// The password, when the spec names one.
    pub password: Option<Password>,
    /// The CA bundle, when the spec names one.
    pub ca_pem: Option<Vec<u8>>,
    /// resourceVersions of the Secrets used; a change means "probe again now".
    pub fingerprint: String,
}

/// Why credentials could not be read. Messages say exactly what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The Secret does not exist.
    #[error(
        "Secret \"{name}\" not found in namespace \"{namespace}\": create it with the key \"{key}\""
    )]
    SecretMissing {
        /// Namespace looked in.
        namespace: String,
        /// Secret name.
        name: String,
        /// Key the spec names.
        key: String,
    },
    /// The Secret exists but lacks the key.
    #[error("Secret \"{name}\" in namespace \"{namespace}\" has no key \"{key}\"")]
    KeyMissing {
        /// Namespace looked in.
        namespace: String,
        /// Secret name.
        name: String,
        /// Key the spec names.
        key: String,
    },
    /// The password is not UTF-8.
    #[error("key \"{key}\" of Secret \"{name}\" is not valid UTF-8 text")]
    NotText {
        /// Secret name.
        name: String,
        /// Key the spec names.
        key: String,
    },
    /// The apiserver could not be asked (RBAC, network): not the user's Secret's fault.
    #[error("cannot read Secret \"{name}\": {source}")]
    Api {
        /// Secret name.
        name: String,
        /// The client error.
        source: kube::Error,
    },
}

impl CredentialError {
    /// Whether the error is a mistake in configuration (as opposed to an apiserver problem).
    pub fn is_config(&self) -> bool {
        !matches!(self, Self::Api { .. })
    }
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
    cache: Mutex<HashMap<(String, String), CachedSecret>>,
    api_slots: Arc<tokio::sync::Semaphore>,
}

impl SecretCache {
    /// A cache over `meta`, a reflector store fed by a metadata watch on Secrets; reads from the
    /// apiserver take a permit of `api_slots`.
    pub fn new(
        client: Client,
        meta: Store<PartialObjectMeta<Secret>>,
        api_slots: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Self {
            client,
            meta,
            cache: Mutex::new(HashMap::new()),
            api_slots,
        }
    }

    /// Reads the password and CA the spec refers to.
    pub async fn load(
        &self,
        namespace: &str,
        password: Option<&SecretKeyRef>,
        ca: Option<&SecretKeyRef>,
    ) -> Result<Credentials, CredentialError> {
        let mut fingerprint = String::new();
        let password = match password {
            Some(r) => {
                let (bytes, rv) = self.key(namespace, r).await?;
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
                let (bytes, rv) = self.key(namespace, r).await?;
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
        r: &SecretKeyRef,
    ) -> Result<(Vec<u8>, String), CredentialError> {
        let id = (namespace.to_owned(), r.name.clone());
        let watched_rv = self
            .meta
            .get(&ObjectRef::new(&r.name).within(namespace))
            .and_then(|m| m.metadata.resource_version.clone());
        let fresh = || {
            self.cache
                .lock()
                .ok()
                .and_then(|c| c.get(&id).cloned())
                .filter(|c| watched_rv.is_some() && c.resource_version == watched_rv)
        };
        let secret = match fresh() {
            Some(c) => c,
            None => {
                let _slot = self.api_slots.acquire().await;
                // Many pools may share this Secret: whoever waited for the permit finds it fetched.
                match fresh() {
                    Some(c) => c,
                    None => {
                        let fetched = self.fetch(namespace, r).await?;
                        if let Ok(mut cache) = self.cache.lock() {
                            cache.insert(id.clone(), fetched.clone());
                        }
                        fetched
                    }
                }
            }
        };
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

    async fn fetch(
        &self,
        namespace: &str,
        r: &SecretKeyRef,
    ) -> Result<CachedSecret, CredentialError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(&r.name).await {
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
            Ok(None) => Err(CredentialError::SecretMissing {
                namespace: namespace.to_owned(),
                name: r.name.clone(),
                key: r.key.clone(),
            }),
            Err(source) => Err(CredentialError::Api {
                name: r.name.clone(),
                source,
            }),
        }
    }
}
