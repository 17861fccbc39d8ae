//! The metrics exposition, as served over HTTP, passes `promtool check metrics`
//! (Debian package `prometheus`, installed by `cargo xtask setup`): parsing and
//! Prometheus' own lint rules (naming, units, HELP text). A missing promtool
//! is a failure, not a skip.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use envguard_agent::metrics::{Decision, Snapshot, render, serve_listener};

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): this test needs it. Install it with \
                 `cargo xtask setup` or `apt-get install -y --no-install-recommends prometheus`"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.trim().is_empty(), said)
}

fn snapshot() -> Snapshot {
    let mut s = Snapshot::new();
    for (src, dst, verdict, mode) in [
        ("dev", "prod", "denied", "enforce"),
        ("dev", "prod", "audited", "audit"),
        ("prod", "prod", "allowed", "enforce"),
        // Label values that need escaping, and some that do not.
        ("we\"ird\\env\nname", "wörld ✓", "denied", "enforce"),
    ] {
        for (direction, proto) in [("egress", "tcp"), ("ingress", "udp"), ("egress", "132")] {
            s.decisions.push(Decision {
                src_env: src.into(),
                dst_env: dst.into(),
                verdict: verdict.into(),
                mode: mode.into(),
                direction: direction.into(),
                proto: proto.into(),
                count: 1 << 40,
            });
        }
    }
    for kind in [
        "policy_loaded",
        "violation",
        "violation_rollup",
        "lost_events",
    ] {
        s.events_emitted.insert(kind.into(), 12);
    }
    for source in ["ringbuf", "queue:stdout", "queue:file", "queue:syslog"] {
        s.events_lost.insert(source.into(), 0);
    }
    s.events_suppressed = 99;
    s.policy_revision = 3;
    s
}

#[tokio::test]
async fn promtool_accepts_the_served_exposition() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve_listener(listener, Arc::new(Mutex::new(snapshot())));
    let body = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    server.abort();
    let (head, body) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    for family in [
        "envguard_decisions_total",
        "envguard_events_emitted_total",
        "envguard_events_lost_total",
        "envguard_events_suppressed_total",
        "envguard_policy_revision",
        "envguard_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_open_fds",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{body}"
        );
    }
    let (ok, said) = promtool_check(body);
    assert!(ok, "promtool check metrics:\n{said}\non:\n{body}");
}

#[test]
fn promtool_accepts_an_empty_snapshot() {
    let text = render(&Snapshot::new());
    let (ok, said) = promtool_check(&text);
    assert!(ok, "promtool check metrics:\n{said}\non:\n{text}");
}

#[test]
fn promtool_is_strict_enough_to_matter() {
    // The check would catch what it is here for.
    let (ok, _) = promtool_check("# TYPE envguard_oops counter\nenvguard_oops 1\n");
    assert!(!ok);
    let (ok, _) = promtool_check("envguard_x{a=\"unterminated} 1\n");
    assert!(!ok);
}
