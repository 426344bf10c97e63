//! The Helm chart (charts/dbpool-operator) and the kustomize base (deploy/): they lint, render in
//! every mode, and what they render is accepted by the real kube-apiserver (`kubectl apply
//! --dry-run=server`, which runs admission and schema validation with strict field validation);
//! the CRD copies are identical to crds/dbpool.yaml; deploy/ is exactly the chart's defaults; the
//! pod is hardened; and the binary accepts every argument the chart gives it.

use dbpool_testkit as support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde_json::{Value, json};
use support::{
    helm::{
        by_key, chart_dir, container_args, deploy_dir, flag, helm, helm_ok, key, kinds,
        kubectl_stdin, kubectl_stdin_ok, of_kind, one, parse_docs, relative_path, repo_root,
        template,
    },
    kube::{TestNamespace, client, kubectl, kubectl_ok, unique_name},
    wait::wait_for,
};

/// Every optional feature on (and a second PostgreSQL port, extra rule labels).
const ALL_FEATURES: &[&str] = &[
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "networkPolicy.enabled=true",
    "--set-json",
    "networkPolicy.postgres.ports=[5432,6432]",
    "--set-json",
    r#"prometheusRule.additionalRuleLabels={"team":"databases"}"#,
    "--set",
    "gates.enabled=true",
    "--set-json",
    r#"hostAliases=[{"ip":"10.213.9.10","hostnames":["orders-db.example.internal"]}]"#,
];

/// The kinds the chart renders with its defaults.
const DEFAULT_KINDS: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "Deployment",
    "PodDisruptionBudget",
    "Role",
    "RoleBinding",
    "Service",
    "ServiceAccount",
];

/// Minimal CRDs of the Prometheus Operator's ServiceMonitor and PrometheusRule: the test apiserver
/// has none. Structural schemas with the upstream (monitoring.coreos.com/v1) types of every field
/// the chart sets and no x-kubernetes-preserve-unknown-fields, so that kubectl's strict field
/// validation rejects a misspelt or misplaced field, and the upstream patterns reject a malformed
/// duration.
const MONITORING_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            required: [selector]
            properties:
              jobLabel: {type: string}
              namespaceSelector:
                type: object
                properties:
                  any: {type: boolean}
                  matchNames: {type: array, items: {type: string}}
              selector:
                type: object
                x-kubernetes-map-type: atomic
                properties:
                  matchLabels: {type: object, additionalProperties: {type: string}}
              endpoints:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: string}
                    path: {type: string}
                    scheme: {type: string, enum: [http, https, HTTP, HTTPS]}
                    interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                    scrapeTimeout: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                    honorLabels: {type: boolean}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: prometheusrules.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          apiVersion: {type: string}
          kind: {type: string}
          metadata: {type: object}
          spec:
            type: object
            properties:
              groups:
                type: array
                items:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string, minLength: 1}
                    interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                    rules:
                      type: array
                      items:
                        type: object
                        required: [expr]
                        properties:
                          alert: {type: string}
                          record: {type: string}
                          expr: {x-kubernetes-int-or-string: true, anyOf: [{type: integer}, {type: string}]}
                          for: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                          labels: {type: object, additionalProperties: {type: string}}
                          annotations: {type: object, additionalProperties: {type: string}}
"#;

