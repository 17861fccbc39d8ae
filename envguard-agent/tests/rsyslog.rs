//! The syslog sink end to end, against a real rsyslogd (Debian package
//! `rsyslog`, installed by `cargo xtask setup`) that this test starts with its
//! own configuration: an imuxsock input on a unix datagram socket of the
//! test's and an imudp input on a loopback port of the test's, each writing
//! what it receives to a file in a temporary directory. No system
//! configuration, socket or service is touched (`SysSock.Use="off"`, its own
//! `workDirectory`, `-f` and `-i`), and root is not needed.
//!
//! Every record must arrive whole, parse as JSON, and carry the RFC 5424
//! header fields rsyslog parsed out of the message.
use std::{
    net::{SocketAddr, UdpSocket},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

#[path = "support/rsyslog_conf.rs"]
mod rsyslog_conf;

use envguard_agent::sinks::{Fanout, MAX_MESSAGE_BYTES, SinkConfig, SyslogTarget};
use rsyslog_conf::{UDP_LOG, UNIX_LOG, rsyslog_conf};
use serde_json::{Value, json};

/// `rsyslogd`, wherever it is (it lives in /usr/sbin, which a user's PATH
/// may lack). Missing is a failure, not a skip.
fn rsyslogd() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("rsyslogd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "rsyslogd not found: this test needs a real rsyslog. Install it with \
                 `cargo xtask setup` or `apt-get install -y --no-install-recommends rsyslog`"
            )
        })
}

