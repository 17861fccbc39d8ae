//! Talking to a running agent over its control socket: the `envguard`
//! client commands (as root, or as another user through `setpriv`), raw
//! request lines, and event-stream subscribers; plus the /proc facts the
//! tests read about the agent (its listening socket, its RSS).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sys;

/// How long a client command may take before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Who runs a client command: `setpriv --reuid UID --regid GID` with
/// exactly `groups` as supplementary groups, and, with `net_admin`,
/// CAP_NET_ADMIN in its inheritable and ambient sets (so the unprivileged
/// process holds it in its effective set after exec).
#[derive(Clone, Debug)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub net_admin: bool,
}

impl Creds {
    /// uid 65534 (nobody), primary group `gid`, no supplementary group.
    pub fn nobody(gid: u32) -> Creds {
        Creds {
            uid: 65534,
            gid,
            groups: Vec::new(),
            net_admin: false,
        }
    }

    /// The same user with CAP_NET_ADMIN.
    pub fn with_net_admin(mut self) -> Creds {
        self.net_admin = true;
        self
    }

    fn setpriv_args(&self) -> Vec<String> {
        let mut a = vec![
            "--reuid".to_owned(),
            self.uid.to_string(),
            "--regid".into(),
            self.gid.to_string(),
        ];
        if self.groups.is_empty() {
            a.push("--clear-groups".into());
        } else {
            let list: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            a.extend(["--groups".into(), list.join(",")]);
        }
        if self.net_admin {
            a.extend([
                "--inh-caps".into(),
                "+net_admin".into(),
                "--ambient-caps".into(),
                "+net_admin".into(),
            ]);
        }
        a
    }
}

/// What one client command did, and when (CLOCK_MONOTONIC, the clock of
/// [`sys::mono_ns`] and of egprobe's load probes).
#[derive(Debug)]
pub struct CliRun {
    pub args: Vec<String>,
    /// `None`: it did not exit within [`CLI_TIMEOUT`] and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Its pid: what the agent must name as the `actor`.
    pub pid: u32,
    /// Just before it was started.
    pub started_ns: u64,
    /// Just after it exited.
    pub returned_ns: u64,
}

impl CliRun {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Panics, showing the command and its output, unless it exited 0.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.success(),
            "{what}: `envguard {}` must exit 0; {}",
            self.args.join(" "),
            self.describe()
        );
    }

    /// Panics unless it exited non-zero (within the timeout).
    pub fn assert_failed(&self, what: &str) {
        assert!(
            self.status.is_some_and(|s| !s.success()),
            "{what}: `envguard {}` must exit non-zero; {}",
            self.args.join(" "),
            self.describe()
        );
    }

    /// Status and output, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "status {:?}, stdout {:?}, stderr {:?}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Its stdout parsed as one JSON value; panics otherwise.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`envguard {}` printed no JSON ({e}); {}",
                self.args.join(" "),
                self.describe()
            )
        })
    }

    /// How long it ran, in ms.
    pub fn elapsed_ms(&self) -> f64 {
        (self.returned_ns - self.started_ns) as f64 / 1e6
    }
}

/// Runs `envguard ARGS...` to completion (killed after [`CLI_TIMEOUT`]),
/// as root or, with `creds`, through `setpriv` (which execs it: the pid is
/// the command's own).
pub fn run_cli(args: &[String], creds: Option<&Creds>) -> CliRun {
    let bin = sys::envguard_bin();
    let mut cmd = match creds {
        None => Command::new(&bin),
        Some(c) => {
            let mut cmd = Command::new("setpriv");
            cmd.args(c.setpriv_args()).arg("--").arg(&bin);
            cmd
        }
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let started_ns = sys::mono_ns();
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {}{} {}: {e}",
            creds.map_or(String::new(), |c| format!(
                "setpriv {:?} -- ",
                c.setpriv_args()
            )),
            bin.display(),
            args.join(" ")
        )
    });
    let pid = child.id();
    let readers = [
        read_all(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        read_all(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ];
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let returned_ns = sys::mono_ns();
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    CliRun {
        args: args.to_vec(),
        status,
        stdout,
        stderr,
        pid,
        started_ns,
        returned_ns,
    }
}

fn read_all(p: Option<Box<dyn Read + Send>>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = p {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// The paths of the unix sockets process `pid` listens on: its socket fds
/// (`/proc/PID/fd`) matched by inode against the listening, named entries
/// of `/proc/net/unix` (the test runs in the agent's network namespace).
pub fn listening_unix_sockets(pid: u32) -> Vec<PathBuf> {
    listening(pid).unwrap_or_default()
}

fn listening(pid: u32) -> Option<Vec<PathBuf>> {
    let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    // The agent's own view: it may run in another network namespace.
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).ok()?;
    // "Num RefCount Protocol Flags Type St Inode Path"; Flags 00010000 is
    // __SO_ACCEPTCON, a listening socket.
    Some(
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let listening = u32::from_str_radix(f.get(3)?, 16).ok()? & 0x0001_0000 != 0;
                let inode: u64 = f.get(6)?.parse().ok()?;
                let path = f.get(7)?;
                (listening && inodes.contains(&inode) && path.starts_with('/'))
                    .then(|| PathBuf::from(path))
            })
            .collect(),
    )
}

