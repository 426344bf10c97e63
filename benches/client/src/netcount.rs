//! Counting TCP connect attempts: the kernel's own counters of this network namespace.
//!
//! Lives here: [`TcpCounters`] (`ActiveOpens` and `AttemptFails` of the `Tcp:` lines of
//! `/proc/net/snmp`) and whether the benchmark runs in a network namespace of its own. Must not
//! live here: deciding the windows they are read in (`scenario`).
//!
//! Why: the outage is the real server stopped, so a client's connect is refused by the kernel
//! (RST), exactly as in production. No listener sees those attempts; the kernel counts every
//! `connect()` in `ActiveOpens` and every one refused in `AttemptFails`. The counters are per
//! network namespace: `hack/bench-client.sh` runs the benchmark in a namespace of its own, where
//! nothing but the benchmark connects, so the deltas are exact. Run outside one, they include
//! every other process's connects on the machine (the report says which).
//!
//! [`PortSyns`] counts at the server's side: an iptables rule in the namespace's INPUT chain
//! counting the SYNs that reach PostgreSQL's port, refused or not. It tells apart connects to
//! PostgreSQL from those to PgBouncer (both are `ActiveOpens`), and, minus the credentialed
//! connects dbpool-client reports, its readiness pings. Only in the namespace made for the run
//! (never the host's firewall).

/// `Tcp: ActiveOpens` and `Tcp: AttemptFails`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpCounters {
    /// connect() calls (SYN sent), refused or not.
    pub active_opens: u64,
    /// Connects that failed (refused, reset before established).
    pub attempt_fails: u64,
}

impl TcpCounters {
    /// Reads the counters now (zeros if `/proc/net/snmp` is unreadable).
    pub fn read() -> TcpCounters {
        let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
        parse(&text).unwrap_or_default()
    }

    /// `self - earlier`.
    pub fn since(self, earlier: TcpCounters) -> TcpCounters {
        TcpCounters {
            active_opens: self.active_opens.saturating_sub(earlier.active_opens),
            attempt_fails: self.attempt_fails.saturating_sub(earlier.attempt_fails),
        }
    }
}

fn parse(text: &str) -> Option<TcpCounters> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let values: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some(TcpCounters {
        active_opens: get("ActiveOpens")?,
        attempt_fails: get("AttemptFails")?,
    })
}

/// The network namespace `hack/bench-client.sh` made for this run (`BENCH_CLIENT_NETNS`), if
/// the benchmark runs in it: the deltas are then this benchmark's alone.
pub fn private_netns() -> Option<String> {
    std::env::var("BENCH_CLIENT_NETNS")
        .ok()
        .filter(|n| !n.is_empty())
}

/// SYNs reaching one TCP port, counted by an iptables rule of the run's own namespace.
pub struct PortSyns {
    port: u16,
}

fn iptables(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PortSyns {
    /// Adds the counting rule for `port`; None outside the run's own namespace or without
    /// iptables.
    pub fn install(port: u16) -> Option<PortSyns> {
        private_netns()?;
        let p = port.to_string();
        iptables(&["-A", "INPUT", "-p", "tcp", "--syn", "--dport", &p])?;
        Some(PortSyns { port })
    }

    /// SYNs counted so far (None: the rule cannot be read).
    pub fn read(&self) -> Option<u64> {
        let text = iptables(&["-nvxL", "INPUT"])?;
        let want = format!("dpt:{}", self.port);
        parse_pkts(&text, &want)
    }
}

fn parse_pkts(text: &str, want: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.split_whitespace().any(|w| w == want))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tcp_lines() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets\n\
            Tcp: 1 200 120000 -1 1234 56 789 3\n";
        let c = parse(text).unwrap_or_default();
        assert_eq!((c.active_opens, c.attempt_fails), (1234, 789));
    }

    #[test]
    fn reads_the_rule_counter() {
        let text = "Chain INPUT (policy ACCEPT 10 packets, 600 bytes)\n\
            pkts bytes target prot opt in out source destination\n\
            42 2520 tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:25432 flags:0x17/0x02\n";
        assert_eq!(parse_pkts(text, "dpt:25432"), Some(42));
        assert_eq!(parse_pkts(text, "dpt:1"), None);
    }
}
