//! The gate of `spec.gate`: a selector-less Service and its EndpointSlice, kept in step with the
//! circuit breaker, so applications in any language fail fast while the breaker is open.
//!
//! Lives here: what the gate should look like ([`desired_service`], [`desired_slice`],
//! [`endpoints_ready`]: pure, unit-tested), the ownership rule ([`owned_by`]), [`sync`] (read,
//! refuse to touch what is not ours, write through the [`Door`] only when something differs, and
//! remove a gate the spec no longer declares), and the `Gate` condition ([`GateOutcome::condition`]).
//! Must not live here: deciding the breaker (`dbpool-recovery`), probing (`dbpool-probe`),
//! assembling the status (`status`).
//!
//! Safety (CVE-2021-25740): the EndpointSlice only ever holds the address at which the
//! operator's own probe authenticated to the declared database (`ProbeReport::peer`), never an
//! address read from the spec, and gates exist only where `--allow-gates-in` allows them.

use std::net::SocketAddr;

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use tracing::{debug, info};

use super::{Error, FIELD_MANAGER, api_permits::Priority, config::GateAllowlist, fence::Door};
use crate::api::{BreakerState, DbPool, GateSpec};

mod outcome;
pub use outcome::GateOutcome;

/// Label every EndpointSlice of a Service carries, naming the Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the controller that manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "dbpool.io";
/// Name of the one port of the Service and the EndpointSlice.
pub const PORT_NAME: &str = "postgres";

/// Whether the gate's endpoints are ready in this breaker state. Closed: ready. Open (also
/// ForcedOpen and holds): not ready, so kube-proxy rejects. **HalfOpen: not ready.** A half-open
/// breaker is running trial probes against a database that has just failed; admitting every
/// application at that moment is the reconnect herd the trial exists to avoid, and the trial is
/// the operator's own probe, which never goes through the gate. With the default
/// `successThreshold: 1` half-open lasts one probe.
pub fn endpoints_ready(breaker: BreakerState) -> bool {
    breaker == BreakerState::Closed
}

/// The name of the gate's EndpointSlice.
pub fn slice_name(gate: &GateSpec) -> String {
    format!("{}-dbpool", gate.service_name)
}

/// Whether `meta` names `pool` (by uid) as its controlling owner.
pub fn owned_by(meta: &ObjectMeta, pool: &DbPool) -> bool {
    let Some(uid) = pool.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == uid && r.controller == Some(true) && r.kind == "DbPool")
}

fn owner_reference(pool: &DbPool) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: DbPool::api_version(&()).into_owned(),
        kind: DbPool::kind(&()).into_owned(),
        name: pool.name_any(),
        uid: pool.metadata.uid.clone()?,
        controller: Some(true),
        // No blockOwnerDeletion: it would need update on dbpools/finalizers, and nothing should
        // wait for the gate when its DbPool goes.
        block_owner_deletion: None,
    })
}

