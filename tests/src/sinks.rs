//! What the sink and metrics tests need around the agent: a temporary
//! directory, a real rsyslogd with the test's own configuration, a unix
//! datagram socket nobody reads (a stuck syslog receiver), RFC 5424 parsing,
//! and the Prometheus endpoint (scrape, parse, `promtool check metrics`).
//! Every resource is a guard removed on drop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys;

/// A directory `<tmp>/envguard-t-<pid>-<n>`, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(sys::unique_name("envguard-t"));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "envguard-tests: cleanup: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// `rsyslogd`, wherever it is (it lives in /usr/sbin). Missing is a
/// failure with instructions, not a skip.
pub fn rsyslogd() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("rsyslogd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "rsyslogd not found: the syslog tests need a real rsyslog. Install it with \
                 `cargo xtask setup` or `apt-get install -y --no-install-recommends rsyslog`"
            )
        })
}

/// One message as rsyslog parsed it, written with the template
/// `facility|severity|hostname|app-name|procid|msgid|structured-data|msg`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub facility: String,
    pub severity: String,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub msgid: String,
    pub structured_data: String,
    pub msg: String,
}

/// A running rsyslogd with the test's own configuration, in its own
/// temporary directory: an `imuxsock` input on `<dir>/log.sock`
/// (`UseSpecialParser="off"`, so it parses RFC 5424) and an `imudp` input
/// on a loopback port, each writing what it receives to its own file. No
/// system socket, configuration or service is touched (`SysSock.Use="off"`,
/// its own `workDirectory`, `-f` and `-i`). Killed, reaped and removed on
/// drop.
pub struct Rsyslog {
    child: Child,
    pub socket: PathBuf,
    pub udp: SocketAddr,
    dir: TempDir,
}

pub use crate::rsyslog_conf::{UDP_LOG, UNIX_LOG};
/// The readiness probes' MSGID, left out of [`Rsyslog::received`].
const PROBE_MSGID: &str = "envguard-test-ready";

impl Rsyslog {
    /// Starts rsyslogd and waits (at most 20 s) until each input has
    /// written a probe message to its file.
    pub fn start() -> Rsyslog {
        let bin = rsyslogd();
        let dir = TempDir::new();
        let socket = dir.join("log.sock");
        // A free loopback port, taken from the kernel and released for rsyslogd.
        let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|s| s.local_addr())
            .unwrap_or_else(|e| panic!("cannot find a free UDP port: {e}"))
            .port();
        let conf = crate::rsyslog_conf::rsyslog_conf(dir.path(), port);
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf_path.display()));
        let check = Command::new(&bin)
            .args(["-N1", "-f"])
            .arg(&conf_path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} -N1: {e}", bin.display()));
        assert!(
            check.status.success(),
            "rsyslogd rejects the test's configuration: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let stderr = std::fs::File::create(dir.join("stderr"))
            .unwrap_or_else(|e| panic!("cannot create rsyslogd's stderr file: {e}"));
        let mut cmd = Command::new(&bin);
        cmd.arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
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
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let r = Rsyslog {
            child,
            socket,
            udp: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            dir,
        };
        r.wait_ready();
        r
    }

    /// `unix:<socket>`, for `--syslog`.
    pub fn unix_target(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// `udp:127.0.0.1:<port>`, for `--syslog`.
    pub fn udp_target(&self) -> String {
        format!("udp:{}", self.udp)
    }

    /// Sends a probe to each input until rsyslogd wrote it.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = format!("<13>1 - - probe - {PROBE_MSGID} - ready");
        for file in [UNIX_LOG, UDP_LOG] {
            loop {
                if file == UNIX_LOG {
                    if let Ok(s) = UnixDatagram::unbound() {
                        let _ = s.send_to(probe.as_bytes(), &self.socket);
                    }
                } else if let Ok(s) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) {
                    let _ = s.send_to(probe.as_bytes(), self.udp);
                }
                let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
                if text.contains(&format!("|{PROBE_MSGID}|")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "rsyslogd did not come up on {file} within 20 s; its stderr: {}",
                    self.stderr()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// What rsyslogd wrote on its stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Every message rsyslogd wrote to `file` so far, probes left out.
    /// Panics on a line that does not have the template's 8 fields.
    pub fn received(&self, file: &str) -> Vec<Received> {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.splitn(8, '|').collect();
                let [
                    facility,
                    severity,
                    hostname,
                    app_name,
                    procid,
                    msgid,
                    sd,
                    msg,
                ] = f[..]
                else {
                    panic!(
                        "rsyslogd wrote a line without the template's 8 fields to {file}: {l:?}"
                    );
                };
                Received {
                    facility: facility.into(),
                    severity: severity.into(),
                    hostname: hostname.into(),
                    app_name: app_name.into(),
                    procid: procid.into(),
                    msgid: msgid.into(),
                    structured_data: sd.into(),
                    msg: msg.into(),
                }
            })
            .filter(|r| r.msgid != PROBE_MSGID)
            .collect()
    }

    /// Polls `file` (at most `timeout`) until `n` messages are in it;
    /// returns what is there then.
    pub fn wait_received(&self, file: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received(file);
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("envguard-tests: cleanup: kill rsyslogd: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("envguard-tests: cleanup: wait for rsyslogd: {e}");
        }
        // The directory (socket, config, logs) goes with `dir`.
    }
}