/// VmRSS of process `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Connects to the control socket (as the test process: root).
pub fn connect(socket: &Path) -> UnixStream {
    UnixStream::connect(socket).unwrap_or_else(|e| {
        panic!(
            "cannot connect to the control socket {}: {e}",
            socket.display()
        )
    })
}

/// Sends `bytes` on a fresh connection (from a thread: the agent may stop
/// reading and close early, which only ends the write) and returns the
/// first line the agent answers, parsed, within `timeout`. Panics if no
/// JSON line comes.
pub fn raw_request(socket: &Path, bytes: Vec<u8>, timeout: Duration) -> Value {
    let stream = connect(socket);
    let mut writer = stream.try_clone().expect("clone a unix stream");
    let len = bytes.len();
    let w = std::thread::spawn(move || writer.write_all(&bytes));
    let answer = read_answer(&stream, timeout);
    // Writing may have failed once the agent closed: that is its right.
    let _ = w.join();
    let line = answer.unwrap_or_else(|e| {
        panic!(
            "no answer line within {timeout:?} to a request of {len} bytes on {}: {e}",
            socket.display()
        )
    });
    serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!("the agent's answer to a request of {len} bytes is not JSON ({e}): {line:?}")
    })
}

/// Reads one line from `stream` within `timeout`.
pub fn read_answer(stream: &UnixStream, timeout: Duration) -> std::io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    let n = BufReader::new(stream).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        ));
    }
    Ok(line)
}

#[derive(Default)]
struct Lines {
    lines: Vec<Value>,
    bad: Vec<String>,
    eof: bool,
}

/// A subscriber to the agent's event stream: `envguard events --follow`
/// (a child process), or a raw `{"cmd":"events"}` connection. Its lines
/// are collected by a reader thread. The child is killed on drop.
pub struct Subscriber {
    shared: Arc<(Mutex<Lines>, Condvar)>,
    child: Option<Child>,
    /// The raw connection, kept open.
    _stream: Option<UnixStream>,
    desc: String,
}

