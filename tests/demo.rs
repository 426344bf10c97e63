//! `make demo` as a newcomer meets it: `hack/demo.sh` with the short timings of `DEMO_FAST=1`, in
//! a private environment (its own `DBPOOL_ENV_DIR`, separate from the one `make test` runs the
//! other tests against), run twice in a row. The environment is torn down however the test ends.

use dbpool_operator::api::reason as reasons;
use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The demo's state directory; `hack/env.sh down` runs on drop, so no daemon outlives the test.
struct DemoEnv {
    dir: tempfile::TempDir,
}

impl DemoEnv {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dbpool-demo-test.")
            .tempdir()
            .expect("temporary directory");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `hack/env.sh ARG` for this environment: (success, stderr).
    fn env_sh(&self, arg: &str) -> (bool, String) {
        let out = Command::new(format!("{ROOT}/hack/env.sh"))
            .arg(arg)
            .env("DBPOOL_ENV_DIR", self.path())
            .stdin(Stdio::null())
            .output()
            .expect("run hack/env.sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `hack/demo.sh` with DEMO_FAST=1 against this environment, killing it (and everything
    /// it started in its process group) after `deadline`. Returns (exit success, output).
    fn run_demo(&self, run: u32, deadline: Duration) -> (bool, String) {
        let log: PathBuf = self.path().join(format!("demo-{run}.out"));
        let out = File::create(&log).expect("output file");
        let mut child = Command::new(format!("{ROOT}/hack/demo.sh"))
            .current_dir(ROOT)
            .env("DEMO_FAST", "1")
            .env("DBPOOL_ENV_DIR", self.path())
            // The test binary's own build of the operator: a `cargo build` from inside
            // `cargo test` would wait for the build directory lock that cargo holds.
            .env("DEMO_OPERATOR_BIN", env!("CARGO_BIN_EXE_dbpool-operator"))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("output file"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start hack/demo.sh");
        let start = Instant::now();
        let success = loop {
            if let Some(status) = child.try_wait().expect("wait for hack/demo.sh") {
                break status.success();
            }
            if start.elapsed() > deadline {
                let _ = Command::new("kill")
                    .args(["-TERM", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("hack/demo.sh run {run} did not finish within {deadline:?}:\n{output}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        (success, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// The pid of the operator the demo left running, if its process is alive.
    fn operator_pid(&self) -> Option<String> {
        let pid = std::fs::read_to_string(self.path().join("run/operator.pid")).ok()?;
        let pid = pid.trim().to_owned();
        alive(&pid).then_some(pid)
    }
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: &str) -> bool {
    Command::new("ps")
        .args(["-o", "stat=", "-p", pid])
        .output()
        .is_ok_and(|out| out.status.success() && !out.stdout.starts_with(b"Z"))
}

impl Drop for DemoEnv {
    fn drop(&mut self) {
        let (ok, stderr) = self.env_sh("down");
        if !ok {
            eprintln!("hack/env.sh down failed:\n{stderr}");
        }
    }
}

/// Whether some line of `output` is a `kubectl get dbpools` row of pool `demo` with this phase
/// and breaker state.
fn has_row(output: &str, phase: &str, breaker: &str) -> bool {
    output.lines().any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 4 && cols[0] == "demo" && cols[1] == phase && cols[2] == breaker
    })
}

fn assert_story(output: &str, run: u32) {
    let expect = |needle: &str| {
        assert!(
            output.contains(needle),
            "run {run}: the demo output lacks {needle:?}:\n{output}"
        );
    };
    // The environment, the CRD and the operator.
    expect("$ kubectl apply -f crds/dbpool.yaml");
    expect("hack/env.sh operator-start");
    // Healthy first.
    expect("$ kubectl wait dbpool/demo --for=condition=Ready");
    assert!(has_row(output, "Healthy", "Closed"), "run {run}:\n{output}");
    // The outage: failures climb, the breaker opens, selectors and metrics show it.
    expect("hack/env.sh pg-stop");
    assert!(
        has_row(output, "Recovering", "Closed"),
        "run {run}:\n{output}"
    );
    assert!(
        has_row(output, "BreakerOpen", "Open"),
        "run {run}:\n{output}"
    );
    expect("$ kubectl get dbpools -l dbpool.io/breaker=open");
    expect("consecutive outage failures; trial probe after 4s");
    expect(r#"dbpool_circuit_breaker_state{namespace="default",name="demo",state="open"} 1"#);
    // The database returns: half-open, then closed.
    expect("hack/env.sh pg-start");
    expect(reasons::BREAKER_HALF_OPEN);
    expect(reasons::BREAKER_CLOSED);
    // The force reopen is acted on: status and event.
    expect("$ kubectl annotate dbpool demo dbpool.io/force-reopen=demo-");
    expect(r#"{"time":"#);
    expect("force-reopen \"demo-");
    expect("backoff and cooldown reset, probing now");
    // It ends up, telling the reader how to use and stop it.
    expect("Demo complete.");
    expect("export KUBECONFIG=");
    expect("hack/env.sh down");
}

#[test]
fn make_demo_tells_the_story_and_can_run_twice() {
    let env = DemoEnv::new();

    let (ok, first) = env.run_demo(1, Duration::from_secs(80));
    assert!(ok, "the first run of hack/demo.sh failed:\n{first}");
    assert_story(&first, 1);
    let (up, status) = env.env_sh("status");
    assert!(up, "the demo must leave the environment up:\n{status}");
    let operator = env.operator_pid();
    assert!(
        operator.is_some(),
        "the demo must leave the operator running"
    );

    // Again, on the running environment: the same story from a fresh pool.
    let (ok, second) = env.run_demo(2, Duration::from_secs(60));
    assert!(ok, "the second run of hack/demo.sh failed:\n{second}");
    assert!(
        second.contains("[env] already up"),
        "the second run reuses the environment:\n{second}"
    );
    assert!(
        second.contains("An earlier run's pool is still there"),
        "{second}"
    );
    assert_story(&second, 2);

    // `down` (what `make env-down` runs) stops the operator too.
    let restarted = env.operator_pid().expect("the operator of the second run");
    assert_ne!(
        operator,
        Some(restarted.clone()),
        "the operator is restarted"
    );
    let (ok, stderr) = env.env_sh("down");
    assert!(ok, "hack/env.sh down failed:\n{stderr}");
    assert!(
        !alive(&restarted),
        "hack/env.sh down left the operator (pid {restarted}) running"
    );
}