/// One RFC 5424 message as the agent's syslog sink sends it:
/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rfc5424 {
    pub pri: u8,
    pub timestamp: String,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub msgid: String,
    pub structured_data: String,
    pub msg: String,
}

/// Parses one datagram; `Err` says what is wrong with it.
pub fn parse_rfc5424(datagram: &[u8]) -> Result<Rfc5424, String> {
    let text = std::str::from_utf8(datagram)
        .map_err(|e| format!("not UTF-8 ({e}): {:?}", String::from_utf8_lossy(datagram)))?;
    let bad = || format!("not an RFC 5424 message: {text:?}");
    let rest = text.strip_prefix('<').ok_or_else(bad)?;
    let (pri, rest) = rest.split_once('>').ok_or_else(bad)?;
    let pri: u8 = pri.parse().map_err(|_| bad())?;
    let f: Vec<&str> = rest.splitn(8, ' ').collect();
    let [
        version,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        msg,
    ] = f[..]
    else {
        return Err(bad());
    };
    if version != "1" {
        return Err(bad());
    }
    Ok(Rfc5424 {
        pri,
        timestamp: timestamp.into(),
        hostname: hostname.into(),
        app_name: app_name.into(),
        procid: procid.into(),
        msgid: msgid.into(),
        structured_data: sd.into(),
        msg: msg.into(),
    })
}

/// A unix datagram socket the test binds and does not read until told to:
/// a syslog receiver that is stuck, so the agent's sends block (for at
/// most its send timeout each) and its syslog sink falls behind. The socket
/// file is removed on drop.
pub struct StuckReceiver {
    path: PathBuf,
    socket: Arc<UnixDatagram>,
    reader: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl StuckReceiver {
    pub fn bind(path: &Path) -> StuckReceiver {
        let socket = UnixDatagram::bind(path).unwrap_or_else(|e| {
            panic!(
                "cannot bind a unix datagram socket at {}: {e}",
                path.display()
            )
        });
        StuckReceiver {
            path: path.to_owned(),
            socket: Arc::new(socket),
            reader: None,
            stop: Arc::new(AtomicBool::new(false)),
            got: Arc::default(),
        }
    }

    /// `unix:<path>`, for `--syslog`.
    pub fn target(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// From now on a thread reads every datagram (those queued in the
    /// socket first), which unblocks the sender.
    pub fn start_reading(&mut self) {
        assert!(self.reader.is_none(), "already reading");
        let socket = Arc::clone(&self.socket);
        let stop = Arc::clone(&self.stop);
        let got = Arc::clone(&self.got);
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set a read timeout");
        self.reader = Some(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                match socket.recv(&mut buf) {
                    Ok(n) => got
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(buf[..n].to_vec()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("reading the syslog socket: {e}"),
                }
            }
        }));
    }

