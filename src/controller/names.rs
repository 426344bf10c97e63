//! How the controller names a pool and its target to the parts that key things by them.
//!
//! Lives here: [`PoolRef`] (a pool's identity: its `ObjectRef`), the label set of its metric
//! series ([`pool_labels`]), the key the prober knows it by ([`owner_key`]), the target key of
//! its spec ([`spec_target_key`]) and its stable jitter seed ([`stable_seed`]), pure functions of the
//! object; and [`PerPool`], what every part that keeps something per pool offers the registry. Must not live here: anything that keeps state.

use kube::{ResourceExt, runtime::reflector::ObjectRef};

use crate::{api::DbPool, metrics::PoolLabels};

/// A pool's identity in every per-pool map of the controller.
pub(crate) type PoolRef = ObjectRef<DbPool>;

/// A part of the controller that keeps something per pool. The context's registry forgets a
/// pool in every part at once (see `context`), and the registry test checks each is empty.
pub(crate) trait PerPool {
    /// Drops everything kept about `pool`.
    fn forget(&self, pool: &PoolRef);
    /// How many pools it keeps something about.
    fn pools_known(&self) -> usize;
}

/// The labels of a pool's metric series.
pub(crate) fn pool_labels(pool: &PoolRef) -> PoolLabels {
    PoolLabels {
        namespace: pool.namespace.clone().unwrap_or_default(),
        name: pool.name.clone(),
    }
}

/// The `namespace/name` key the prober knows a pool by.
pub(crate) fn owner_key(pool: &PoolRef) -> String {
    format!(
        "{}/{}",
        pool.namespace.as_deref().unwrap_or_default(),
        pool.name
    )
}

/// The pool named by a prober owner key (`namespace/name`), if it is one.
pub(crate) fn from_owner_key(owner: &str) -> Option<PoolRef> {
    let (namespace, name) = owner.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

/// The target a pool's spec points at: `host:port`, lowercased, as the spec writes it. Names
/// are not resolved (a lookup is part of the bounded probe), so two names for one address count
/// as two targets.
pub(crate) fn spec_target_key(pool: &DbPool) -> String {
    let db = &pool.spec.database;
    format!(
        "{}:{}",
        db.host.to_ascii_lowercase(),
        u16::try_from(db.port).unwrap_or(5432)
    )
}

/// The jitter seed of a pool: FNV-1a over its uid, namespace and name. Stable across processes,
/// restarts and Rust releases, so the schedule the docs promise is reproducible.
pub(crate) fn stable_seed(pool: &DbPool) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let uid = pool.metadata.uid.as_deref().unwrap_or_default();
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let mut hash = OFFSET;
    for part in [uid, namespace.as_str(), name.as_str()] {
        // A separator that cannot occur in any of the parts keeps ("ab","c") apart from ("a","bc").
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::testing::pool;

    #[test]
    fn the_jitter_seed_is_stable_across_processes_and_releases() {
        let orders = pool("orders");
        // FNV-1a of "uid-orders\xffns\xfforders\xff": pinned, so a toolchain upgrade cannot move
        // every pool's published schedule.
        assert_eq!(stable_seed(&orders), stable_seed(&orders.clone()));
        assert_eq!(
            stable_seed(&orders),
            0xe703_0d88_07ac_86c8_u64,
            "{:#x}",
            stable_seed(&orders)
        );
        assert_ne!(stable_seed(&orders), stable_seed(&pool("order")));
    }

    #[test]
    fn owner_keys_round_trip_and_targets_are_lowercased() {
        let orders = pool("orders");
        let key = ObjectRef::from_obj(&orders);
        assert_eq!(owner_key(&key), "ns/orders");
        assert_eq!(from_owner_key(&owner_key(&key)), Some(key));
        assert_eq!(from_owner_key("no-slash"), None);
        assert_eq!(spec_target_key(&orders), "h:5432");
    }
}
