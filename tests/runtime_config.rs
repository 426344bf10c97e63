//! Run-time configuration (issue 28): spec changes apply without a restart. This file holds the
//! field groups no other test covers (the table in docs/operations.md names the test of each):
//! a changed `spec.database` is probed at once, not at the next interval.

use std::time::Duration;

use dbpool_operator::{
    api::{DbPool, Phase},
    controller::RunningOperator,
};
use dbpool_testkit as support;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use support::{
    kube::namespace_with_secret,
    pools::{create, pool, wait_status},
    postgres::{APP_PASSWORD, PgServer},
    proxy::FaultProxy,
    wait::wait_until,
};

const SECRET: &str = "db";
const KEY: &str = "password";

/// A healthy pool probed once an hour moves to another address (another proxy in front of the
/// same server): the new address is probed within seconds, not after the hour.
#[tokio::test]
async fn a_changed_database_is_probed_at_once() {
    let (client, ns) = namespace_with_secret(SECRET, KEY, APP_PASSWORD).await;
    let pg = PgServer::start().await;
    let old = FaultProxy::start(pg.addr()).await;
    let new = FaultProxy::start(pg.addr()).await;
    let _op = RunningOperator::start(client.clone(), ns.name());
    let spec = pool(
        "moving",
        old.port(),
        Some((SECRET, KEY)),
        serde_json::json!({ "healthCheck": { "interval": "1h", "timeout": "2s" } }),
    );
    create(&client, ns.name(), &spec).await;
    wait_status(
        &client,
        ns.name(),
        "moving",
        "Healthy",
        Duration::from_secs(30),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    assert_eq!(new.accepted_total(), 0);
    let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
    let patch = serde_json::json!({ "spec": { "database": { "port": new.port() } } });
    api.patch("moving", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch DbPool");
    wait_until(
        "the new address probed",
        Duration::from_secs(10),
        || async { new.accepted_total() > 0 },
    )
    .await;
    ns.cleanup().await;
}
