//! The agent as the benchmark runs it: `envguard run` on a generated policy,
//! attached at one of the benchmark's own cgroups, with stdout either read
//! by a thread (which timestamps `policy_loaded`) or written straight to a
//! file (the event-throughput sink). Stopped with SIGTERM on drop.
//!
//! The harness's `Agent` checks the test policy's env list, so the benchmark
//! has its own launcher. When the agent has `--pin-root` (pinned,
//! restart-surviving enforcement), every benchmark agent gets its own pin
//! root and `--detach-on-exit`, and the guard makes sure the pins are gone.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use envguard_tests::sys;

/// How long the agent may take to print `policy_loaded`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where stdout goes.
pub enum Sink {
    /// A reader thread counts lines (and keeps the first).
    Pipe,
    /// Straight into this file.
    File(PathBuf),
}

pub struct BenchAgent {
    bin: PathBuf,
    child: Option<Child>,
    pin_root: Option<PathBuf>,
    stderr_path: PathBuf,
    /// Spawn → `policy_loaded` on stdout.
    pub ready_after: Duration,
    pub ready_line: String,
    /// Pipe sink: lines after `policy_loaded` (count, first few).
    extra: Arc<Mutex<(u64, Vec<String>)>>,
}

/// `envguard ARGS --help`, cached per binary and arguments.
fn help_text(bin: &Path, args: &[&str]) -> String {
    type Cache = Mutex<Vec<(PathBuf, String, String)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = args.join(" ");
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, v)) = c.iter().find(|(p, k, _)| p == bin && *k == key) {
        return v.clone();
    }
    let help = Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    c.push((bin.to_owned(), key, help.clone()));
    help
}

/// Whether `envguard run` takes this option (the agent grows features; the
/// benchmark uses them when they are there).
pub fn run_supports(bin: &Path, option: &str) -> bool {
    help_text(bin, &["run"])
        .split(|c: char| c.is_whitespace() || c == ',')
        .any(|w| w == option)
}

/// Whether `envguard` has this subcommand.
pub fn has_command(bin: &Path, command: &str) -> bool {
    let help = help_text(bin, &[]);
    let Some((_, commands)) = help.split_once("Commands:") else {
        return false;
    };
    commands
        .lines()
        .any(|l| l.split_whitespace().next() == Some(command))
}

/// Whether this agent binary pins its state (`run --pin-root`).
fn supports_pinning(bin: &Path) -> bool {
    run_supports(bin, "--pin-root") && run_supports(bin, "--detach-on-exit")
}

impl BenchAgent {
    /// Starts the agent and waits for `policy_loaded`. `tmp` holds its
    /// stderr log.
    pub fn start(
        bin: &Path,
        policy: &Path,
        cgroup_root: &str,
        sink: Sink,
        tmp: &Path,
        extra_args: &[&str],
    ) -> BenchAgent {
        let tag = sys::unique_name("agent");
        let stderr_path = tmp.join(format!("{tag}.stderr"));
        let stderr = std::fs::File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stderr_path.display()));
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .stdin(Stdio::null())
            .stderr(stderr);
        let pin_root = supports_pinning(bin).then(|| {
            PathBuf::from(format!(
                "/sys/fs/bpf/envguard-bench-{}",
                tag.replace('/', "_")
            ))
        });
        if let Some(p) = &pin_root {
            cmd.arg("--pin-root").arg(p).arg("--detach-on-exit");
        }
        cmd.args(extra_args);
        let file_sink = match &sink {
            Sink::Pipe => {
                cmd.stdout(Stdio::piped());
                None
            }
            Sink::File(p) => {
                let f = std::fs::File::create(p)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
                cmd.stdout(f);
                Some(p.clone())
            }
        };
        // Should the benchmark die, the agent still stops (and detaches).
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut agent = BenchAgent {
            bin: bin.to_owned(),
            child: None,
            pin_root,
            stderr_path,
            ready_after: Duration::ZERO,
            ready_line: String::new(),
            extra: Arc::new(Mutex::new((0, Vec::new()))),
        };
        let (ready_at, line) = match file_sink {
            None => {
                let out = child.stdout.take().expect("piped stdout");
                agent.child = Some(child);
                let extra = Arc::clone(&agent.extra);
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    let mut first = true;
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        if std::mem::take(&mut first) {
                            let _ = tx.send((Instant::now(), line));
                            continue;
                        }
                        let mut e = extra.lock().unwrap_or_else(|p| p.into_inner());
                        e.0 += 1;
                        if e.1.len() < 5 {
                            e.1.push(line);
                        }
                    }
                });
                match rx.recv_timeout(READY_TIMEOUT) {
                    Ok(v) => v,
                    Err(_) => agent.fail("printed no policy_loaded line"),
                }
            }
            Some(path) => {
                agent.child = Some(child);
                // Readiness is the first complete line in the file; poll for it.
                let deadline = Instant::now() + READY_TIMEOUT;
                loop {
                    crate::check_interrupted();
                    let s = std::fs::read_to_string(&path).unwrap_or_default();
                    if let Some((first, _)) = s.split_once('\n') {
                        break (Instant::now(), first.to_owned());
                    }
                    if agent.exited() || Instant::now() > deadline {
                        agent.fail("printed no policy_loaded line");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        if !line.contains("\"kind\":\"policy_loaded\"") {
            agent.fail(&format!("printed {line:?} instead of policy_loaded"));
        }
        agent.ready_after = ready_at - start;
        agent.ready_line = line;
        agent
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    fn fail(&mut self, what: &str) -> ! {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        panic!(
            "envguard run {what} (exit status {status:?}); stderr:\n{}",
            stderr.trim_end()
        );
    }

    /// The agent's own pin root, when it pins.
    pub fn pin_root(&self) -> Option<&Path> {
        self.pin_root.as_deref()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Pipe sink: how many lines followed `policy_loaded`, and the first few.
    pub fn events(&self) -> (u64, Vec<String>) {
        self.extra.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// SIGTERM, wait, SIGKILL; then make sure nothing stays pinned.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            sys::signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        eprintln!(
                            "envguard-bench: agent {} ignored SIGTERM; killing it",
                            child.id()
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        if let Some(p) = self.pin_root.take()
            && p.exists()
        {
            let out = Command::new(&self.bin)
                .args(["detach", "--pin-root"])
                .arg(&p)
                .output();
            if let Err(e) = out {
                eprintln!("envguard-bench: cleanup: envguard detach: {e}");
            }
            if p.exists()
                && let Err(e) = std::fs::remove_dir_all(&p)
            {
                eprintln!(
                    "envguard-bench: cleanup: cannot remove {}: {e}",
                    p.display()
                );
            }
        }
    }

    pub fn stop(mut self) {
        self.terminate();
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}
