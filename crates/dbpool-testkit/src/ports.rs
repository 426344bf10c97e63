//! Free loopback ports: the one port policy of the tests, the benchmark and `hack/env.sh`.
//!
//! Lives here: [`free_port`]. Ports are drawn at random from [`PORT_RANGE`], which lies below
//! Linux's default ephemeral range (32768–60999), so a port we pick is never one the kernel is
//! about to hand to an outgoing connection; `hack/env.sh` draws from the same range. Must not
//! live here: binding the port for good (a caller binds it right after, and retries on a
//! collision, since another process may take it in between).

use std::{
    hash::{BuildHasher, RandomState},
    net::TcpListener,
    ops::Range,
    time::{SystemTime, UNIX_EPOCH},
};

/// Where test servers listen: below the kernel's ephemeral range.
pub const PORT_RANGE: Range<u16> = 20_000..32_000;

/// A port in [`PORT_RANGE`] that was free on 127.0.0.1 a moment ago.
///
/// # Panics
/// When 1,000 random draws all find the port taken (the machine is out of ports).
pub fn free_port() -> u16 {
    let state = RandomState::new();
    let span = u64::from(PORT_RANGE.end - PORT_RANGE.start);
    for attempt in 0u32..1000 {
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let offset = state.hash_one((nonce, attempt, std::process::id())) % span;
        let port = PORT_RANGE.start + u16::try_from(offset).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found in {PORT_RANGE:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range() {
        for _ in 0..50 {
            let port = free_port();
            assert!(PORT_RANGE.contains(&port), "{port}");
            assert!(port < 32_768);
        }
    }
}
