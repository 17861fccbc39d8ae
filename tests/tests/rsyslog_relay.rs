//! The documented event pipeline, end to end, with the shipped rsyslog
//! configurations (`contrib/rsyslog/envguard.conf` on the agent's host,
//! `contrib/rsyslog/collector.conf` on the collector), each run by a real
//! rsyslogd of the test's own — only their paths, the collector's address
//! and port replaced (each replacement must match exactly once), no system
//! socket, configuration or service touched:
//!
//! agent `--syslog unix:…` → relay rsyslogd (imuxsock, RFC 5424 parsing)
//! → a JSON file, and → omrelp (RELP over TCP, disk-assisted queue) →
//! collector rsyslogd (imrelp on loopback) → its JSON file. (Plain TCP,
//! omfwd → imtcp, lost 169 of 901 records here when the collector stopped
//! mid-stream: what sits in the socket buffers is never acknowledged.)
//!
//! Refused datagrams make violation records in three bursts: before, while
//! and after the collector is stopped (SIGTERM, mid-stream) and started again
//! on the same port. Then: the relay's file is the agent's stdout, line for
//! line and byte for byte; at the collector every record arrived (`seq`
//! 0…N−1 without a gap), each byte for byte the agent's line; duplicates
//! (RELP is at-least-once across a reconnect) are counted and printed.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envguard_tests::sinks::{TempDir, rsyslogd};
use envguard_tests::{AgentOptions, Client, Family, Lab, Mode, Site, process};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const BURST: u32 = 300;

fn contrib(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/rsyslog")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `text` with `from` (which must occur exactly once) replaced by `to`.
fn subst(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the shipped rsyslog configuration must contain {from:?} once"
    );
    text.replace(from, to)
}

/// A running rsyslogd with a configuration of the test's; SIGTERMed (then
/// SIGKILLed) and reaped on drop.
struct Rsyslogd {
    child: Option<Child>,
    conf: PathBuf,
    dir: PathBuf,
}

impl Rsyslogd {
    fn start(dir: &Path, name: &str, conf: &str) -> Rsyslogd {
        let bin = rsyslogd();
        let conf_path = dir.join(format!("{name}.conf"));
        std::fs::write(&conf_path, conf).expect("write the rsyslog configuration");
        let check = Command::new(&bin)
            .args(["-N1", "-f"])
            .arg(&conf_path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} -N1: {e}", bin.display()));
        assert!(
            check.status.success(),
            "rsyslogd rejects the {name} configuration:\n{conf}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut r = Rsyslogd {
            child: None,
            conf: conf_path,
            dir: dir.to_owned(),
        };
        r.spawn(name);
        r
    }