/// The selector-less Service of `gate`, owned by `pool`. Its port forwards to `target_port` (the
/// database's port).
pub fn desired_service(pool: &DbPool, gate: &GateSpec, target_port: u16) -> Option<Service> {
    Some(Service {
        metadata: ObjectMeta {
            name: Some(gate.service_name.clone()),
            namespace: pool.namespace(),
            owner_references: Some(vec![owner_reference(pool)?]),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    MANAGED_BY.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: gate.port,
                protocol: Some("TCP".into()),
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                        target_port,
                    )),
                ),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The EndpointSlice of `gate`: `peer` (the address the probe authenticated at), ready as
/// [`endpoints_ready`] says; no endpoint at all while no probe has logged in.
pub fn desired_slice(
    pool: &DbPool,
    gate: &GateSpec,
    peer: Option<SocketAddr>,
    ready: bool,
) -> Option<EndpointSlice> {
    let address_type = match peer {
        Some(SocketAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(gate)),
            namespace: pool.namespace(),
            owner_references: Some(vec![owner_reference(pool)?]),
            labels: Some(
                [
                    (SERVICE_NAME_LABEL.to_owned(), gate.service_name.clone()),
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints: peer
            .map(|peer| Endpoint {
                addresses: vec![peer.ip().to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
                ..Endpoint::default()
            })
            .into_iter()
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some(PORT_NAME.into()),
            port: peer.map(|p| i32::from(p.port())),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    })
}

/// The address and readiness an existing slice holds (its first endpoint), for comparison and
/// for keeping the address across an operator restart.
fn slice_peer(slice: &EndpointSlice) -> Option<(SocketAddr, bool)> {
    let endpoint = slice.endpoints.first()?;
    let ip: std::net::IpAddr = endpoint.addresses.first()?.parse().ok()?;
    let port = slice.ports.as_ref()?.first()?.port?;
    let ready = endpoint.conditions.as_ref().and_then(|c| c.ready)?;
    Some((SocketAddr::new(ip, u16::try_from(port).ok()?), ready))
}

fn service_matches(existing: &Service, desired: &Service) -> bool {
    let ports = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|spec| spec.ports.clone())
            .map(|ports| {
                ports
                    .into_iter()
                    .map(|p| (p.name, p.port, p.target_port))
                    .collect::<Vec<_>>()
            })
    };
    ports(existing) == ports(desired)
        && existing
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_none()
}

/// What writing a gate needs.
pub(crate) struct GateIo<'a> {
    /// The apiserver client.
    pub client: &'a kube::Client,
    /// The one door every write passes (leader check, request budget).
    pub door: &'a Door,
    /// The namespaces where gates are allowed (`--allow-gates-in`).
    pub allowlist: &'a GateAllowlist,
}

/// Brings the gate of `pool` in line with the breaker. `peer` is the address of the last probe
/// that logged in (None: not known to this process; an existing slice of ours keeps its
/// address then, so an operator restart does not empty the gate). `applied` is the Service name
/// this process last made for the pool; a different or undeclared one is deleted if ours.
/// Every write goes through the [`Door`]; a non-leader writes nothing.
pub(crate) async fn sync(
    io: &GateIo<'_>,
    pool: &DbPool,
    breaker: BreakerState,
    peer: Option<SocketAddr>,
    applied: &mut Option<String>,
) -> GateOutcome {
    let namespace = pool.namespace().unwrap_or_default();
    let declared = pool
        .spec
        .gate
        .as_ref()
        .filter(|_| io.allowlist.allows(&namespace));
    if let Some(old) = applied.clone()
        && declared.is_none_or(|g| g.service_name != old)
    {
        match remove(io, pool, &namespace, &old).await {
            Ok(true) => *applied = None,
            Ok(false) => {}
            Err(e) => return GateOutcome::Failed(format!("removing the old gate {old}: {e}")),
        }
    }
    let Some(gate) = pool.spec.gate.as_ref() else {
        return GateOutcome::NotDeclared;
    };
    if declared.is_none() {
        return GateOutcome::NotAllowed;
    }
    match apply(io, pool, &namespace, gate, breaker, peer).await {
        Ok(outcome) => {
            if matches!(outcome, GateOutcome::Synced { .. }) {
                *applied = Some(gate.service_name.clone());
            }
            outcome
        }
        Err(e) => GateOutcome::Failed(format!("writing the gate {}: {e}", gate.service_name)),
    }
}

async fn get_opt<K>(
    io: &GateIo<'_>,
    api: &Api<K>,
    namespace: &str,
    name: &str,
) -> Result<Option<K>, Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _permit = io.door.permits().acquire(Priority::First, namespace).await;
    Ok(api.get_opt(name).await?)
}