fn read(path: &str) -> String {
    let path = repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The chart's appVersion.
fn app_version() -> String {
    let chart: Value = serde_saphyr::from_str(&read("charts/dbpool-operator/Chart.yaml"))
        .expect("Chart.yaml parses");
    chart["appVersion"]
        .as_str()
        .expect("appVersion is a string")
        .to_owned()
}

/// Server-side dry run of `manifests`; panics with kubectl's output on failure.
async fn server_dry_run(manifests: &str) -> String {
    kubectl_stdin_ok(["apply", "--dry-run=server", "-f", "-"], manifests).await
}

/// Installs the minimal monitoring CRDs (idempotent) and waits until they are served.
async fn install_monitoring_crds() {
    kubectl_stdin_ok(
        [
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=dbpool-tests",
            "-f",
            "-",
        ],
        MONITORING_CRDS,
    )
    .await;
    kubectl_ok([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ])
    .await;
    // Established, and now also in kubectl's discovery (which a fresh process reads anew).
    wait_for(
        "the monitoring kinds to be discoverable",
        Duration::from_secs(30),
        || async {
            let out = kubectl([
                "api-resources",
                "--api-group=monitoring.coreos.com",
                "-o=name",
            ])
            .await;
            let names = String::from_utf8_lossy(&out.stdout).to_string();
            (names.contains("servicemonitors") && names.contains("prometheusrules")).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn helm_lint_passes_in_every_mode() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    let modes: [&[&str]; 3] = [&[], ALL_FEATURES, &["--set", "watchNamespace=apps"]];
    for extra in modes {
        let mut args = vec!["lint", "--strict", chart, "--namespace", "dbpool-system"];
        args.extend_from_slice(extra);
        let out = helm_ok(&args).await;
        assert!(out.contains("0 chart(s) failed"), "helm {args:?}:\n{out}");
    }
}

#[tokio::test]
async fn impossible_values_are_rejected_when_rendering() {
    let chart = chart_dir();
    let cases: [(&[&str], &str); 7] = [
        (
            &["--set", "leaderElection.enabled=false"],
            "replicaCount > 1 needs leaderElection.enabled",
        ),
        (
            &["--set", "watchNamespace=Not_A_Namespace"],
            "watchNamespace",
        ),
        (&["--set", "operator.logFormat=xml"], "logFormat"),
        (
            &["--set", "operator.statusRefresh=5 minutes"],
            "statusRefresh",
        ),
        (&["--set", "replicas=3"], "additional properties 'replicas'"),
        (&["--set", "operator.fleetGuard.share=2"], "share"),
        (&["--set", "operator.fleetGuard.window=1 minute"], "window"),
    ];
    for (extra, expected) in cases {
        let mut args: Vec<&str> = vec!["template", "x", chart.to_str().expect("UTF-8 path")];
        args.extend_from_slice(extra);
        let out = helm(&args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "helm {args:?} should fail mentioning {expected:?}; got {}:\n{stderr}",
            out.status
        );
    }
    // One replica without leader election is fine.
    let yaml = template(
        "x",
        "ops",
        &[
            "--set",
            "replicaCount=1",
            "--set",
            "leaderElection.enabled=false",
        ],
    )
    .await;
    let args = container_args(one(&parse_docs(&yaml), "Deployment"));
    assert!(!args.iter().any(|a| a.starts_with("--lease")), "{args:?}");
    assert!(!args.contains(&"--leader-elect".to_owned()), "{args:?}");
}

#[test]
fn chart_and_deploy_crds_are_identical_to_crds() {
    let crd = read("crds/dbpool.yaml");
    for copy in ["charts/dbpool-operator/crds/dbpool.yaml", "deploy/crd.yaml"] {
        assert!(
            read(copy) == crd,
            "{copy} differs from crds/dbpool.yaml: run deploy/render.sh"
        );
    }
}

#[tokio::test]
async fn default_render_passes_server_dry_run() {
    let client = client().await;
    let ns = TestNamespace::new(&client).await;
    let release = unique_name("pkg");
    let yaml = template(&release, ns.name(), &["--include-crds"]).await;
    let docs = parse_docs(&yaml);
    let mut expected: Vec<String> = DEFAULT_KINDS.iter().map(|k| k.to_string()).collect();
    expected.push("CustomResourceDefinition".into());
    expected.sort();
    assert_eq!(kinds(&docs), expected);
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let namespaced = !matches!(
            kind,
            "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        );
        assert_eq!(
            doc.pointer("/metadata/namespace").and_then(Value::as_str),
            namespaced.then_some(ns.name()),
            "{} sets its namespace explicitly",
            key(doc)
        );
    }
    let out = server_dry_run(&yaml).await;
    assert_eq!(
        out.matches("(server dry run)").count(),
        docs.len(),
        "every object dry-run applied:\n{out}"
    );
    ns.cleanup().await;
}

#[tokio::test]
async fn every_optional_feature_renders_and_passes_server_dry_run() {
    let client = client().await;
    install_monitoring_crds().await;
    let ns = TestNamespace::new(&client).await;
    let release = unique_name("pkg");
    let yaml = template(&release, ns.name(), ALL_FEATURES).await;
    let docs = parse_docs(&yaml);
    let mut expected: Vec<String> = DEFAULT_KINDS.iter().map(|k| k.to_string()).collect();
    expected.extend(["NetworkPolicy", "PrometheusRule", "ServiceMonitor"].map(String::from));
    expected.sort();
    assert_eq!(kinds(&docs), expected);

    // ServiceMonitor: scrapes the metrics Service's `metrics` port, keeping the pools' own
    // namespace/name labels.
    let service = one(&docs, "Service");
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(
        monitor.pointer("/spec/selector/matchLabels"),
        service.pointer("/spec/selector"),
        "the ServiceMonitor selects the metrics Service (its labels include the pod selector)"
    );
    for (k, v) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(service["metadata"]["labels"][k], *v);
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["honorLabels"], true);
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");

    // PrometheusRule: the three alerts, exactly.
    let rule = one(&docs, "PrometheusRule");
    let rules = rule
        .pointer("/spec/groups/0/rules")
        .and_then(Value::as_array)
        .expect("rules");
    let alerts: BTreeMap<&str, &Value> = rules
        .iter()
        .map(|r| (r["alert"].as_str().expect("alert name"), r))
        .collect();
    let expected_alerts = [
        (
            "DbPoolBreakerOpen",
            r#"max by (namespace, name) (dbpool_circuit_breaker_state{state="open"} and on (instance) (dbpool_leader == 1)) == 1"#,
            Some("60s"),
            "#dbpoolbreakeropen",
        ),
        (
            "DbPoolRecoveryAttemptsHigh",
            "floor(sum by (namespace, name) (increase(dbpool_recovery_attempts_total[10m]))) > 5",
            None,
            "#dbpoolrecoveryattemptshigh",
        ),
        (
            "DbPoolHealthCheckFailing",
            "max by (namespace, name) (dbpool_consecutive_failures and on (instance) (dbpool_leader == 1)) > 3",
            None,
            "#dbpoolhealthcheckfailing",
        ),
    ];
    assert_eq!(alerts.len(), expected_alerts.len(), "{alerts:?}");
    for (name, expr, for_, anchor) in expected_alerts {
        let alert = alerts
            .get(name)
            .unwrap_or_else(|| panic!("alert {name} missing"));
        assert_eq!(alert["expr"], expr, "{name}");
        assert_eq!(alert["for"].as_str(), for_, "{name}");
        assert_eq!(alert["labels"]["team"], "databases", "{name}");
        assert!(alert["labels"]["severity"].is_string(), "{name}");
        let annotations = &alert["annotations"];
        let runbook = annotations["runbook_url"].as_str().expect("runbook_url");
        assert!(
            runbook.ends_with(&format!("docs/operations.md{anchor}")),
            "{name}: {runbook}"
        );
        for text in ["summary", "description"] {
            let text = annotations[text].as_str().expect("annotation");
            assert!(
                text.contains("{{ $labels.namespace }}/{{ $labels.name }}"),
                "{name}: Prometheus templating survives Helm's: {text}"
            );
        }
    }

    // NetworkPolicy: ingress to metrics only; egress to DNS, the API server, PostgreSQL.
    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy.pointer("/spec/podSelector/matchLabels"),
        one(&docs, "Deployment").pointer("/spec/selector/matchLabels")
    );
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"port": "metrics", "protocol": "TCP"}]}])
    );
    let egress_ports: Vec<Value> = policy["spec"]["egress"]
        .as_array()
        .expect("egress")
        .iter()
        .map(|rule| rule["ports"].clone())
        .collect();
    assert_eq!(
        egress_ports,
        vec![
            json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]),
            json!([{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]),
            json!([{"port": 5432, "protocol": "TCP"}, {"port": 6432, "protocol": "TCP"}]),
        ]
    );

    // DNS: the cluster DNS pods and the node-local DNS cache (host network, link-local address).
    let dns_to = &policy["spec"]["egress"][0]["to"];
    assert_eq!(
        dns_to[0]["podSelector"]["matchLabels"]["k8s-app"], "kube-dns",
        "{dns_to}"
    );
    assert_eq!(
        dns_to[1],
        json!({"ipBlock": {"cidr": "169.254.20.10/32"}}),
        "{dns_to}"
    );

    // hostAliases: the pods' /etc/hosts entries, as given (hack/cluster.sh names its database so).
    assert_eq!(
        one(&docs, "Deployment").pointer("/spec/template/spec/hostAliases"),
        Some(&json!([{"ip": "10.213.9.10", "hostnames": ["orders-db.example.internal"]}]))
    );

    // PodDisruptionBudget: one replica at a time, selecting the Deployment's pods.
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb.pointer("/spec/selector/matchLabels"),
        one(&docs, "Deployment").pointer("/spec/selector/matchLabels")
    );

    let out = server_dry_run(&yaml).await;
    assert_eq!(
        out.matches("(server dry run)").count(),
        docs.len(),
        "every object dry-run applied:\n{out}"
    );

    // The monitoring schemas are strict enough to catch a broken template.
    let mut broken = monitor.clone();
    broken["spec"]["endpoints"][0]["interval"] = json!("30 seconds");
    let out = kubectl_stdin(
        ["apply", "--dry-run=server", "-f", "-"],
        &serde_json::to_string(&broken).expect("JSON"),
    )
    .await;
    assert!(!out.status.success(), "a malformed interval is rejected");
    ns.cleanup().await;
}