    fn spawn(&mut self, name: &str) {
        let stderr = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.stderr")))
            .expect("rsyslogd stderr file");
        let mut cmd = Command::new(rsyslogd());
        cmd.arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(self.dir.join(format!("{name}.pid")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start rsyslogd"));
    }

    /// SIGTERM and reap (SIGKILL after 10 s).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rsyslogd did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Rsyslogd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn seq(line: &str) -> u64 {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v["seq"].as_u64())
        .unwrap_or_else(|| panic!("a line without seq at the collector: {line}"))
}

#[test]
fn relay_to_json_file_and_tcp_collector_loses_nothing_across_a_collector_restart() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let tmp = TempDir::new();
    let spool = tmp.join("spool");
    std::fs::create_dir(&spool).expect("mkdir spool");
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
        .port();
    let collected = tmp.join("collector/events.json");
    let relayed = tmp.join("relay/events.json");
    let socket = tmp.join("relay.sock");

    let collector_conf = format!(
        "global(workDirectory=\"{}\")\n{}",
        tmp.path().display(),
        subst(
            &subst(
                &contrib("collector.conf"),
                "/var/log/envguard-collector/events.json",
                &collected.display().to_string()
            ),
            "input(type=\"imrelp\" port=\"2514\"",
            &format!("input(type=\"imrelp\" address=\"127.0.0.1\" port=\"{port}\""),
        )
    );
    let mut relay_conf = contrib("envguard.conf");
    for (from, to) in [
        (
            "Socket=\"/run/envguard-syslog.sock\"",
            format!("Socket=\"{}\"", socket.display()),
        ),
        (
            "file=\"/var/log/envguard/events.json\"",
            format!("file=\"{}\"", relayed.display()),
        ),
        (
            "target=\"collector.example.net\" port=\"2514\"",
            format!("target=\"127.0.0.1\" port=\"{port}\""),
        ),
    ] {
        relay_conf = subst(&relay_conf, from, &to);
    }
    let relay_conf = format!(
        "global(workDirectory=\"{}\")\nmodule(load=\"imuxsock\" SysSock.Use=\"off\")\n{relay_conf}",
        spool.display()
    );

    let collector_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listening =
        || TcpStream::connect_timeout(&collector_addr, Duration::from_millis(200)).is_ok();
    let mut collector = Rsyslogd::start(tmp.path(), "collector", &collector_conf);
    wait_until(
        "the collector rsyslogd listens",
        Duration::from_secs(20),
        listening,
    );
    let _relay = Rsyslogd::start(tmp.path(), "relay", &relay_conf);
    wait_until(
        "the relay rsyslogd made its socket",
        Duration::from_secs(20),
        || socket.exists(),
    );

    lab.spawn_agent(&AgentOptions::ephemeral().syslog(&format!("unix:{}", socket.display())));
    let dst = SocketAddr::new(Site::Prod.addr(Family::V4), 9000);
    let place = lab.client_place(Client::Dev);
    let burst = |what: &str| {
        let r = process::udp_burst(lab.egprobe(), &place, dst, BURST);
        assert_eq!(
            r["eperm"].as_u64(),
            Some(u64::from(BURST)),
            "{what}: every datagram refused: {r}"
        );
    };

    burst("before the collector stops");
    let stop = Instant::now();
    collector.stop();
    burst("while the collector is stopped");
    // Those records reached the relay while the collector was down (its
    // file has them), so they sat in its queue.
    let printed = lab
        .agent()
        .wait_lines(Duration::from_secs(20), |l| {
            l.iter().filter(|v| v["kind"] == "violation").count() >= 2 * BURST as usize
        })
        .unwrap_or_else(|l| {
            panic!(
                "the agent printed {} lines, not 2 bursts' violations",
                l.len()
            )
        })
        .len();
    wait_until(
        "the relay got the records made while the collector was down",
        Duration::from_secs(20),
        || lines(&relayed).len() >= printed,
    );
    collector.spawn("collector");
    wait_until(
        "the collector rsyslogd listens again",
        Duration::from_secs(20),
        listening,
    );
    let down = stop.elapsed();
    burst("after the collector is back");

    let agent = lab.take_agent();
    let (raw, _) = agent.stop_collect_raw();
    let n = raw.len();
    assert!(
        n as u32 > 3 * BURST,
        "the agent printed {n} records for {} refused datagrams",
        3 * BURST
    );

    // The relay's file: the agent's stdout, line for line.
    wait_until(
        &format!("the relay's JSON file holding all {n} records"),
        Duration::from_secs(30),
        || lines(&relayed).len() >= n,
    );
    assert_eq!(
        lines(&relayed),
        raw,
        "the relay's JSON file must be the agent's stdout, byte for byte"
    );

    // The collector: everything, gapless, each the agent's line.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(60);
    loop {
        let mut seqs: Vec<u64> = lines(&collected).iter().map(|l| seq(l)).collect();
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.len() == n {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<u64> = (0..n as u64)
                .filter(|s| seqs.binary_search(s).is_err())
                .collect();
            let stderr = |name: &str| {
                std::fs::read_to_string(tmp.join(&format!("{name}.stderr"))).unwrap_or_default()
            };
            panic!(
                "the collector has {} of the {n} records within 60 s; missing seqs {:?}…\nrelay stderr:\n{}\ncollector stderr:\n{}",
                seqs.len(),
                &missing[..missing.len().min(20)],
                stderr("relay"),
                stderr("collector"),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = lines(&collected);
    let mut seen = vec![0u32; n];
    for l in &got {
        let s = seq(l) as usize;
        assert!(
            s < n,
            "seq {s} at the collector, but the agent printed {n} records"
        );
        assert_eq!(
            l, &raw[s],
            "record seq {s} at the collector differs from the agent's line"
        );
        seen[s] += 1;
    }
    assert!(
        seen.iter().all(|&c| c >= 1),
        "records missing at the collector"
    );
    let dups = got.len() - n;
    eprintln!(
        "rsyslog relay: {n} records; relay file == stdout; collector stopped for {:.0} ms mid-stream, \
         then had all {n} (seq 0..{}) within {:.0} ms of the agent's stop, {dups} duplicate(s)",
        down.as_secs_f64() * 1e3,
        n - 1,
        t.elapsed().as_secs_f64() * 1e3
    );
}
