//! Admission against the real kube-apiserver: the CRD's schema bounds, enums, required fields and
//! CEL rules reject bad DbPools with the intended message, accept the edge cases that are valid,
//! and fill in every default.
//!
//! Needs the control plane that `make test` starts (or `eval "$(make -s env-up)"`).

use dbpool_testkit as support;

use dbpool_operator::api::{DURATION_MESSAGE, DbPool, DbPoolSpec, GATE_SERVICE_NAME_MESSAGE};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
};
use serde_json::{Value, json};
use support::kube::{TestNamespace, apply_yaml, client, install_crd};

/// A complete, valid DbPool with only spec.database set: every case starts from it.
fn minimal(name: &str) -> Value {
    json!({
        "apiVersion": "dbpool.io/v1alpha1",
        "kind": "DbPool",
        "metadata": { "name": name },
        "spec": { "database": { "host": "db.shop.svc", "dbname": "orders", "user": "app" } }
    })
}

/// RFC 7396 merge patch: objects merge, `null` removes a key, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// The minimal DbPool named `name` with `spec_patch` merged into its spec.
fn manifest(name: &str, spec_patch: &Value) -> Value {
    let mut object = minimal(name);
    merge(&mut object["spec"], spec_patch);
    object
}

fn dynamic_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<DbPool>(&()))
}

async fn create(api: &Api<DynamicObject>, object: Value) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(object).expect("a Kubernetes object");
    api.create(&PostParams::default(), &object).await
}

struct Invalid {
    name: &'static str,
    spec: Value,
    /// Every one of these must appear in the apiserver's message.
    expect: &'static [&'static str],
}