#[tokio::test]
async fn namespace_mode_grants_only_the_watched_namespace() {
    let client = client().await;
    let release_ns = TestNamespace::with_prefix(&client, "pkg-release").await;
    let watched = TestNamespace::with_prefix(&client, "pkg-watched").await;
    let release = unique_name("pkg");
    let yaml = template(
        &release,
        release_ns.name(),
        &["--set", &format!("watchNamespace={}", watched.name())],
    )
    .await;
    let docs = parse_docs(&yaml);
    assert!(of_kind(&docs, "ClusterRole").is_empty(), "no ClusterRole");
    assert!(
        of_kind(&docs, "ClusterRoleBinding").is_empty(),
        "no ClusterRoleBinding"
    );
    let fullname = format!("{release}-dbpool-operator");
    let roles: BTreeSet<String> = of_kind(&docs, "Role").into_iter().map(key).collect();
    assert_eq!(
        roles,
        BTreeSet::from([
            format!("Role/{}/{fullname}-leader-election", release_ns.name()),
            format!("Role/{}/{fullname}", watched.name()),
        ])
    );
    for binding in of_kind(&docs, "RoleBinding") {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": fullname, "namespace": release_ns.name()}])
        );
    }
    let args = container_args(one(&docs, "Deployment"));
    assert_eq!(flag(&args, "--namespace"), Some(watched.name()));

    let out = server_dry_run(&yaml).await;
    assert_eq!(
        out.matches("(server dry run)").count(),
        docs.len(),
        "every object dry-run applied:\n{out}"
    );
    release_ns.cleanup().await;
    watched.cleanup().await;
}