/// A running rsyslogd with the test's config; killed and cleaned up on drop.
struct Rsyslog {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    udp: SocketAddr,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        let bin = rsyslogd();
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "envguard-rsyslog-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("log.sock");
        // A free loopback port: taken from the kernel, released for rsyslog.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = rsyslog_conf(&dir, port);
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let check = Command::new(&bin)
            .args(["-N1", "-f"])
            .arg(&conf_path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "rsyslogd rejects the test's config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr")).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let r = Rsyslog {
            child,
            socket,
            udp: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        r.wait_ready();
        r
    }

    /// Probes each input until rsyslog writes what it got.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = b"<13>1 - - probe - ready - ready";
        for (file, send) in [
            (
                UNIX_LOG,
                &(|| {
                    let s = UnixDatagram::unbound().unwrap();
                    let _ = s.send_to(probe, &self.socket);
                }) as &dyn Fn(),
            ),
            (UDP_LOG, &|| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                let _ = s.send_to(probe, self.udp);
            }),
        ] {
            loop {
                send();
                std::thread::sleep(Duration::from_millis(100));
                let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
                if text.contains("|ready|") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "rsyslogd did not come up on {file}; its stderr: {}",
                    std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
                );
            }
        }
    }

    /// What rsyslog wrote to `file`, probes left out.
    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("|ready|"))
            .map(str::to_owned)
            .collect()
    }

    fn wait_lines(&self, file: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.lines(file);
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The records to send: every kind, in the agent's shapes, plus one that
/// exactly fills a syslog message and one too large for one.
fn records(n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for seq in 0..n {
        let head = json!({
            "time": format!("2026-11-23T10:45:{:02}.{:09}Z", seq % 60, seq * 7919),
            "seq": seq, "boot_id": "5f0c7e0e94a44b8e9a572f5d0e6f6c11", "host": "vm",
        });
        let (kind, body) = match seq % 4 {
            0 => (
                "violation",
                json!({"mode": "enforce", "verdict": "denied", "direction": "egress", "hook": "connect4",
                       "proto": "tcp",
                       "source": {"ip": null, "port": null, "env": "dev", "env_from": "cgroup"},
                       "destination": {"ip": "198.18.10.1", "port": 80, "env": "prod", "env_from": "cidr"},
                       "process": {"pid": 12898, "comm": "py \"thon\" ✓", "uid": 0, "cgroup_id": 709,
                                   "cgroup": "/dev.slice/app \\ service"},
                       "rule": "default:cross-env (no allow rule for dev -> prod)"}),
            ),
            1 => (
                "violation_rollup",
                json!({"count": seq, "first_seen": "2026-11-23T10:45:00.000000001Z",
                       "last_seen": "2026-11-23T10:45:09.999999999Z"}),
            ),
            2 => ("lost_events", json!({"source": "ringbuf", "count": seq})),
            _ => (
                "policy_rejected",
                json!({"policy": "/etc/envguard/policy.toml", "error": "line 1\nline 2\ttab",
                       "actor": {"uid": 0, "pid": 1, "comm": "envguard"}}),
            ),
        };
        out.push(record(kind, &head, body));
    }
    out
}

fn record(kind: &str, head: &Value, body: Value) -> String {
    let mut r = serde_json::Map::new();
    r.insert("kind".into(), kind.into());
    r.extend(head.as_object().unwrap().clone());
    r.extend(body.as_object().unwrap().clone());
    Value::Object(r).to_string()
}

/// The length of the syslog header the sink puts before a record.
fn header_len(kind: &str, time_micros: &str, app: &str) -> usize {
    format!(
        "<29>1 {time_micros} {} {app} {} {kind} - ",
        envguard_agent::sys::hostname(),
        std::process::id()
    )
    .len()
}

#[test]
fn records_reach_a_real_rsyslog_whole_over_unix_and_udp() {
    let rsyslog = Rsyslog::start();
    const APP: &str = "envguard-test";
    let mut sent = records(200);
    let time = "2026-11-23T10:46:00.000000001Z";
    let head = json!({"time": time, "seq": sent.len(), "boot_id": "5f0c7e0e94a44b8e9a572f5d0e6f6c11", "host": "vm"});
    // Exactly the largest message rsyslog keeps whole by default...
    let room = MAX_MESSAGE_BYTES - header_len("policy_loaded", "2026-11-23T10:46:00.000000Z", APP);
    let empty = record("policy_loaded", &head, json!({"pad": ""}));
    let fits = record(
        "policy_loaded",
        &head,
        json!({"pad": "p".repeat(room - empty.len())}),
    );
    assert_eq!(fits.len(), room);
    sent.push(fits);
    // ...and one byte more: replaced by its stand-in.
    let mut head2 = head.clone();
    head2["seq"] = json!(sent.len());
    let too_big = record(
        "policy_loaded",
        &head2,
        json!({"pad": "p".repeat(room - empty.len() + 1)}),
    );
    sent.push(too_big.clone());

    let fanout = Fanout::new(
        vec![
            SinkConfig::Syslog {
                target: SyslogTarget::Unix(rsyslog.socket.clone()),
                app_name: APP.to_owned(),
            },
            SinkConfig::Syslog {
                target: SyslogTarget::Udp(rsyslog.udp),
                app_name: APP.to_owned(),
            },
        ],
        sent.len(),
    )
    .unwrap();
    for chunk in sent.chunks(20) {
        for line in chunk {
            fanout.send(line);
        }
        // UDP loses silently when the receiver's buffer overflows: pace it.
        assert!(fanout.flush(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fanout.take_dropped(), [], "no record may be lost");
    assert!(fanout.close_within(Duration::from_secs(10)));

    let host = envguard_agent::sys::hostname();
    let pid = std::process::id().to_string();
    for file in [UNIX_LOG, UDP_LOG] {
        let got = rsyslog.wait_lines(file, sent.len());
        assert_eq!(
            got.len(),
            sent.len(),
            "{file}: rsyslog wrote {} of {} records",
            got.len(),
            sent.len()
        );
        for (line, want) in got.iter().zip(&sent) {
            let f: Vec<&str> = line.splitn(8, '|').collect();
            let [facility, severity, hostname, app, procid, msgid, sd, msg] = f[..] else {
                panic!("{file}: unexpected line {line}");
            };
            let want: Value = serde_json::from_str(want).unwrap();
            let kind = want["kind"].as_str().unwrap();
            assert_eq!(facility, "3", "facility daemon: {line}");
            let severity_want = if kind.starts_with("violation") {
                "4"
            } else {
                "5"
            };
            assert_eq!(severity, severity_want, "{line}");
            assert_eq!(hostname, host, "{line}");
            assert_eq!(app, APP, "{line}");
            assert_eq!(procid, pid, "{line}");
            assert_eq!(msgid, kind, "{line}");
            assert_eq!(sd, "-", "{line}");
            let got: Value = serde_json::from_str(msg)
                .unwrap_or_else(|e| panic!("{file}: the message does not parse ({e}): {msg}"));
            if want["seq"] == json!(sent.len() - 1) {
                assert_eq!(
                    got,
                    json!({"kind": "oversized_record", "time": time, "seq": sent.len() - 1,
                           "boot_id": "5f0c7e0e94a44b8e9a572f5d0e6f6c11", "host": "vm",
                           "original_kind": "policy_loaded", "bytes": too_big.len(),
                           "limit": MAX_MESSAGE_BYTES}),
                    "{file}"
                );
            } else {
                assert_eq!(got, want, "{file}: the record must arrive whole");
            }
        }
    }
}

#[test]
fn a_receiver_that_goes_away_costs_counted_records_only() {
    let rsyslog = Rsyslog::start();
    let fanout = Fanout::new(
        vec![SinkConfig::Syslog {
            target: SyslogTarget::Unix(rsyslog.socket.clone()),
            app_name: "envguard-test".to_owned(),
        }],
        1000,
    )
    .unwrap();
    let sent = records(30);
    for line in &sent[..10] {
        fanout.send(line);
    }
    assert!(fanout.flush(Duration::from_secs(10)));
    assert_eq!(rsyslog.wait_lines(UNIX_LOG, 10).len(), 10);
    let socket = rsyslog.socket.clone();
    drop(rsyslog);
    assert!(!Path::new(&socket).exists());
    for line in &sent[10..] {
        fanout.send(line);
    }
    assert!(fanout.flush(Duration::from_secs(10)));
    assert_eq!(
        fanout.take_dropped(),
        [("queue:syslog".to_owned(), 20)],
        "every record sent while nobody listened is counted"
    );
    fanout.flush_and_close();
}
