//! Unit tests of the parent module.
use std::time::Duration;

use super::*;
use crate::TargetSessionAttrs;

fn target(password: &str) -> ProbeTarget {
    ProbeTarget {
        host: "db.example".into(),
        port: 5432,
        dbname: "app".into(),
        user: "app".into(),
        password: Some(Password::new(password.into())),
        ssl_mode: SslMode::Prefer,
        ca_pem: None,
        target_session_attrs: TargetSessionAttrs::ReadWrite,
        application_name: "dbpool-operator".into(),
        pool_max_size: 10,
        allow_md5: false,
        timeout: Duration::from_secs(1),
    }
}

#[test]
fn key_separates_credentials_without_showing_them() {
    let state = RandomState::new();
    let a = ConnectionKey::new(&target("first-secret"), &state);
    let b = ConnectionKey::new(&target("second-secret"), &state);
    let a2 = ConnectionKey::new(&target("first-secret"), &state);
    assert_ne!(a, b);
    assert_eq!(a, a2);
    let debug = format!("{a:?}");
    assert!(!debug.contains("first-secret"), "{debug}");
    assert!(debug.contains("<hashed>"), "{debug}");
}

#[test]
fn target_debug_redacts_the_password() {
    let debug = format!("{:?}", target("hunter2-secret"));
    assert!(!debug.contains("hunter2-secret"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn success_message_mentions_a_pool_that_does_not_fit() {
    let findings = Findings {
        server_version: Some("15.8".into()),
        in_recovery: Some(false),
        saturation: checks::Saturation::from_columns(
            [Some("95"), Some("100"), Some("3"), Some("0")],
            10,
        ),
        saturation_note: None,
        peer: None,
    };
    let message = success_message(&findings, &target("x"));
    assert_eq!(
        message,
        "ok: PostgreSQL 15.8, primary; pool maxSize 10 does not fit into the free connection slots"
    );
}

#[tokio::test]
async fn forget_and_moves_keep_the_map_tidy() {
    let (prober, _rx) = Prober::new(ProberConfig::default());
    let first = ConnectionKey::new(&target("a"), &prober.inner.hash_state);
    let second = ConnectionKey::new(&target("b"), &prober.inner.hash_state);
    prober.inner.register("ns/one", &first);
    prober.inner.register("ns/two", &first);
    prober.inner.register("ns/one", &second);
    {
        let state = prober.inner.lock();
        assert_eq!(state.slots.len(), 2);
        assert_eq!(state.slots[&first].owners.len(), 1);
    }
    prober.forget("ns/two");
    {
        let state = prober.inner.lock();
        assert_eq!(state.slots.len(), 1, "the unused key is gone");
        assert!(state.slots.contains_key(&second));
    }
    prober.forget("ns/one");
    prober.forget("ns/unknown");
    assert!(prober.inner.lock().slots.is_empty());
    assert_eq!(prober.open_connections(), 0);
}