/// The rules of the operator's own (Cluster)Role: (apiGroup, resource) -> verbs.
fn operator_rules(role: &Value) -> BTreeMap<(String, String), Vec<String>> {
    let mut rules = BTreeMap::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                rules.insert((group.clone(), resource), strings(&rule["verbs"]));
            }
        }
    }
    rules
}

/// spec.gate's permissions and flag come only with gates.enabled, in both install modes.
#[tokio::test]
async fn gates_are_granted_only_when_enabled() {
    let services = (String::new(), "services".to_owned());
    let slices = ("discovery.k8s.io".to_owned(), "endpointslices".to_owned());
    // create: a server-side apply that makes the object is authorized as a create.
    let verbs = vec![
        "get".to_owned(),
        "create".to_owned(),
        "patch".to_owned(),
        "delete".to_owned(),
    ];

    let docs = parse_docs(&template("dbpool-operator", "dbpool-system", &[]).await);
    let rules = operator_rules(one(&docs, "ClusterRole"));
    assert!(!rules.contains_key(&services) && !rules.contains_key(&slices));
    let args = container_args(one(&docs, "Deployment"));
    assert_eq!(flag(&args, "--allow-gates-in"), None);

    let docs = parse_docs(
        &template(
            "dbpool-operator",
            "dbpool-system",
            &["--set", "gates.enabled=true"],
        )
        .await,
    );
    let rules = operator_rules(one(&docs, "ClusterRole"));
    assert_eq!(rules.get(&services), Some(&verbs));
    assert_eq!(rules.get(&slices), Some(&verbs));
    let args = container_args(one(&docs, "Deployment"));
    assert_eq!(flag(&args, "--allow-gates-in"), Some("*"));

    let docs = parse_docs(
        &template(
            "dbpool-operator",
            "dbpool-system",
            &[
                "--set",
                "watchNamespace=shop",
                "--set",
                "gates.enabled=true",
                "--set-json",
                r#"gates.allowedNamespaces=["shop"]"#,
            ],
        )
        .await,
    );
    let role = of_kind(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == "shop")
        .expect("the Role in the watched namespace");
    let rules = operator_rules(role);
    assert_eq!(rules.get(&services), Some(&verbs));
    assert_eq!(rules.get(&slices), Some(&verbs));
    let args = container_args(one(&docs, "Deployment"));
    assert_eq!(flag(&args, "--allow-gates-in"), Some("shop"));
}

