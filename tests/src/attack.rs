//! Running `egattack` (the adversarial suite's probe) where a test wants it:
//! one-shot scenarios, servers with a readiness line, and interactive runs.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::{Place, Server};

/// The `egattack` binary of a test (`env!("CARGO_BIN_EXE_egattack")`).
pub struct Attacker {
    bin: PathBuf,
}

/// Where and as whom a scenario runs.
fn args(place: &Place, uid: Option<u32>, rest: &[&str]) -> Vec<String> {
    let mut a = place.args();
    if let Some(uid) = uid {
        a.extend(["--uid".to_owned(), uid.to_string()]);
    }
    a.extend(rest.iter().map(|s| (*s).to_owned()));
    a
}

impl Attacker {
    pub fn new(bin: &str) -> Self {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "egattack is missing at {}", bin.display());
        Attacker { bin }
    }

    /// Runs a one-shot scenario and returns the JSON line it printed.
    pub fn run(&self, place: &Place, uid: Option<u32>, rest: &[&str]) -> Value {
        let a = args(place, uid, rest);
        let out = Command::new(&self.bin)
            .args(&a)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run egattack {a:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "egattack {a:?} printed no JSON line ({e}): status {}, stdout {stdout:?}, stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts a server scenario and waits for its readiness line.
    pub fn serve(&self, place: &Place, uid: Option<u32>, rest: &[&str]) -> Server {
        let a = args(&Place::default(), uid, rest);
        Server::start(
            &self.bin,
            place,
            &a,
            format!("egattack {rest:?} at {place:?}"),
        )
    }

    /// Starts an interactive scenario (`tcp-hold`).
    pub fn interactive(&self, place: &Place, uid: Option<u32>, rest: &[&str]) -> Interactive {
        let a = args(place, uid, rest);
        let mut child = Command::new(&self.bin)
            .args(&a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start egattack {a:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Interactive {
            child,
            stdin,
            rx,
            desc: format!("egattack {a:?}"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }
}

/// A running interactive scenario, killed and reaped on drop.
pub struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    desc: String,
}

impl Interactive {
    /// The next JSON line it prints (10 s at most).
    pub fn next(&self) -> Value {
        let line = self
            .rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{} printed nothing more: {e}", self.desc));
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "{} printed a line that is not JSON ({e}): {line}",
                self.desc
            )
        })
    }

    /// The next JSON line it prints within `wait`, if any: for a test that
    /// must see that nothing came.
    pub fn next_within(&self, wait: Duration) -> Option<Value> {
        let line = self.rx.recv_timeout(wait).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "{} printed a line that is not JSON ({e}): {line}",
                self.desc
            )
        }))
    }

    /// Sends one line to its stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap_or_else(|e| panic!("writing to {}: {e}", self.desc));
        stdin.flush().ok();
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