impl Subscriber {
    /// Starts `envguard events --follow CLIENT_ARGS...`.
    pub fn follow(client_args: &[String]) -> Subscriber {
        let bin = sys::envguard_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(["events", "--follow"])
            .args(client_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start envguard events --follow: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let mut s = Subscriber::collecting(Box::new(out), "envguard events --follow".into());
        s.child = Some(child);
        s
    }

    /// Sends `{"cmd":"events"}` on a fresh connection, checks the answer
    /// line (`{"ok":true,"result":"subscribed"}`) and collects what follows.
    pub fn raw(socket: &Path) -> Subscriber {
        let mut stream = connect(socket);
        stream
            .write_all(b"{\"cmd\":\"events\"}\n")
            .expect("send the events request");
        let mut reader = BufReader::new(stream.try_clone().expect("clone a unix stream"));
        let mut first = String::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a read timeout");
        reader
            .read_line(&mut first)
            .expect("the answer to {\"cmd\":\"events\"}");
        let ack: Value = serde_json::from_str(&first).unwrap_or_else(|e| {
            panic!("answer to {{\"cmd\":\"events\"}} is not JSON ({e}): {first:?}")
        });
        assert_eq!(
            ack,
            serde_json::json!({"ok": true, "result": "subscribed"}),
            "the answer to {{\"cmd\":\"events\"}}"
        );
        stream
            .set_read_timeout(None)
            .expect("clear the read timeout");
        let mut s = Subscriber::collecting(Box::new(reader), "raw events subscriber".into());
        s._stream = Some(stream);
        s
    }

    fn collecting(src: Box<dyn Read + Send>, desc: String) -> Subscriber {
        let shared = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            for line in BufReader::new(src).lines() {
                let Ok(line) = line else { break };
                let mut s = sh.0.lock().unwrap_or_else(|p| p.into_inner());
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => s.lines.push(v),
                    _ => s.bad.push(line),
                }
                sh.1.notify_all();
            }
            sh.0.lock().unwrap_or_else(|p| p.into_inner()).eof = true;
            sh.1.notify_all();
        });
        Subscriber {
            shared,
            child: None,
            _stream: None,
            desc,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lines> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every line received so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lock().lines.clone()
    }

    /// Lines that were not JSON objects.
    pub fn bad(&self) -> Vec<String> {
        self.lock().bad.clone()
    }

    /// Waits (at most `timeout`) until `pred` holds for the lines received
    /// so far; returns them, or `Err` with them.
    pub fn wait_lines(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if pred(&s.lines) {
                return Ok(s.lines.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.eof {
                return Err(s.lines.clone());
            }
            s = self
                .shared
                .1
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn desc(&self) -> &str {
        &self.desc
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `pairs` entry `from -> to` of a `status --json` result; panics,
/// listing the pairs, if there is none.
pub fn pair<'a>(status: &'a Value, from: &str, to: &str) -> &'a Value {
    status["pairs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["from"] == from && p["to"] == to))
        .unwrap_or_else(|| panic!("status has no pair {from} -> {to}: {status}"))
}

/// The value at a dotted path (`actor.uid`) of a JSON object.
pub fn at_path<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

/// Panics, listing every mismatch and the record, unless each
/// `(dotted path, value)` of `want` is what `rec` holds.
pub fn assert_fields(rec: &Value, what: &str, want: &[(&str, Value)]) {
    let errs: Vec<String> = want
        .iter()
        .filter(|(path, w)| at_path(rec, path) != w)
        .map(|(path, w)| format!("{path}: expected {w}, got {}", at_path(rec, path)))
        .collect();
    assert!(
        errs.is_empty(),
        "{what}: wrong record\n  record: {rec}\n  mismatches:\n    {}",
        errs.join("\n    ")
    );
}

/// Checks the header every record carries: `kind`, an RFC 3339 `time`, a
/// numeric `seq`, this run's `boot_id` and this host's name.
pub fn assert_header(rec: &Value, kind: &str, boot_id: &Value, what: &str) {
    assert_fields(
        rec,
        what,
        &[
            ("kind", kind.into()),
            ("boot_id", boot_id.clone()),
            ("host", sys::hostname().into()),
        ],
    );
    assert!(rec["seq"].is_u64(), "{what}: seq must be a number: {rec}");
    if let Err(e) = crate::event::check_time(&rec["time"]) {
        panic!("{what}: time: {e}: {rec}");
    }
}

/// The env × env matrix of `envguard status`'s human output: (from, to)
/// → cell (`allow`, `ports`, `deny`, `audit`, with `*` for a pair with its
/// own mode). Panics if there is no matrix.
pub fn matrix(text: &str) -> std::collections::BTreeMap<(String, String), String> {
    let mut out = std::collections::BTreeMap::new();
    let mut cols: Vec<String> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["from", "\\", "to", envs @ ..] = words.as_slice() {
            cols = envs.iter().map(|e| (*e).to_owned()).collect();
            continue;
        }
        if cols.is_empty() {
            continue;
        }
        if words.len() != cols.len() + 1 {
            cols.clear();
            continue;
        }
        for (to, cell) in cols.iter().zip(&words[1..]) {
            out.insert((words[0].to_owned(), to.clone()), (*cell).to_owned());
        }
    }
    assert!(
        !out.is_empty(),
        "no env matrix in the status output:\n{text}"
    );
    out
}
