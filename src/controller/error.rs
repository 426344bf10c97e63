//! The controller's error type.
//!
//! Lives here: [`Error`], what a reconcile, a write or the operator as a whole can end with, and
//! [`CredentialError`], why a pool's Secrets could not be read.
//! Must not live here: deciding what to do about one (the reconcile's error policy, the
//! writer's retry).

use crate::api::{ALLOWED_HOSTS_ANNOTATION, CREDENTIALS_LABEL};

/// Errors a reconcile or the operator as a whole can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An apiserver call failed.
    #[error("apiserver request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A Secret could not be read for a reason other than the user's configuration.
    #[error("{0}")]
    Credentials(#[from] CredentialError),
    /// A write did not complete within its deadline (the rest of the term, at most 10s).
    #[error("apiserver write took longer than {0:?}")]
    WriteTimeout(std::time::Duration),
    /// The pool was deleted while its reconcile ran (never surfaces: the reconcile forgets it).
    #[error("the DbPool was deleted")]
    Deleted,
    /// Leader election could not be set up (the process cannot safely run).
    #[error("cannot set up leader election: {0}")]
    LeaderElection(String),
}

/// Why credentials could not be read. Messages say exactly what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The Secret does not exist, or does not consent to being used for this host. The two are
    /// one error: telling them apart would need what the operator must not read.
    #[error(
        "Secret \"{name}\" in namespace \"{namespace}\" not found, or not opted in for host \"{host}\" \
         (add the label {CREDENTIALS_LABEL}=true and \"{host}\" to the annotation \
         {ALLOWED_HOSTS_ANNOTATION}; the password goes under the key \"{key}\")"
    )]
    NotFoundOrNotOptedIn {
        /// Namespace looked in.
        namespace: String,
        /// Secret name.
        name: String,
        /// Key the spec names.
        key: String,
        /// The pool's host.
        host: String,
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
    /// The Secret watch has not completed its first list (the operator just started): the
    /// Secret may well exist, so the reconcile stops without a verdict and is triggered again.
    #[error("Secret \"{name}\": the Secret watch has not synced yet")]
    NotSynced {
        /// Secret name.
        name: String,
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
        !matches!(self, Self::Api { .. } | Self::NotSynced { .. })
    }
}