    /// The datagrams read so far.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for StuckReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!(
                "envguard-tests: cleanup: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The TCP addresses process `pid` listens on: its socket fds matched by
/// inode against the LISTEN entries of `/proc/net/tcp` and `tcp6` (the test
/// runs in the agent's network namespace).
pub fn listening_tcp(pid: u32) -> Vec<SocketAddr> {
    let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        // "sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode"
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(local), Some(&"0A"), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            if !inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i)) {
                continue;
            }
            if let Some(addr) = parse_proc_addr(local) {
                out.push(addr);
            }
        }
    }
    out
}

/// `0100007F:1F90` → 127.0.0.1:8080 (each 32-bit word in host order).
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(SocketAddr::from((
            Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]),
            port,
        ))),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(SocketAddr::from((Ipv6Addr::from(b), port)))
        }
        _ => None,
    }
}

/// One HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// `HTTP/1.1 200 OK`.
    pub status_line: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// `GET PATH` over a fresh connection (the agent closes it after one
/// response); panics with what happened if there is no well-formed answer
/// within 5 s.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("cannot connect to the metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(timeout))
        .expect("set a read timeout");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap_or_else(|e| panic!("cannot send GET {path} to {addr}: {e}"));
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("reading the answer to GET {path} from {addr}: {e}"));
    let text = String::from_utf8(raw)
        .unwrap_or_else(|e| panic!("the answer to GET {path} from {addr} is not UTF-8: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| {
        panic!("no HTTP head in the answer to GET {path} from {addr}: {text:?}")
    });
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status_line,
        headers,
        body: body.to_owned(),
    }
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the samples of a text exposition (comments skipped). Panics on a
/// line it cannot read (promtool says more; this only needs to find values).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || -> ! { panic!("unreadable metrics line: {line:?}") };
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => bad(),
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    break after;
                }
                r = r.strip_prefix(',').unwrap_or(r);
                let Some((key, after)) = r.split_once("=\"") else {
                    bad()
                };
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => bad(),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => value.push(c),
                        None => bad(),
                    }
                };
                labels.insert(key.to_owned(), value);
                r = &after[end + 1..];
            }
        } else {
            rest
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| match v {
                "+Inf" => Some(f64::INFINITY),
                "-Inf" => Some(f64::NEG_INFINITY),
                v => v.parse().ok(),
            })
            .unwrap_or_else(|| bad());
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

/// The samples named `name` whose labels include every `(key, value)` of `labels`.
pub fn samples<'a>(all: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    all.iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// Runs `promtool check metrics` on `text`: `Ok` if it exits 0 saying
/// nothing, else `Err` with what it said. Panics, saying how to install it,
/// if promtool cannot be run.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): the metrics test needs it. Install it with \
                 `cargo xtask setup` or `apt-get install -y --no-install-recommends prometheus`"
            )
        });
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("wait for promtool");
    let _ = writer.join();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({}): {said}", out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_and_metrics_lines_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        let s =
            parse_metrics("# HELP x y\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"\\\\\\n\"} 3\ny 4.5\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].labels["a"], "1");
        assert_eq!(s[0].labels["b"], "q\"\\\n");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(samples(&s, "y", &[]).len(), 1);
        let m = parse_rfc5424(
            b"<28>1 2026-11-23T10:45:47.852301Z vm envguard 42 violation - {\"a\":1}",
        )
        .unwrap();
        assert_eq!(m.pri, 28);
        assert_eq!(m.msgid, "violation");
        assert_eq!(m.msg, "{\"a\":1}");
    }
}
