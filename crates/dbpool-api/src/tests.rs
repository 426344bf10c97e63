//! Unit tests of the API types: defaults, round trips and the generated CRD.

use super::*;

fn minimal_json() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "dbpool.io/v1alpha1",
        "kind": "DbPool",
        "metadata": { "name": "orders", "namespace": "shop" },
        "spec": { "database": { "host": "db.shop.svc", "dbname": "orders", "user": "app" } }
    })
}

#[test]
fn defaults_fill_a_minimal_spec() {
    let pool: DbPool = serde_json::from_value(minimal_json()).expect("minimal manifest parses");
    let spec = &pool.spec;
    assert_eq!(spec.database.port, 5432);
    assert_eq!(spec.database.ssl_mode, SslMode::Prefer);
    assert_eq!(
        spec.database.target_session_attrs,
        TargetSessionAttrs::ReadWrite
    );
    assert_eq!(spec.database.application_name, "dbpool-operator");
    assert_eq!(spec.database.password_secret_ref, None);
    assert_eq!((spec.pool.min_size, spec.pool.max_size), (1, 10));
    assert_eq!(spec.health_check.interval, GoDuration::from_secs(30));
    assert_eq!(spec.health_check.timeout, GoDuration::from_secs(5));
    assert_eq!(spec.backoff.initial_delay, GoDuration::from_secs(1));
    assert_eq!(spec.backoff.multiplier, 2.0);
    assert_eq!(spec.backoff.max_delay, GoDuration::from_secs(60));
    assert_eq!(spec.backoff.max_attempts, 10);
    assert_eq!(spec.backoff.cooldown, GoDuration::from_secs(300));
    assert_eq!(spec.backoff.jitter, 0.1);
    assert_eq!(spec.breaker.failure_threshold, 5);
    assert_eq!(spec.breaker.open_timeout, GoDuration::from_secs(60));
    assert_eq!(spec.breaker.success_threshold, 1);
    assert_eq!(spec.breaker.mode, BreakerMode::Auto);
    assert!(pool.status.is_none());
}

#[test]
fn a_partial_section_keeps_the_other_defaults() {
    let mut manifest = minimal_json();
    manifest["spec"]["backoff"] = serde_json::json!({ "maxDelay": "2m" });
    let pool: DbPool = serde_json::from_value(manifest).expect("parses");
    assert_eq!(pool.spec.backoff.max_delay, GoDuration::from_secs(120));
    assert_eq!(pool.spec.backoff.initial_delay, GoDuration::from_secs(1));
    assert_eq!(pool.spec.backoff.max_attempts, 10);
}

#[test]
fn a_bad_duration_is_refused_with_its_text() {
    let mut manifest = minimal_json();
    manifest["spec"]["healthCheck"] = serde_json::json!({ "interval": "thirty seconds" });
    let err = serde_json::from_value::<DbPool>(manifest).expect_err("bad duration");
    assert!(err.to_string().contains("thirty seconds"), "{err}");
}

#[test]
fn full_spec_round_trips_through_yaml_and_json() {
    let text = include_str!("../../../examples/full.yaml");
    let pool: DbPool = serde_saphyr::from_str(text).expect("examples/full.yaml parses");
    assert_eq!(pool.spec.database.ssl_mode, SslMode::VerifyFull);
    assert_eq!(pool.spec.breaker.mode, BreakerMode::Auto);
    assert_eq!(pool.spec.health_check.interval, GoDuration::from_secs(15));
    let json = serde_json::to_value(&pool).expect("to json");
    let back: DbPool = serde_json::from_value(json.clone()).expect("from json");
    assert_eq!(back, pool);
    let yaml = serde_saphyr::to_string(&pool).expect("to yaml");
    let back: DbPool = serde_saphyr::from_str(&yaml).expect("from yaml");
    assert_eq!(back, pool);
    // Durations are written back in Go's canonical form.
    assert_eq!(json["spec"]["backoff"]["cooldown"], "5m0s");
}

#[test]
fn status_round_trips_with_every_field() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
    let instant = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("valid");
    let now = MicroTime(instant);
    let status = DbPoolStatus {
        writer_epoch: Some(3),
        observed_generation: Some(3),
        phase: Some(Phase::BreakerOpen),
        breaker: Some(BreakerStatus {
            state: BreakerState::Open,
            since: Some(now.clone()),
            next_probe_at: Some(now.clone()),
            open_count: 2,
            half_open_successes: 0,
        }),
        consecutive_failures: 5,
        recovery_attempts: 5,
        current_backoff: Some(GoDuration::from_secs(16).to_string()),
        cooldown_until: None,
        last_probe: Some(ProbeSummary {
            time: now.clone(),
            outcome: ProbeOutcome::TransientFailure,
            stage: Some(ProbeStage::Connect),
            latency_ms: 3,
            message: Some("connection refused".into()),
            sql_state: None,
            server_version: None,
            in_recovery: None,
            connections: None,
            max_connections: None,
        }),
        last_success_time: None,
        last_failure_time: Some(now.clone()),
        readiness: Some(ReadinessStatus {
            state: Readiness::Accepting,
            since: now.clone(),
        }),
        last_force_reopen: Some(ForceReopenRecord {
            token: "t1".into(),
            time: now.clone(),
        }),
        conditions: vec![Condition {
            type_: CONDITION_BREAKER_OPEN.into(),
            status: "True".into(),
            reason: "FailureThresholdReached".into(),
            message: "5 consecutive failures".into(),
            last_transition_time: Time(instant),
            observed_generation: Some(3),
        }],
    };
    let json = serde_json::to_value(&status).expect("to json");
    assert_eq!(json["breaker"]["state"], "Open");
    assert_eq!(json["lastProbe"]["outcome"], "TransientFailure");
    assert_eq!(json["currentBackoff"], "16s");
    let back: DbPoolStatus = serde_json::from_value(json).expect("from json");
    assert_eq!(back, status);
}