/// `kubectl apply -k` of deploy/ as the base of an overlay that moves it into the test's
/// namespace: plain `kubectl apply -k deploy/ --dry-run=server` cannot pass on a cluster without
/// the dbpool-system namespace, because a server-side dry run does not create the Namespace the
/// other objects go into. The overlay is what a user with another namespace writes, and shows
/// that moving the base keeps its objects consistent (bindings, the Lease namespace).
#[tokio::test]
async fn kustomize_base_passes_server_dry_run() {
    let client = client().await;
    let ns = TestNamespace::new(&client).await;
    let overlay = tempfile::tempdir().expect("temporary directory");
    let base = relative_path(overlay.path(), &deploy_dir());
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {}\nresources:\n  - {}\n",
            ns.name(),
            base.display()
        ),
    )
    .expect("writing the overlay");
    let overlay_dir = overlay.path().to_str().expect("UTF-8 path");

    let built = parse_docs(&kubectl_ok(["kustomize", overlay_dir]).await);
    for doc in &built {
        let kind = doc["kind"].as_str().unwrap_or_default();
        match kind {
            "Namespace" => assert_eq!(doc["metadata"]["name"], ns.name()),
            "ClusterRole" | "CustomResourceDefinition" => {}
            "ClusterRoleBinding" | "RoleBinding" => {
                assert_eq!(doc["subjects"][0]["namespace"], ns.name(), "{}", key(doc))
            }
            _ => assert_eq!(doc["metadata"]["namespace"], ns.name(), "{}", key(doc)),
        }
    }
    let out = kubectl(["apply", "-k", overlay_dir, "--dry-run=server"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply -k: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("(server dry run)").count(),
        built.len(),
        "{stdout}"
    );
    ns.cleanup().await;
}

/// deploy/ is the chart's defaults (release dbpool-operator, namespace dbpool-system) plus the
/// Namespace, object for object.
#[tokio::test]
async fn deploy_is_the_charts_defaults() {
    let deploy = deploy_dir();
    let built = parse_docs(&kubectl_ok(["kustomize", deploy.to_str().expect("UTF-8 path")]).await);
    let mut expected =
        parse_docs(&template("dbpool-operator", "dbpool-system", &["--include-crds"]).await);
    expected.extend(parse_docs(&read("deploy/namespace.yaml")));
    // kustomize writes a float with an integral value (`minimum: 1.0` in the CRD) as an integer.
    let built: Vec<Value> = built.into_iter().map(integral_floats_as_integers).collect();
    let expected: Vec<Value> = expected
        .into_iter()
        .map(integral_floats_as_integers)
        .collect();
    let (built, expected) = (by_key(&built), by_key(&expected));
    assert_eq!(
        built.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "deploy/ has other objects than the chart: run deploy/render.sh"
    );
    for (k, object) in &expected {
        assert!(
            built[k] == *object,
            "{k} in deploy/ differs from the chart's: run deploy/render.sh\ndeploy/: {}\nchart: {}",
            serde_json::to_string_pretty(&built[k]).unwrap_or_default(),
            serde_json::to_string_pretty(object).unwrap_or_default()
        );
    }
    let namespace = &built["Namespace//dbpool-system"];
    assert_eq!(namespace["apiVersion"], "v1");
}

