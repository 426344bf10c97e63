//! The nemesis: carries out a [`Plan`]'s steps at their offsets, each in a task of its own, so
//! faults overlap; records every fault's window and every user action it made.
//!
//! Lives here: [`run`] and one function per kind of operation. A step whose precondition fails
//! (no leader found, the pool gone, the apiserver down for an edit) is skipped and said so; it
//! records nothing. Must not live here: the schedule (the library's `plan`), judging.

use std::{sync::Arc, time::Duration};

use dbpool_api::{DbPool, FORCE_REOPEN_ANNOTATION};
use dbpool_soak::{
    history::{ActionKind, FaultKind, Scope},
    plan::{Op, Plan},
};
use dbpool_testkit::proxy::Mode;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    controlplane::signal,
    world::{LivePool, NAMESPACES, World, new_password, settle, superuser_query},
};

/// Runs every step of `plan` from now; returns when every step (and every fault's undo) is done.
pub async fn run(world: Arc<World>, plan: &Plan) {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for step in plan.steps.clone() {
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms as u64)).await;
        let world = world.clone();
        tasks.push(tokio::spawn(async move {
            let name = step.op.name();
            if let Err(e) = apply(&world, step.op).await {
                eprintln!("[soak] step {name} at {}ms skipped: {e}", step.at_ms);
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            eprintln!("[soak] a nemesis task failed: {e}");
        }
    }
}

async fn apply(world: &World, op: Op) -> Result<(), String> {
    match op {
        Op::Db {
            target,
            kind,
            hold_ms,
            param,
        } => db_fault(world, target, kind, hold_ms, param).await,
        Op::Rotate {
            target,
            server_first,
            gap_ms,
        } => rotate(world, target, server_first, gap_ms).await,
        Op::ApiserverRestart => {
            let i = world.rec.begin(
                FaultKind::ApiserverRestart,
                Scope::ControlPlane,
                String::new(),
            );
            let result = world.cp.lock().await.restart_apiserver().await;
            world.rec.end(i);
            result
        }
        Op::EtcdFreeze { hold_ms } => {
            let i = world.rec.begin(
                FaultKind::EtcdFreeze,
                Scope::ControlPlane,
                format!("{hold_ms}ms"),
            );
            signal(world.etcd_pid, "STOP");
            sleep(hold_ms).await;
            signal(world.etcd_pid, "CONT");
            world.rec.end(i);
            Ok(())
        }
        Op::LeaderKill { hold_ms } => leader_kill(world, hold_ms).await,
        Op::LeaderStop { hold_ms } => leader_stop(world, hold_ms).await,
        Op::OperatorCut { hold_ms } => operator_cut(world, hold_ms).await,
        Op::Token { pool } => {
            let p = pick(world, pool)?;
            let token = format!("soak-{}-{}", world.seed, world.next());
            let patch =
                json!({ "metadata": { "annotations": { FORCE_REOPEN_ANNOTATION: token } } });
            edit(world, &p, patch, ActionKind::Token(token)).await
        }
        Op::Mode {
            pool,
            mode,
            hold_ms,
        } => {
            let p = pick(world, pool)?;
            let patch = |m: &str| json!({ "spec": { "breaker": { "mode": m } } });
            edit(world, &p, patch(&mode), ActionKind::Mode(mode.clone())).await?;
            sleep(hold_ms).await;
            undo(world, &p, patch("Auto"), ActionKind::Mode("Auto".into())).await
        }
        Op::Threshold { pool, value } => {
            let p = pick(world, pool)?;
            edit(
                world,
                &p,
                json!({ "spec": { "breaker": { "failureThreshold": value } } }),
                ActionKind::Threshold(value),
            )
            .await
        }
        Op::OpenTimeout { pool, value } => {
            let p = pick(world, pool)?;
            let patch = json!({ "spec": { "breaker": { "openTimeout": value } } });
            edit(world, &p, patch, ActionKind::OpenTimeout(value)).await
        }
        Op::Interval { pool, value } => {
            let p = pick(world, pool)?;
            let patch = json!({ "spec": { "healthCheck": { "interval": value } } });
            edit(world, &p, patch, ActionKind::Interval(value)).await
        }
        Op::Create { target, ns } => {
            let ns = NAMESPACES[ns % NAMESPACES.len()];
            let name = format!("c{}", world.next());
            let at = world
                .create_pool(ns, &name, target % world.targets.len(), false, false)
                .await?;
            world
                .rec
                .action_at(&format!("{ns}/{name}"), ActionKind::Create, at);
            Ok(())
        }
        Op::Delete { pool } => delete(world, pool).await,
        Op::Gate { pool, hold_ms } => {
            let gated: Vec<LivePool> = world
                .live(false)
                .into_iter()
                .filter(|p| p.ns == NAMESPACES[0])
                .collect();
            let p = gated
                .get(pool % gated.len().max(1))
                .cloned()
                .ok_or("no pool in the gated namespace")?;
            let on = json!({ "spec": { "gate": { "serviceName": format!("gate-{}", p.name), "port": 5432 } } });
            edit(world, &p, on, ActionKind::Gate(true)).await?;
            sleep(hold_ms).await;
            undo(
                world,
                &p,
                json!({ "spec": { "gate": null } }),
                ActionKind::Gate(false),
            )
            .await
        }
    }
}

async fn sleep(ms: i64) {
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
}

fn pick(world: &World, index: usize) -> Result<LivePool, String> {
    let live = world.live(false);
    live.get(index % live.len().max(1))
        .cloned()
        .ok_or_else(|| "no pool".to_owned())
}

/// An edit (an idempotent merge patch), recorded at the instant it took effect; sent again for
/// up to 30s if the apiserver's answer leaves that open (`world::settle`).
async fn edit(
    world: &World,
    p: &LivePool,
    patch: serde_json::Value,
    kind: ActionKind,
) -> Result<(), String> {
    edit_for(world, p, patch, kind, 30).await
}

async fn edit_for(
    world: &World,
    p: &LivePool,
    patch: serde_json::Value,
    kind: ActionKind,
    tries: u32,
) -> Result<(), String> {
    let api: Api<DbPool> = Api::namespaced(world.client.clone(), &p.ns);
    let at = settle(tries, "", || async {
        api.patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await?;
    world.rec.action_at(&p.key, kind, at);
    Ok(())
}

/// An edit that ends a window (mode back to Auto, gate off): sent for up to a minute, since the
/// apiserver may be restarting just then (a long run once left two pools ForcedOpen that way).
async fn undo(
    world: &World,
    p: &LivePool,
    patch: serde_json::Value,
    kind: ActionKind,
) -> Result<(), String> {
    edit_for(world, p, patch, kind, 60).await
}

async fn delete(world: &World, index: usize) -> Result<(), String> {
    let p = pick(world, index)?;
    if world.live(false).len() <= 30 {
        return Err("keeping at least 30 pools".into());
    }
    let api: Api<DbPool> = Api::namespaced(world.client.clone(), &p.ns);
    let at = settle(30, "NotFound", || async {
        api.delete(&p.name, &DeleteParams::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await?;
    world.rec.action_at(&p.key, ActionKind::Delete, at);
    world
        .pools
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|x| x.key != p.key);
    Ok(())
}

async fn db_fault(
    world: &World,
    t: usize,
    kind: FaultKind,
    hold_ms: i64,
    param: u64,
) -> Result<(), String> {
    let target = &world.targets[t % world.targets.len()];
    let scope = Scope::Target(target.name.clone());
    let mut pg = target.pg.lock().await;
    match kind {
        FaultKind::DbKill | FaultKind::DbStop => {
            let i = world.rec.begin(kind, scope, format!("{hold_ms}ms"));
            if kind == FaultKind::DbKill {
                pg.kill().await
            } else {
                pg.stop().await
            }
            sleep(hold_ms).await;
            pg.start().await;
            world.rec.end(i);
        }
        FaultKind::DbRestart => {
            let i = world.rec.begin(kind, scope, String::new());
            pg.restart().await;
            world.rec.end(i);
        }
        FaultKind::MaxConnections => {
            let i = world.rec.begin(kind, scope, format!("{hold_ms}ms"));
            let held = target.fill().await;
            eprintln!(
                "[soak] {} holds {} filler sessions",
                target.name,
                held.len()
            );
            sleep(hold_ms).await;
            drop(held);
            world.rec.end(i);
        }
        FaultKind::BlackHole | FaultKind::Refuse | FaultKind::Latency => {
            let mode = match kind {
                FaultKind::BlackHole => Mode::BlackHole,
                FaultKind::Refuse => Mode::Refuse,
                _ => Mode::Delay(Duration::from_millis(param)),
            };
            let i = world
                .rec
                .begin(kind, scope, format!("{hold_ms}ms {mode:?}"));
            target.proxy.set_mode(mode).await;
            if kind == FaultKind::Refuse {
                target.proxy.cut_all().await;
            }
            sleep(hold_ms).await;
            target.proxy.set_mode(Mode::Pass).await;
            if kind == FaultKind::BlackHole {
                // What the hole swallowed left those sessions out of step: reset them.
                target.proxy.cut_all().await;
            }
            world.rec.end(i);
        }
        other => return Err(format!("{other:?} is not a database fault")),
    }
    Ok(())
}

async fn set_secrets(world: &World, t: usize, password: &str) -> Result<(), String> {
    let name = format!("db-{}", world.targets[t].name);
    for ns in NAMESPACES {
        let api: Api<Secret> = Api::namespaced(world.client.clone(), ns);
        let patch = json!({ "stringData": { "password": password } });
        // Sent until accepted: a rotation left half done would leave the pools a wrong password.
        settle(30, "", || async {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await?;
    }
    Ok(())
}

async fn rotate(world: &World, t: usize, server_first: bool, gap_ms: i64) -> Result<(), String> {
    let t = t % world.targets.len();
    let target = &world.targets[t];
    let _pg = target.pg.lock().await;
    let password = new_password();
    world
        .passwords
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(password.clone());
    let alter = format!("ALTER ROLE app PASSWORD '{password}'");
    let scope = Scope::Target(target.name.clone());
    let order = if server_first {
        "server first"
    } else {
        "Secrets first"
    };
    let i = world
        .rec
        .begin(FaultKind::SecretRotation, scope, order.to_owned());
    let result = if server_first {
        let first = superuser_query(target.direct_port, &alter).await;
        sleep(gap_ms).await;
        first.and(set_secrets(world, t, &password).await)
    } else {
        let first = set_secrets(world, t, &password).await;
        sleep(gap_ms).await;
        first.and(
            superuser_query(target.direct_port, &alter)
                .await
                .map(|_| ()),
        )
    };
    // A rotation left half done (the server's password or a Secret not changed) is a fault
    // still in force: left open, so the checkers name it instead of judging a false truth.
    if result.is_ok() {
        world.rec.end(i);
    }
    *target.password.lock().unwrap_or_else(|e| e.into_inner()) = password;
    result.map(|_| ())
}

async fn leader_kill(world: &World, hold_ms: i64) -> Result<(), String> {
    let l = world
        .leader(Duration::from_secs(10))
        .await
        .ok_or("no leader")?;
    let replica = &world.replicas[l];
    let i = world.rec.begin(
        FaultKind::LeaderKill,
        Scope::Operator(replica.id.clone()),
        replica.subject(),
    );
    replica.kill();
    sleep(hold_ms).await;
    let result = replica.start(&world.operator_bin);
    world.rec.end(i);
    result
}

async fn leader_stop(world: &World, hold_ms: i64) -> Result<(), String> {
    let l = world
        .leader(Duration::from_secs(10))
        .await
        .ok_or("no leader")?;
    let replica = &world.replicas[l];
    let pid = replica.pid().ok_or("no process")?;
    let i = world.rec.begin(
        FaultKind::LeaderStop,
        Scope::Operator(replica.id.clone()),
        replica.subject(),
    );
    signal(pid, "STOP");
    sleep(hold_ms).await;
    signal(pid, "CONT");
    world.rec.end(i);
    Ok(())
}

async fn operator_cut(world: &World, hold_ms: i64) -> Result<(), String> {
    let l = world
        .leader(Duration::from_secs(10))
        .await
        .ok_or("no leader")?;
    let replica = &world.replicas[l];
    let i = world.rec.begin(
        FaultKind::OperatorCut,
        Scope::Operator(replica.id.clone()),
        replica.subject(),
    );
    replica.proxy.set_mode(Mode::BlackHole).await;
    sleep(hold_ms).await;
    replica.proxy.set_mode(Mode::Pass).await;
    replica.proxy.cut_all().await;
    world.rec.end(i);
    Ok(())
}