async fn apply(
    io: &GateIo<'_>,
    pool: &DbPool,
    namespace: &str,
    gate: &GateSpec,
    breaker: BreakerState,
    peer: Option<SocketAddr>,
) -> Result<GateOutcome, Error> {
    let services: Api<Service> = Api::namespaced(io.client.clone(), namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(io.client.clone(), namespace);
    let existing_service = get_opt(io, &services, namespace, &gate.service_name).await?;
    if let Some(foreign) = foreign(existing_service.as_ref(), pool, "Service") {
        return Ok(foreign);
    }
    let name = slice_name(gate);
    let existing_slice = get_opt(io, &slices, namespace, &name).await?;
    if let Some(foreign) = foreign(existing_slice.as_ref(), pool, "EndpointSlice") {
        return Ok(foreign);
    }
    let ready = endpoints_ready(breaker);
    let peer = peer.or_else(|| existing_slice.as_ref().and_then(slice_peer).map(|(p, _)| p));
    let target_port = peer.map_or(5432, |p| p.port());
    let (Some(service), Some(slice)) = (
        desired_service(pool, gate, target_port),
        desired_slice(pool, gate, peer, ready),
    ) else {
        return Ok(GateOutcome::Failed("the DbPool has no uid yet".into()));
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if existing_service
        .as_ref()
        .is_none_or(|existing| !service_matches(existing, &service))
    {
        io.door
            .send(
                Priority::First,
                namespace,
                services.patch(&gate.service_name, &params, &Patch::Apply(&service)),
            )
            .await?;
        info!(service = %gate.service_name, namespace, "gate Service written");
    }
    let current = existing_slice.as_ref().is_some_and(|existing| {
        existing.address_type == slice.address_type
            && slice_peer(existing) == peer.map(|p| (p, ready))
            && (peer.is_some() || existing.endpoints.is_empty())
    });
    if current {
        debug!(slice = %name, namespace, "gate unchanged");
    } else if write_slice(io, &slices, existing_slice.as_ref(), &slice).await? {
        info!(slice = %name, namespace, ?peer, ready, "gate endpoints written");
    }
    Ok(GateOutcome::Synced { peer, ready })
}

/// [`GateOutcome::NotOwned`] when `existing` is someone else's object.
fn foreign<K: Resource>(
    existing: Option<&K>,
    pool: &DbPool,
    kind: &'static str,
) -> Option<GateOutcome> {
    let existing = existing?;
    (!owned_by(existing.meta(), pool)).then(|| GateOutcome::NotOwned {
        kind,
        name: existing.meta().name.clone().unwrap_or_default(),
    })
}

/// Writes `slice` over `existing`. addressType is immutable: a database that moved to the other
/// family gets a new slice (the old one deleted first). Ok(false): not leading.
async fn write_slice(
    io: &GateIo<'_>,
    slices: &Api<EndpointSlice>,
    existing: Option<&EndpointSlice>,
    slice: &EndpointSlice,
) -> Result<bool, Error> {
    let name = slice.name_any();
    let namespace = slice.namespace().unwrap_or_default();
    let namespace = namespace.as_str();
    if let Some(existing) = existing
        && existing.address_type != slice.address_type
    {
        let params = DeleteParams::default();
        io.door
            .send(Priority::First, namespace, slices.delete(&name, &params))
            .await?;
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(slice);
    io.door
        .send(
            Priority::First,
            namespace,
            slices.patch(&name, &params, &patch),
        )
        .await
}

/// Deletes the Service `name` and its slice if (and only if) they are ours. Ok(true): gone.
async fn remove(
    io: &GateIo<'_>,
    pool: &DbPool,
    namespace: &str,
    name: &str,
) -> Result<bool, Error> {
    let services: Api<Service> = Api::namespaced(io.client.clone(), namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(io.client.clone(), namespace);
    let slice = format!("{name}-dbpool");
    let mut gone = true;
    if let Some(existing) = get_opt(io, &slices, namespace, &slice).await?
        && owned_by(&existing.metadata, pool)
    {
        let params = delete_exactly(existing.metadata.uid);
        gone &= io
            .door
            .send(Priority::First, namespace, slices.delete(&slice, &params))
            .await?;
    }
    if let Some(existing) = get_opt(io, &services, namespace, name).await?
        && owned_by(&existing.metadata, pool)
    {
        let params = delete_exactly(existing.metadata.uid);
        gone &= io
            .door
            .send(Priority::First, namespace, services.delete(name, &params))
            .await?;
        info!(service = %name, namespace, "gate Service removed");
    }
    Ok(gone)
}

/// Delete options that only delete the very object read (by uid).
fn delete_exactly(uid: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::reason;

    fn pool(gate: Option<GateSpec>) -> DbPool {
        let mut pool: DbPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "dbpool.io/v1alpha1",
            "kind": "DbPool",
            "metadata": { "name": "orders", "namespace": "shop", "uid": "u-1" },
            "spec": { "database": { "host": "db.shop.svc", "dbname": "orders", "user": "app" } }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        pool.spec.gate = gate;
        pool
    }

    fn gate() -> GateSpec {
        GateSpec {
            service_name: "orders-gate".into(),
            port: 5432,
        }
    }

    #[test]
    fn only_a_closed_breaker_makes_endpoints_ready() {
        assert!(endpoints_ready(BreakerState::Closed));
        assert!(!endpoints_ready(BreakerState::Open));
        assert!(!endpoints_ready(BreakerState::HalfOpen));
    }

    #[test]
    fn the_slice_holds_the_probed_address_with_the_breakers_readiness() {
        let pool = pool(Some(gate()));
        let peer: SocketAddr = "10.1.2.3:6432".parse().unwrap_or_else(|e| panic!("{e}"));
        let slice =
            desired_slice(&pool, &gate(), Some(peer), false).unwrap_or_else(|| panic!("a slice"));
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints[0].addresses, vec!["10.1.2.3".to_owned()]);
        let conditions = slice.endpoints[0].conditions.clone().unwrap_or_default();
        assert_eq!(conditions.ready, Some(false));
        assert_eq!(conditions.serving, Some(false));
        assert_eq!(slice_peer(&slice), Some((peer, false)));
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels[SERVICE_NAME_LABEL], "orders-gate");
        assert_eq!(labels[MANAGED_BY_LABEL], "dbpool.io");
        assert!(owned_by(&slice.metadata, &pool));
        let v6: SocketAddr = "[fd00::5]:5432".parse().unwrap_or_else(|e| panic!("{e}"));
        let slice =
            desired_slice(&pool, &gate(), Some(v6), true).unwrap_or_else(|| panic!("a slice"));
        assert_eq!(slice.address_type, "IPv6");
    }

    #[test]
    fn without_a_login_the_slice_is_empty() {
        let slice = desired_slice(&pool(Some(gate())), &gate(), None, true)
            .unwrap_or_else(|| panic!("a slice"));
        assert!(slice.endpoints.is_empty());
    }

    #[test]
    fn the_service_has_no_selector_and_forwards_to_the_database_port() {
        let pool = pool(Some(gate()));
        let service = desired_service(&pool, &gate(), 6432).unwrap_or_else(|| panic!("a Service"));
        let spec = service.spec.clone().unwrap_or_default();
        assert!(spec.selector.is_none());
        let port = &spec.ports.unwrap_or_default()[0];
        assert_eq!(port.port, 5432);
        assert_eq!(
            port.target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(6432))
        );
        assert!(owned_by(&service.metadata, &pool));
        let mut other = pool.clone();
        other.metadata.uid = Some("u-2".into());
        assert!(!owned_by(&service.metadata, &other));
    }

    #[test]
    fn conditions_name_the_reason() {
        let g = gate();
        assert_eq!(GateOutcome::NotDeclared.condition(None), None);
        let c = GateOutcome::NotOwned {
            kind: "Service",
            name: "orders-gate".into(),
        }
        .condition(Some(&g))
        .unwrap_or_else(|| panic!("a condition"));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reason::GATE_SERVICE_NOT_OWNED)
        );
        let c = GateOutcome::NotAllowed
            .condition(Some(&g))
            .unwrap_or_else(|| panic!("a condition"));
        assert_eq!(c.reason, reason::GATES_NOT_ALLOWED);
        let peer = "10.1.2.3:5432".parse().ok();
        let c = GateOutcome::Synced { peer, ready: false }
            .condition(Some(&g))
            .unwrap_or_else(|| panic!("a condition"));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason::GATE_REJECTING)
        );
    }
}
