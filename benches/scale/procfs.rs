//! Reading the clock and /proc: CPU, memory and sockets of processes, without touching them.
//!
//! Lives here: microsecond instants, /proc/<pid>/stat and status parsing, apiserver connections
//! of a process, PostgreSQL and control-plane CPU, the machine description. Must not live here:
//! anything that knows about pools, phases or the report's wording.

use std::{
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::support::kube::kubeconfig_path;

/// Now, in microseconds since the Unix epoch (the host wall clock the operator stamps with too).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A Kubernetes MicroTime in microseconds since the epoch.
pub fn micro(t: &MicroTime) -> i64 {
    t.0.as_microsecond()
}

/// A duration in microseconds (saturating).
pub fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Clock ticks per second of /proc CPU figures.
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The fields of a /proc/<pid>/stat line after the command name: [0] is field 3 (state).
pub fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let close = text.rfind(')')?;
    Some(text.get(close + 2..)?.split_whitespace().collect())
}

/// utime + stime (+ cutime + cstime when `children`) of a /proc stat text, in ticks.
pub fn stat_ticks(text: &str, children: bool) -> u64 {
    let Some(f) = stat_fields(text) else {
        return 0;
    };
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let own = field(11) + field(12);
    if children {
        own + field(13) + field(14)
    } else {
        own
    }
}

/// (VmHWM, VmRSS) in KiB of a /proc/<pid>/status file.
pub fn memory_kib(status_path: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(status_path).unwrap_or_default();
    let value = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (value("VmHWM:"), value("VmRSS:"))
}

/// The apiserver's port, from the kubeconfig the bench uses.
pub fn apiserver_port() -> Option<u16> {
    let text = std::fs::read_to_string(kubeconfig_path()).ok()?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))?;
    server
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// Established TCP connections of process `pid` to 127.0.0.1:`port`.
pub fn tcp_connections(pid: &str, port: u16) -> Option<usize> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = f
                .get(2)
                .and_then(|r| r.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port)
                && f.get(3) == Some(&"01")
                && f.get(9).is_some_and(|i| inodes.contains(*i))
            {
                count += 1;
            }
        }
    }
    Some(count)
}

/// CPU seconds of the PostgreSQL servers (postmasters, their live children and the children they
/// reaped) and the number of server processes.
pub fn postgres_usage(postmasters: &[u32]) -> (f64, usize) {
    let mut ticks = 0;
    let mut processes = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat_fields(&text)
                .and_then(|f| f.get(1).and_then(|v| v.parse::<u32>().ok()))
                .unwrap_or(0);
            if postmasters.contains(&pid) {
                ticks += stat_ticks(&text, true);
                processes += 1;
            } else if postmasters.contains(&ppid) {
                ticks += stat_ticks(&text, false);
                processes += 1;
            }
        }
    }
    (ticks as f64 / clk_tck(), processes)
}

/// CPU seconds of kube-apiserver plus etcd, when the environment's pid files are at hand
/// (`DBPOOL_ENV_DIR/run/{apiserver,etcd}.pid`, which `make bench` provides).
pub fn control_plane_cpu() -> Option<f64> {
    let run = PathBuf::from(std::env::var_os("DBPOOL_ENV_DIR")?).join("run");
    let mut ticks = 0;
    for name in ["apiserver", "etcd"] {
        let pid = std::fs::read_to_string(run.join(format!("{name}.pid"))).ok()?;
        let text = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).ok()?;
        ticks += stat_ticks(&text, true);
    }
    Some(ticks as f64 / clk_tck())
}

/// The 1, 5 and 15 minute load averages, "a b c".
pub fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPUs, memory, kernel and load average, for the report's header.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB memory, Linux {}, load average at start {}",
        mem_kib as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        load_average()
    )
}