#[test]
fn committed_crd_matches_the_types() {
    let generated = crd_yaml().expect("crd serializes");
    let committed = include_str!("../../../crds/dbpool.yaml");
    assert!(
        generated == committed,
        "crds/dbpool.yaml is stale: run `make crd`"
    );
}

#[test]
fn crd_carries_rules_columns_status_and_short_name() {
    let crd = serde_json::to_value(DbPool::crd()).expect("crd to json");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "dbp");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Phase",
            "Breaker",
            "Failures",
            "Latency",
            "Last-Probe",
            "Age"
        ]
    );
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let rule_of = |section: &str| spec[section]["x-kubernetes-validations"][0]["rule"].clone();
    assert_eq!(rule_of("pool"), "self.minSize <= self.maxSize");
    // Cross-field rules judge only well-formed durations (malformed ones fail their own rule).
    let ends_with =
        |rule: serde_json::Value, tail: &str| rule.as_str().is_some_and(|r| r.ends_with(tail));
    assert!(ends_with(
        rule_of("healthCheck"),
        "|| duration(self.timeout) < duration(self.interval)"
    ));
    assert!(ends_with(
        rule_of("backoff"),
        "|| duration(self.maxDelay) >= duration(self.initialDelay)"
    ));
    let interval = &spec["healthCheck"]["properties"]["interval"];
    assert_eq!(
        interval["x-kubernetes-validations"][0]["rule"],
        DURATION_RULE
    );
    assert_eq!(interval["default"], "30s");
    assert!(
        interval["description"]
            .as_str()
            .is_some_and(|d| d.contains("between probes"))
    );
    // Whole sections default, so a manifest with only spec.database is complete.
    assert_eq!(spec["backoff"]["default"]["cooldown"], "5m0s");
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
    assert_eq!(
        status["conditions"]["x-kubernetes-list-map-keys"][0],
        "type"
    );
}

#[test]
fn secrets_consent_per_host() {
    use std::collections::BTreeMap;
    let label = BTreeMap::from([(CREDENTIALS_LABEL.to_owned(), "true".to_owned())]);
    let hosts = BTreeMap::from([(
        ALLOWED_HOSTS_ANNOTATION.to_owned(),
        " db.prod.svc , 10.0.0.5,".to_owned(),
    )]);
    assert!(secret_consents(Some(&label), Some(&hosts), "db.prod.svc"));
    assert!(secret_consents(Some(&label), Some(&hosts), "DB.Prod.svc"));
    assert!(secret_consents(Some(&label), Some(&hosts), "10.0.0.5"));
    assert!(!secret_consents(Some(&label), Some(&hosts), "evil.example"));
    assert!(!secret_consents(Some(&label), Some(&hosts), ""));
    assert!(!secret_consents(Some(&label), Some(&hosts), "db.prod"));
    assert!(!secret_consents(None, Some(&hosts), "db.prod.svc"));
    assert!(!secret_consents(Some(&label), None, "db.prod.svc"));
    let no = BTreeMap::from([(CREDENTIALS_LABEL.to_owned(), "false".to_owned())]);
    assert!(!secret_consents(Some(&no), Some(&hosts), "db.prod.svc"));
}

#[test]
fn gate_is_optional_and_its_port_defaults_to_5432() {
    let pool: DbPool = serde_json::from_value(minimal_json()).expect("minimal manifest parses");
    assert_eq!(pool.spec.gate, None);
    let mut json = minimal_json();
    json["spec"]["gate"] = serde_json::json!({ "serviceName": "orders-gate" });
    let pool: DbPool = serde_json::from_value(json).expect("gate parses");
    assert_eq!(
        pool.spec.gate,
        Some(GateSpec {
            service_name: "orders-gate".into(),
            port: 5432
        })
    );
}

#[test]
fn the_crd_validates_the_gate() {
    let crd = serde_json::to_value(DbPool::crd()).expect("crd serializes");
    let gate = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["gate"];
    assert_eq!(gate["properties"]["serviceName"]["maxLength"], 63);
    assert_eq!(gate["properties"]["port"]["maximum"], 65535.0);
    assert_eq!(
        gate["x-kubernetes-validations"][0]["rule"],
        GATE_SERVICE_NAME_RULE
    );
}