fn invalid(name: &'static str, spec: Value, expect: &'static [&'static str]) -> Invalid {
    Invalid { name, spec, expect }
}

fn invalid_cases() -> Vec<Invalid> {
    const DURATION: &str = DURATION_MESSAGE;
    vec![
        // CEL rules across fields.
        invalid(
            "min-above-max",
            json!({ "pool": { "minSize": 5, "maxSize": 2 } }),
            &[
                "spec.pool",
                "pool.minSize must not be greater than pool.maxSize",
            ],
        ),
        invalid(
            "timeout-equals-interval",
            json!({ "healthCheck": { "interval": "5s", "timeout": "5s" } }),
            &[
                "spec.healthCheck",
                "healthCheck.timeout must be shorter than healthCheck.interval",
            ],
        ),
        invalid(
            "timeout-above-interval",
            json!({ "healthCheck": { "interval": "30s", "timeout": "1m" } }),
            &["healthCheck.timeout must be shorter than healthCheck.interval"],
        ),
        invalid(
            "default-interval-below-timeout",
            json!({ "healthCheck": { "timeout": "45s" } }),
            &["healthCheck.timeout must be shorter than healthCheck.interval"],
        ),
        invalid(
            "max-delay-below-initial",
            json!({ "backoff": { "initialDelay": "10s", "maxDelay": "5s" } }),
            &[
                "spec.backoff",
                "backoff.maxDelay must be at least backoff.initialDelay",
            ],
        ),
        invalid(
            "verify-full-without-ca",
            json!({ "database": { "sslMode": "verify-full" } }),
            &[
                "spec.database",
                "caSecretRef is required when sslMode is verify-ca or verify-full",
            ],
        ),
        invalid(
            "verify-ca-without-ca",
            json!({ "database": { "sslMode": "verify-ca" } }),
            &["caSecretRef is required when sslMode is verify-ca or verify-full"],
        ),
        // spec.gate.
        invalid(
            "gate-service-name-not-a-label",
            json!({ "gate": { "serviceName": "Orders_Gate" } }),
            &["spec.gate", GATE_SERVICE_NAME_MESSAGE],
        ),
        invalid(
            "gate-service-name-starts-with-a-digit",
            json!({ "gate": { "serviceName": "1orders" } }),
            &[GATE_SERVICE_NAME_MESSAGE],
        ),
        invalid(
            "gate-service-name-too-long",
            json!({ "gate": { "serviceName": "a".repeat(64) } }),
            &["spec.gate.serviceName"],
        ),
        invalid(
            "gate-port-zero",
            json!({ "gate": { "serviceName": "orders-gate", "port": 0 } }),
            &["spec.gate.port"],
        ),
        invalid(
            "gate-port-too-high",
            json!({ "gate": { "serviceName": "orders-gate", "port": 65536 } }),
            &["spec.gate.port"],
        ),
        invalid(
            "gate-without-service-name",
            json!({ "gate": { "port": 5432 } }),
            &["spec.gate.serviceName"],
        ),
        // Durations.
        invalid(
            "duration-word",
            json!({ "healthCheck": { "interval": "thirty" } }),
            &["spec.healthCheck.interval", DURATION],
        ),
        invalid(
            "duration-negative",
            json!({ "backoff": { "cooldown": "-5s" } }),
            &["spec.backoff.cooldown", DURATION],
        ),
        invalid(
            "duration-without-unit",
            json!({ "breaker": { "openTimeout": "10" } }),
            &["spec.breaker.openTimeout", DURATION],
        ),
        invalid(
            "duration-zero",
            json!({ "backoff": { "initialDelay": "0s" } }),
            &["spec.backoff.initialDelay", DURATION],
        ),
        invalid(
            "duration-days",
            json!({ "backoff": { "maxDelay": "1d" } }),
            &["spec.backoff.maxDelay", DURATION],
        ),
        invalid(
            "duration-with-space",
            json!({ "healthCheck": { "timeout": "5 s" } }),
            &["spec.healthCheck.timeout", DURATION],
        ),
        invalid(
            "duration-as-number",
            json!({ "healthCheck": { "interval": 30 } }),
            &["spec.healthCheck.interval", "must be of type string"],
        ),
        invalid(
            "duration-too-long",
            json!({ "breaker": { "openTimeout": "1s".repeat(40) } }),
            &["spec.breaker.openTimeout", "Too long"],
        ),
        // Duration floors and ceilings.
        invalid(
            "interval-below-floor",
            json!({ "healthCheck": { "interval": "99ms", "timeout": "50ms" } }),
            &["healthCheck.interval must be between 100ms and 24h"],
        ),
        invalid(
            "interval-above-ceiling",
            json!({ "healthCheck": { "interval": "24h1s" } }),
            &["healthCheck.interval must be between 100ms and 24h"],
        ),
        invalid(
            "timeout-below-floor",
            json!({ "healthCheck": { "timeout": "1ms" } }),
            &["healthCheck.timeout must be between 100ms and 60s"],
        ),
        invalid(
            "timeout-above-ceiling",
            json!({ "healthCheck": { "interval": "1h", "timeout": "10m" } }),
            &["healthCheck.timeout must be between 100ms and 60s"],
        ),
        invalid(
            "initial-delay-below-floor",
            json!({ "backoff": { "initialDelay": "1ms" } }),
            &["backoff.initialDelay must be between 100ms and 1h"],
        ),
        invalid(
            "initial-delay-above-ceiling",
            json!({ "backoff": { "initialDelay": "2h", "maxDelay": "3h" } }),
            &["backoff.initialDelay must be between 100ms and 1h"],
        ),
        invalid(
            "max-delay-above-ceiling",
            json!({ "backoff": { "maxDelay": "25h" } }),
            &["backoff.maxDelay must be between 100ms and 24h"],
        ),
        invalid(
            "cooldown-below-floor",
            json!({ "backoff": { "cooldown": "10ms" } }),
            &["backoff.cooldown must be between 100ms and 24h"],
        ),
        invalid(
            "cooldown-above-ceiling",
            json!({ "backoff": { "cooldown": "600h" } }),
            &["backoff.cooldown must be between 100ms and 24h"],
        ),
        invalid(
            "open-timeout-below-floor",
            json!({ "breaker": { "openTimeout": "50ms" } }),
            &["breaker.openTimeout must be between 100ms and 24h"],
        ),
        invalid(
            "open-timeout-socket-overflow",
            // 2^31 ms: TCP_USER_TIMEOUT would be EINVAL at this size; nothing near it is admitted.
            json!({ "breaker": { "openTimeout": "2147483648ms" } }),
            &["breaker.openTimeout must be between 100ms and 24h"],
        ),
        invalid(
            "timeout-socket-overflow",
            json!({ "healthCheck": { "interval": "24h", "timeout": "2147483648ms" } }),
            &["healthCheck.timeout must be between 100ms and 60s"],
        ),
        // Hosts no resolver can use.
        invalid(
            "host-with-nul",
            json!({ "database": { "host": "db\u{0000}.evil" } }),
            &["database.host must be a host name or an IP address"],
        ),
        invalid(
            "host-with-space",
            json!({ "database": { "host": "db shop" } }),
            &["database.host must be a host name or an IP address"],
        ),
        invalid(
            "host-with-slash",
            json!({ "database": { "host": "db/../x" } }),
            &["database.host must be a host name or an IP address"],
        ),
        // Numeric bounds.
        invalid(
            "port-zero",
            json!({ "database": { "port": 0 } }),
            &["spec.database.port", "should be greater than or equal to 1"],
        ),
        invalid(
            "port-too-high",
            json!({ "database": { "port": 70000 } }),
            &[
                "spec.database.port",
                "should be less than or equal to 65535",
            ],
        ),
        invalid(
            "jitter-above-one",
            json!({ "backoff": { "jitter": 1.5 } }),
            &["spec.backoff.jitter", "should be less than or equal to 1"],
        ),
        invalid(
            "jitter-negative",
            json!({ "backoff": { "jitter": -0.1 } }),
            &[
                "spec.backoff.jitter",
                "should be greater than or equal to 0",
            ],
        ),
        invalid(
            "multiplier-below-one",
            json!({ "backoff": { "multiplier": 0.5 } }),
            &[
                "spec.backoff.multiplier",
                "should be greater than or equal to 1",
            ],
        ),
        invalid(
            "max-attempts-zero",
            json!({ "backoff": { "maxAttempts": 0 } }),
            &[
                "spec.backoff.maxAttempts",
                "should be greater than or equal to 1",
            ],
        ),
        invalid(
            "failure-threshold-zero",
            json!({ "breaker": { "failureThreshold": 0 } }),
            &[
                "spec.breaker.failureThreshold",
                "should be greater than or equal to 1",
            ],
        ),
        invalid(
            "success-threshold-zero",
            json!({ "breaker": { "successThreshold": 0 } }),
            &[
                "spec.breaker.successThreshold",
                "should be greater than or equal to 1",
            ],
        ),
        invalid(
            "max-size-too-high",
            json!({ "pool": { "maxSize": 20000 } }),
            &["spec.pool.maxSize", "should be less than or equal to 10000"],
        ),
        invalid(
            "min-size-negative",
            json!({ "pool": { "minSize": -1 } }),
            &["spec.pool.minSize", "should be greater than or equal to 0"],
        ),
        // Enums.
        invalid(
            "unknown-ssl-mode",
            json!({ "database": { "sslMode": "verify-everything" } }),
            &[
                "spec.database.sslMode",
                "Unsupported value: \"verify-everything\"",
            ],
        ),
        invalid(
            "unknown-breaker-mode",
            json!({ "breaker": { "mode": "Sometimes" } }),
            &["spec.breaker.mode", "Unsupported value: \"Sometimes\""],
        ),
        invalid(
            "breaker-mode-wrong-case",
            json!({ "breaker": { "mode": "auto" } }),
            &["spec.breaker.mode", "Unsupported value: \"auto\""],
        ),
        invalid(
            "unknown-session-attrs",
            json!({ "database": { "targetSessionAttrs": "primary" } }),
            &[
                "spec.database.targetSessionAttrs",
                "Unsupported value: \"primary\"",
            ],
        ),
        // Required fields and lengths.
        invalid(
            "missing-host",
            json!({ "database": { "host": null } }),
            &["spec.database.host: Required value"],
        ),
        invalid(
            "missing-dbname",
            json!({ "database": { "dbname": null } }),
            &["spec.database.dbname: Required value"],
        ),
        invalid(
            "missing-user",
            json!({ "database": { "user": null } }),
            &["spec.database.user: Required value"],
        ),
        invalid(
            "missing-database",
            json!({ "database": null }),
            &["spec.database: Required value"],
        ),
        invalid(
            "empty-host",
            json!({ "database": { "host": "" } }),
            &["spec.database.host", "at least 1 chars long"],
        ),
        invalid(
            "secret-ref-without-key",
            json!({ "database": { "passwordSecretRef": { "name": "db" } } }),
            &["spec.database.passwordSecretRef.key: Required value"],
        ),
        invalid(
            "application-name-too-long",
            json!({ "database": { "applicationName": "a".repeat(64) } }),
            &["spec.database.applicationName", "Too long"],
        ),
    ]
}

#[tokio::test]
async fn invalid_dbpools_are_rejected_with_their_message() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let api = dynamic_api(&client, ns.name());
    let cases = invalid_cases();
    assert!(cases.len() >= 15, "the table is the point of this test");

    let results = futures::future::join_all(
        cases
            .iter()
            .map(|case| create(&api, manifest(case.name, &case.spec))),
    )
    .await;

    let mut failures = Vec::new();
    for (case, result) in cases.iter().zip(results) {
        match result {
            Ok(_) => failures.push(format!("{}: accepted, expected a rejection", case.name)),
            Err(kube::Error::Api(status)) => {
                let missing: Vec<&str> = case
                    .expect
                    .iter()
                    .copied()
                    .filter(|want| !status.message.contains(want))
                    .collect();
                // A malformed duration is reported by its own field's rule only, not also as a
                // CEL conversion error of a cross-field rule.
                let noisy = status.message.contains("type conversion error");
                if status.code != 422 || status.reason != "Invalid" || !missing.is_empty() || noisy
                {
                    failures.push(format!(
                        "{}: got {} {} {:?}; missing {missing:?}",
                        case.name, status.code, status.reason, status.message
                    ));
                }
            }
            Err(other) => failures.push(format!("{}: unexpected error {other}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid manifests were not rejected as intended:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    ns.cleanup().await;
}

/// Manifests at the edges of what is allowed. Each must be accepted, and must then be readable
/// as the operator's typed DbPool: anything the apiserver admits, the operator can parse.
fn valid_cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "gate-at-the-edges",
            json!({ "gate": { "serviceName": format!("a{}9", "-".repeat(61)), "port": 65535 } }),
        ),
        (
            "gate-one-letter",
            json!({ "gate": { "serviceName": "g", "port": 1 } }),
        ),
        (
            "compound-durations",
            json!({
                "healthCheck": { "interval": "1h30m", "timeout": "45.5s" },
                "backoff": { "initialDelay": "500ms", "maxDelay": "1h", "cooldown": "2h45m30s" },
                "breaker": { "openTimeout": "1.5s" }
            }),
        ),
        (
            "duration-floors",
            json!({
                "healthCheck": { "interval": "101ms", "timeout": "100ms" },
                "backoff": { "initialDelay": "100ms", "maxDelay": "100ms", "cooldown": "0.1s" },
                "breaker": { "openTimeout": "100000us" }
            }),
        ),
        (
            "duration-ceilings",
            json!({
                "healthCheck": { "interval": "24h", "timeout": "60s" },
                "backoff": { "initialDelay": "1h", "maxDelay": "24h", "cooldown": "1440m" },
                "breaker": { "openTimeout": "24h" }
            }),
        ),
        ("host-forms", json!({ "database": { "host": "fe80::1" } })),
        (
            "allow-md5",
            json!({ "database": { "host": "10.0.0.5", "allowMd5": true } }),
        ),
        (
            "timeout-just-below-interval",
            json!({ "healthCheck": { "interval": "30s", "timeout": "29.999s" } }),
        ),
        (
            "max-delay-equals-initial",
            json!({ "backoff": { "initialDelay": "5s", "maxDelay": "5s" } }),
        ),
        (
            "lowest-bounds",
            json!({
                "database": { "port": 1 },
                "pool": { "minSize": 0, "maxSize": 1 },
                "backoff": { "multiplier": 1, "maxAttempts": 1, "jitter": 0 },
                "breaker": { "failureThreshold": 1, "successThreshold": 1 }
            }),
        ),
        (
            "highest-bounds",
            json!({
                "database": { "port": 65535 },
                "pool": { "minSize": 10000, "maxSize": 10000 },
                "backoff": { "multiplier": 100, "maxAttempts": 1000, "jitter": 1 },
                "breaker": { "failureThreshold": 1000, "successThreshold": 1000 }
            }),
        ),
        (
            "verify-ca-with-ca",
            json!({
                "database": {
                    "sslMode": "verify-ca",
                    "caSecretRef": { "name": "db-ca", "key": "ca.crt" },
                    "targetSessionAttrs": "any"
                },
                "breaker": { "mode": "ForcedOpen" }
            }),
        ),
        (
            "disabled-breaker-no-tls",
            json!({ "database": { "sslMode": "disable" }, "breaker": { "mode": "Disabled" } }),
        ),
        (
            "require-tls-no-ca",
            json!({ "database": { "sslMode": "require", "applicationName": "a".repeat(63) } }),
        ),
    ]
}

#[tokio::test]
async fn edge_cases_that_are_valid_are_accepted_and_parse() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let api = dynamic_api(&client, ns.name());
    let typed: Api<DbPool> = ns.api();
    let mut failures = Vec::new();
    for (name, spec) in valid_cases() {
        match create(&api, manifest(name, &spec)).await {
            Ok(_) => {
                if let Err(e) = typed.get(name).await {
                    failures.push(format!(
                        "{name}: accepted but the operator cannot parse it: {e}"
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: rejected: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ns.cleanup().await;
}

#[tokio::test]
async fn the_minimal_example_is_accepted_and_defaulted() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let text = include_str!("../examples/minimal.yaml");
    let local: Value = serde_saphyr::from_str(text).expect("examples/minimal.yaml parses");
    let name = local["metadata"]["name"]
        .as_str()
        .expect("named")
        .to_owned();

    let api = dynamic_api(&client, ns.name());
    create(&api, local.clone())
        .await
        .expect("minimal example is accepted");

    // What the apiserver stored, as raw JSON: every default filled in, durations as written in
    // the schema (Go's canonical form).
    let stored = serde_json::to_value(api.get(&name).await.expect("read back")).expect("json");
    let spec = &stored["spec"];
    let expected_strings = [
        ("/backoff/cooldown", "5m0s"),
        ("/backoff/initialDelay", "1s"),
        ("/backoff/maxDelay", "1m0s"),
        ("/healthCheck/interval", "30s"),
        ("/healthCheck/timeout", "5s"),
        ("/breaker/openTimeout", "1m0s"),
        ("/breaker/mode", "Auto"),
        ("/database/sslMode", "prefer"),
        ("/database/targetSessionAttrs", "read-write"),
        ("/database/applicationName", "dbpool-operator"),
    ];
    for (pointer, want) in expected_strings {
        assert_eq!(
            spec.pointer(pointer).and_then(Value::as_str),
            Some(want),
            "spec{pointer} in {spec:#}"
        );
    }
    let expected_numbers = [
        ("/database/port", 5432.0),
        ("/pool/minSize", 1.0),
        ("/pool/maxSize", 10.0),
        ("/backoff/multiplier", 2.0),
        ("/backoff/maxAttempts", 10.0),
        ("/backoff/jitter", 0.1),
        ("/breaker/failureThreshold", 5.0),
        ("/breaker/successThreshold", 1.0),
    ];
    for (pointer, want) in expected_numbers {
        assert_eq!(
            spec.pointer(pointer).and_then(Value::as_f64),
            Some(want),
            "spec{pointer} in {spec:#}"
        );
    }
    assert_eq!(spec["database"]["passwordSecretRef"]["name"], "orders-db");
    assert!(
        stored.get("status").is_none(),
        "no status before the operator writes one"
    );

    // The apiserver's defaults are exactly the operator's own serde defaults.
    let typed: Api<DbPool> = ns.api();
    let server_spec = typed.get(&name).await.expect("typed read back").spec;
    let local_spec: DbPoolSpec = serde_json::from_value(local["spec"].clone()).expect("local");
    assert_eq!(server_spec, local_spec);

    // A partly written section keeps the defaults of the fields it omits.
    let partial = manifest("partial", &json!({ "backoff": { "maxDelay": "2m" } }));
    let created = create(&api, partial)
        .await
        .expect("partial backoff is accepted");
    let backoff = serde_json::to_value(&created).expect("json")["spec"]["backoff"].clone();
    assert_eq!(backoff["maxDelay"], "2m");
    assert_eq!(backoff["initialDelay"], "1s");
    assert_eq!(backoff["cooldown"], "5m0s");
    assert_eq!(backoff["maxAttempts"], 10);
    ns.cleanup().await;
}

#[tokio::test]
async fn the_full_example_is_stored_as_written() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client).await;
    let text = include_str!("../examples/full.yaml");
    let applied = apply_yaml(&client, ns.name(), text).await;
    assert_eq!(applied.len(), 1);

    let local: DbPool = serde_saphyr::from_str(text).expect("examples/full.yaml parses");
    let typed: Api<DbPool> = ns.api();
    let stored = typed.get("payments").await.expect("read back");
    assert_eq!(
        stored.spec, local.spec,
        "every field survives admission unchanged"
    );
    ns.cleanup().await;
}
