//! What the pings (and the pools' own outage failures) saw of each target, for the pools'
//! status: the shareable readiness and since when, and each credential key's configuration
//! answer.
//!
//! Lives here: [`Seen`] and [`Shown`]. Must not live here: when to ping (`pings`), writing the
//! status (`reconcile`, through the write budget), any server text: only the answer's kind and
//! its time are kept, so nothing of one pool's server answers can reach another's status.
//!
//! The shareable readiness of a target (Accepting, StartingUp, Unreachable) is the latest
//! answer, with `since` the instant it changed to that answer (the edge, not the last ping).
//! A configuration answer (pg_hba, certificate, no TLS) belongs to the credential key that
//! pinged: only that key's pools are shown it, and only while it is at least as recent as the
//! target's shareable readiness. Rejected and NotPostgres change nothing shown. Bounded: at most
//! [`MAX_TARGETS`] targets (the one changed longest ago is forgotten first) and
//! [`MAX_KEYS_PER_TARGET`] configuration answers per target.

use std::collections::HashMap;

use k8s_openapi::jiff::Timestamp;

use crate::probe::{PingTarget, Readiness};

/// Most targets remembered.
pub(crate) const MAX_TARGETS: usize = 16_384;

/// Most credential keys' configuration answers remembered per target.
pub(crate) const MAX_KEYS_PER_TARGET: usize = 64;

/// A readiness shown to a pool, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shown {
    pub state: Readiness,
    pub since: Timestamp,
}

#[derive(Default)]
struct Target {
    /// The shareable readiness; and when it was last confirmed (older answers are ignored).
    shared: Option<(Shown, Timestamp)>,
    /// Configuration answers per credential key, with their instant.
    config: Vec<(PingTarget, Timestamp)>,
}

/// What was seen of every target.
#[derive(Default)]
pub(crate) struct Seen {
    targets: HashMap<String, Target>,
}

impl Seen {
    /// Records `readiness`, answered at `at` to `ping` (a credential key) on `target`.
    pub fn record(&mut self, target: &str, ping: &PingTarget, readiness: Readiness, at: Timestamp) {
        if !self.targets.contains_key(target) && self.targets.len() >= MAX_TARGETS {
            self.forget_oldest();
        }
        let entry = self.targets.entry(target.to_owned()).or_default();
        match readiness {
            Readiness::Accepting | Readiness::StartingUp | Readiness::Unreachable => {
                match &mut entry.shared {
                    Some((_, last)) if at < *last => {}
                    Some((shown, last)) if shown.state == readiness => *last = at,
                    shared => {
                        *shared = Some((
                            Shown {
                                state: readiness,
                                since: at,
                            },
                            at,
                        ));
                    }
                }
            }
            Readiness::ConfigAnswer => {
                if let Some(old) = entry.config.iter_mut().find(|(key, _)| key == ping) {
                    old.1 = old.1.max(at);
                } else {
                    if entry.config.len() >= MAX_KEYS_PER_TARGET {
                        entry.config.remove(0);
                    }
                    entry.config.push((ping.clone(), at));
                }
            }
            Readiness::Rejected | Readiness::NotPostgres => {}
        }
    }

    /// What the pools of credential key `ping` on `target` are shown: the key's configuration
    /// answer when it is at least as recent as the target's shareable readiness, else that.
    pub fn shown(&self, target: &str, ping: &PingTarget) -> Option<Shown> {
        let entry = self.targets.get(target)?;
        let shared = entry.shared.map(|(shown, _)| shown);
        let config = entry
            .config
            .iter()
            .find(|(key, _)| key == ping)
            .map(|(_, at)| *at);
        match (shared, config) {
            (Some(shared), Some(at)) if at < shared.since => Some(shared),
            (_, Some(at)) => Some(Shown {
                state: Readiness::ConfigAnswer,
                since: at,
            }),
            (shared, None) => shared,
        }
    }

    /// Number of targets remembered (for tests and the bound).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Forgets the target whose readiness was confirmed longest ago.
    fn forget_oldest(&mut self) {
        let oldest = self
            .targets
            .iter()
            .min_by_key(|(_, t)| {
                let shared = t.shared.map(|(_, at)| at);
                let config = t.config.iter().map(|(_, at)| *at).max();
                shared.max(config)
            })
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            self.targets.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::SslMode;

    fn key(user: &str) -> PingTarget {
        PingTarget {
            host: "db".into(),
            port: 5432,
            dbname: "app".into(),
            user: user.into(),
            ssl_mode: SslMode::Disable,
            ca_pem: None,
            timeout: Duration::from_secs(1),
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn since_is_the_edge_not_the_last_answer() {
        let mut seen = Seen::default();
        seen.record("db:5432", &key("a"), Readiness::Unreachable, t(0));
        seen.record("db:5432", &key("b"), Readiness::Unreachable, t(1));
        seen.record("db:5432", &key("a"), Readiness::StartingUp, t(2));
        seen.record("db:5432", &key("a"), Readiness::StartingUp, t(3));
        let shown = seen.shown("db:5432", &key("b"));
        assert_eq!(
            shown,
            Some(Shown {
                state: Readiness::StartingUp,
                since: t(2)
            })
        );
        // An answer older than the latest is ignored; Rejected changes nothing.
        seen.record("db:5432", &key("a"), Readiness::Unreachable, t(1));
        seen.record("db:5432", &key("a"), Readiness::Rejected, t(4));
        assert_eq!(seen.shown("db:5432", &key("b")), shown);
        seen.record("db:5432", &key("b"), Readiness::Accepting, t(5));
        assert_eq!(
            seen.shown("db:5432", &key("a")).map(|s| (s.state, s.since)),
            Some((Readiness::Accepting, t(5)))
        );
        assert_eq!(seen.shown("other:5432", &key("a")), None);
    }

    #[test]
    fn a_config_answer_is_shown_only_to_its_own_key_while_it_is_the_latest() {
        let mut seen = Seen::default();
        seen.record("db:5432", &key("a"), Readiness::Unreachable, t(0));
        seen.record("db:5432", &key("a"), Readiness::ConfigAnswer, t(1));
        assert_eq!(
            seen.shown("db:5432", &key("a")).map(|s| s.state),
            Some(Readiness::ConfigAnswer)
        );
        assert_eq!(
            seen.shown("db:5432", &key("b")).map(|s| s.state),
            Some(Readiness::Unreachable)
        );
        // A later change of the target's readiness is newer than the key's answer.
        seen.record("db:5432", &key("b"), Readiness::Accepting, t(2));
        assert_eq!(
            seen.shown("db:5432", &key("a")).map(|s| s.state),
            Some(Readiness::Accepting)
        );
    }

    #[test]
    fn targets_and_keys_are_bounded() {
        let mut seen = Seen::default();
        for i in 0..MAX_TARGETS + 10 {
            let at = t(i64::try_from(i).unwrap_or(0));
            seen.record(&format!("h{i}:5432"), &key("a"), Readiness::Unreachable, at);
        }
        assert_eq!(seen.len(), MAX_TARGETS);
        assert_eq!(
            seen.shown("h0:5432", &key("a")),
            None,
            "the oldest went first"
        );
        for i in 0..MAX_KEYS_PER_TARGET + 5 {
            let at = t(i64::try_from(i).unwrap_or(0));
            seen.record(
                "db:5432",
                &key(&format!("u{i}")),
                Readiness::ConfigAnswer,
                at,
            );
        }
        let entry = seen.targets.get("db:5432").map(|t| t.config.len());
        assert_eq!(entry, Some(MAX_KEYS_PER_TARGET));
    }
}