fn integral_floats_as_integers(value: Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => items.into_iter().map(integral_floats_as_integers).collect(),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, integral_floats_as_integers(v)))
                .collect(),
        ),
        other => other,
    }
}

#[tokio::test]
async fn the_deployment_is_hardened_and_wired_as_documented() {
    let docs = parse_docs(&template("dbpool-operator", "dbpool-system", &[]).await);
    let deployment = one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        container["image"],
        format!("ghcr.io/dbpool/dbpool-operator:{}", app_version())
    );
    assert_eq!(
        pod["serviceAccountName"],
        one(&docs, "ServiceAccount")["metadata"]["name"]
    );

    // Pod and container security.
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    let csc = &container["securityContext"];
    assert_eq!(csc["runAsNonRoot"], true);
    assert_eq!(csc["runAsUser"], 65532);
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    assert_eq!(csc["capabilities"]["drop"], json!(["ALL"]));
    assert!(csc["capabilities"].get("add").is_none());
    assert_eq!(csc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}})
    );

    // Arguments: exactly the flags of `dbpool-operator run`.
    assert_eq!(
        container_args(deployment),
        [
            "run",
            "--leader-elect",
            "--lease-name=dbpool-operator",
            "--lease-namespace=$(POD_NAMESPACE)",
            "--metrics-addr=0.0.0.0:8080",
            "--max-concurrent-probes=64",
            "--status-refresh=5m",
            "--fleet-guard=true",
            "--fleet-guard-share=0.5",
            "--fleet-guard-min-targets=3",
            "--fleet-guard-window=1m",
            "--fleet-guard-max-hold=10m",
            "--log-format=json",
        ]
    );
    // POD_NAME names the instance; POD_NAMESPACE (the release namespace) is the Lease's.
    assert_eq!(
        container["env"],
        json!([
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ])
    );
    assert_eq!(
        container["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": path, "port": "metrics"}),
            "{probe}"
        );
    }
    let service = one(&docs, "Service");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}])
    );

    // The image is configurable: a tag, or a digest that wins over it.
    let docs = parse_docs(
        &template(
            "x",
            "ops",
            &[
                "--set",
                "image.repository=registry.example/dbpool",
                "--set",
                "image.tag=1.2.3",
            ],
        )
        .await,
    );
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/dbpool:1.2.3"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    let docs = parse_docs(
        &template(
            "x",
            "ops",
            &[
                "--set",
                "image.tag=1.2.3",
                "--set",
                &format!("image.digest={digest}"),
            ],
        )
        .await,
    );
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/dbpool/dbpool-operator@{digest}")
    );
}

/// The binary parses every argument the chart passes, in every mode: it gets as far as reading
/// its (here missing) kubeconfig, which comes after argument parsing.
#[tokio::test]
async fn the_binary_accepts_the_charts_arguments() {
    let modes: [&[&str]; 4] = [
        &[],
        &[
            "--set",
            "watchNamespace=apps",
            "--set",
            "operator.logFormat=text",
        ],
        &[
            "--set",
            "replicaCount=1",
            "--set",
            "leaderElection.enabled=false",
        ],
        &[
            "--set",
            "gates.enabled=true",
            "--set-json",
            r#"gates.allowedNamespaces=["shop","billing"]"#,
        ],
    ];
    for extra in modes {
        let docs = parse_docs(&template("dbpool-operator", "dbpool-system", extra).await);
        let args = container_args(one(&docs, "Deployment"));
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dbpool-operator"))
            .args(&args)
            .arg("--kubeconfig=/nonexistent/dbpool-packaging-test")
            .env("POD_NAME", "dbpool-operator-0")
            .env("POD_NAMESPACE", "dbpool-system")
            .env_remove("KUBECONFIG")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("running the binary");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "dbpool-operator {args:?} should parse its arguments and then fail on the \
             kubeconfig:\n{output}"
        );
        assert!(
            output.contains("/nonexistent/dbpool-packaging-test"),
            "{args:?}: {output}"
        );
    }
}
