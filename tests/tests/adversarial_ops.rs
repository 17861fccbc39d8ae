//! A hostile workload against the agent's own footing (issue 9, items 7 and 9).
//!
//! - Pin root: a pin root (and `layout-x/links` below it) made by uid 65534,
//!   mode 0777, before the agent ever ran: `envguard run` refuses to start,
//!   naming the path, its owner and mode and the fix, and attaches nothing;
//!   `envguard detach` refuses too and removes nothing. The same for a root
//!   pin root with a 65534-owned `links` directory below it.
//! - What the agent makes, even run with umask 000, is root's alone: every
//!   directory 0700, every pin without group/other bits; uid 65534 cannot
//!   unlink a link pin (`rm` through `setpriv`), and enforcement holds.
//! - Mounting bpffs itself (in a mount namespace of its own where
//!   /sys/fs/bpf has none), the agent mounts it 0700.
//! - Control socket: with `--control-group nogroup`, uid 65534 opens 1 100
//!   `events` subscriptions one after the other and 100 idle connections;
//!   root's `status`, `mode audit`, `mode enforce` and `reload` are still
//!   served within a second; exactly 16 subscriptions (the per-uid limit)
//!   and 48 more connections (up to the per-uid 64) are served, every other
//!   connection gets one JSON error line saying which limit, none is closed
//!   silently; `status --json` and the metrics count exactly the refusals.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use envguard_tests::bpf::{self, HOOKS};
use envguard_tests::control::connect;
use envguard_tests::sinks::{TempDir, http_get, parse_metrics, samples};
use envguard_tests::{AgentOptions, Client, Family, Lab, Mode, Proto, Site, sys};
use serde_json::{Value, json};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
/// What an answer to a well-behaved request may take at most.
const PROMPT: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);
const NOBODY: u32 = 65534;

fn gid_of(group: &str) -> u32 {
    let text = std::fs::read_to_string("/etc/group").expect("read /etc/group");
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&group)).then(|| f.get(2)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no group {group:?} in /etc/group (the test needs it)"))
}

fn lstat(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// `path: uid U mode M` for every entry below `root`, for messages.
fn listing(root: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.push_str(&format!(
            "  {} uid {} mode {:04o}\n",
            p.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// The programs attached at the lab's cgroup, per hook.
fn attached(lab: &Lab) -> Vec<(&'static str, Vec<u32>)> {
    HOOKS
        .iter()
        .map(|&(name, ty)| {
            let ids = bpf::query_cgroup(&lab.cg.abs(""), ty)
                .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {name}: {e}"));
            (name, ids)
        })
        .collect()
}

/// Directories made as if by uid 65534 (made here, then given to it, mode
/// 0777); removed on drop, before the lab's pin root guard runs `envguard
/// detach` (which would refuse them).
struct HostileDirs {
    top: PathBuf,
}

impl HostileDirs {
    /// Creates `top` (unless it exists) and `rel` below it; gives `top`'s
    /// new directories (`from_top`) or only `rel`'s to uid 65534, 0777.
    fn create(top: &Path, rel: &str, from_top: bool) -> HostileDirs {
        let made_top = !top.exists();
        std::fs::create_dir_all(top.join(rel))
            .unwrap_or_else(|e| panic!("mkdir -p {}/{rel}: {e}", top.display()));
        let guard = HostileDirs {
            top: top.to_owned(),
        };
        assert!(made_top, "{} existed before the test", top.display());
        let mut p = top.to_owned();
        let mut hostile = Vec::new();
        if from_top {
            hostile.push(p.clone());
        }
        for c in Path::new(rel).components() {
            p.push(c);
            hostile.push(p.clone());
        }
        for d in hostile {
            std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY))
                .unwrap_or_else(|e| panic!("chown 65534 {}: {e}", d.display()));
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                .unwrap_or_else(|e| panic!("chmod 0777 {}: {e}", d.display()));
        }
        guard
    }
}

impl Drop for HostileDirs {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.top)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: cannot remove {}: {e}", self.top.display());
        }
    }
}

/// `envguard run` on the lab's pin root, expected to exit by itself.
fn run_agent(lab: &Lab) -> sys::CmdOutput {
    let (policy, cg, pin) = (
        lab.policy_path().display().to_string(),
        lab.cg.rel(""),
        lab.pin_root().path().display().to_string(),
    );
    sys::run_envguard(
        &sys::envguard_bin(),
        &[
            "run",
            "--policy",
            &policy,
            "--cgroup-root",
            &cg,
            "--pin-root",
            &pin,
            "--detach-on-exit",
        ],
        Duration::from_secs(15),
    )
}

fn assert_refused_pin_root(lab: &Lab, bad: &Path, what: &str) {
    let pin = lab.pin_root().path().to_owned();
    let before = listing(&pin);
    let out = run_agent(lab);
    let fix = format!("rm -rf {}", pin.display());
    let wanted = [
        format!("refusing pin root {}", pin.display()),
        format!("{} is not owned by root", bad.display()),
        "owner uid 65534, mode 0777".to_owned(),
        fix.clone(),
    ];
    assert!(
        out.status.is_some_and(|s| !s.success())
            && wanted.iter().all(|w| out.stderr.contains(w.as_str())),
        "{what}: `envguard run` must refuse to start, saying {wanted:?}; it {} with stdout {:?} and stderr {:?}",
        match out.status {
            None => "was still running after 15 s".to_owned(),
            Some(s) => format!("exited with {s}"),
        },
        out.stdout,
        out.stderr
    );
    let nothing: Vec<(&str, Vec<u32>)> = HOOKS.iter().map(|&(n, _)| (n, vec![])).collect();
    assert_eq!(attached(lab), nothing, "{what}: nothing may be attached");
    assert_eq!(
        listing(&pin),
        before,
        "{what}: the refused agent must neither add to nor repair the tree"
    );
    let detach = sys::envguard_detach(&sys::envguard_bin(), &pin);
    assert!(
        detach.status.is_some_and(|s| !s.success())
            && detach
                .stderr
                .contains(&format!("{} is not owned by root", bad.display()))
            && detach.stderr.contains(&fix),
        "{what}: `envguard detach` must refuse the same way; got {detach:?}"
    );
    assert_eq!(listing(&pin), before, "{what}: detach must remove nothing");
}

#[test]
fn a_pin_tree_another_user_made_is_refused() {
    sys::ensure_bpffs();
    let lab = Lab::new(EGPROBE, Mode::Enforce);
    let pin = lab.pin_root().path().to_owned();
    {
        // The whole pin root is theirs.
        let _hostile = HostileDirs::create(&pin, "layout-x/links", true);
        assert_refused_pin_root(&lab, &pin, "a pin root made by uid 65534");
    }
    {
        // Root's pin root, but a links directory below it is theirs.
        let _hostile = HostileDirs::create(&pin, "layout-x/links", false);
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700 the pin root");
        assert_refused_pin_root(
            &lab,
            &pin.join("layout-x"),
            "a root pin root with layout-x/links made by uid 65534",
        );
    }
}

/// A wrapper that runs the agent with umask 000.
fn umask_wrapper(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("envguard-umask-000");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\numask 000\nexec {} \"$@\"\n",
            sys::envguard_bin().display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn the_pin_tree_is_root_only_whatever_the_umask() {
    let tmp = TempDir::new();
    let wrapper = umask_wrapper(&tmp);
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(
        &lab.remote_place(),
        Proto::Tcp,
        &[Site::Prod.addr(Family::V4)],
        9000,
    );
    lab.spawn_agent(&AgentOptions::ephemeral().binary(&wrapper));
    let before = lab.footprint();
    let pin = lab.pin_root().path().to_owned();
    let prod = std::net::SocketAddr::new(Site::Prod.addr(Family::V4), 9000);
    let r = lab.probe(Client::Dev, Proto::Tcp, prod, 1500);
    assert!(r.is_refused(), "dev -> prod must be refused: {}", r.raw);

    // uid 65534 tries to unlink every link pin.
    let layout = lab.pin_root().layout_dirs().remove(0);
    for (name, _) in HOOKS {
        let link = layout.join("links").join(name);
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(["rm", "-f"])
            .arg(&link)
            .output()
            .unwrap_or_else(|e| panic!("cannot run setpriv rm: {e}"));
        assert!(
            !out.status.success() && std::fs::symlink_metadata(&link).is_ok(),
            "uid 65534 must not be able to unlink the link pin {} (rm {:?}: {}); the tree:\n{}",
            link.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            listing(&pin)
        );
    }
    assert_eq!(
        lab.footprint().link_progs(),
        before.link_progs(),
        "the links must be the agent's, untouched"
    );
    let r = lab.probe(Client::Dev, Proto::Tcp, prod, 1500);
    assert!(
        r.is_refused(),
        "dev -> prod must still be refused after uid 65534's attempts: {}",
        r.raw
    );

    // Every directory 0700 root, every pin root's without group/other bits.
    let mut bad = Vec::new();
    let mut stack = vec![pin.clone()];
    let mut dirs = 0;
    while let Some(p) = stack.pop() {
        let m = lstat(&p);
        let mode = m.mode() & 0o7777;
        if m.is_dir() {
            dirs += 1;
            if m.uid() != 0 || mode != 0o700 {
                bad.push(format!(
                    "{} (directory): uid {} mode {mode:04o}",
                    p.display(),
                    m.uid()
                ));
            }
            for e in std::fs::read_dir(&p).expect("list").flatten() {
                stack.push(e.path());
            }
        } else if m.uid() != 0 || mode & 0o077 != 0 || m.file_type().is_symlink() {
            bad.push(format!(
                "{} (pin): uid {} mode {mode:04o}",
                p.display(),
                m.uid()
            ));
        }
    }
    assert_eq!(dirs, 4, "pin root, layout, maps, links:\n{}", listing(&pin));
    assert!(
        bad.is_empty(),
        "an agent run with umask 000 must still make every directory 0700 root and every pin root's alone:\n{}",
        bad.join("\n")
    );
    lab.stop_agent();
}

/// A wrapper that runs the agent in a mount namespace of its own where
/// /sys/fs/bpf has no bpffs, so that the agent mounts one itself.
fn private_bpffs_wrapper(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("envguard-own-bpffs");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             exec unshare --mount --propagation private sh -c \
             'while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf || exit 1; done; exec \"$0\" \"$@\"' \
             {} \"$@\"\n",
            sys::envguard_bin().display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn the_agent_mounts_bpffs_0700() {
    let tmp = TempDir::new();
    let wrapper = private_bpffs_wrapper(&tmp);
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral().binary(&wrapper));
    let root = PathBuf::from(format!("/proc/{}/root/sys/fs/bpf", lab.agent().pid()));
    assert!(
        sys::is_bpffs(&root),
        "the agent's /sys/fs/bpf ({}) must be the bpffs it mounted",
        root.display()
    );
    let m = lstat(&root);
    assert!(
        m.uid() == 0 && m.mode() & 0o777 == 0o700,
        "the agent must mount bpffs with mode 0700 (as systemd does), not the default 1777: \
         it is uid {} mode {:04o}; agent log:\n{}",
        m.uid(),
        m.mode() & 0o7777,
        lab.agent().stderr()
    );
    assert!(
        attached(&lab).iter().all(|(_, ids)| ids.len() == 1),
        "the agent on its own bpffs must have attached every program: {:?}",
        attached(&lab)
    );
    lab.stop_agent();
}

/// `egprobe ctl-flood` run as uid 65534 (group nogroup), holding its
/// connections until dropped.
struct Flood {
    child: Child,
    report: Value,
}

impl Flood {
    fn start(socket: &Path, gid: u32, events: usize, idle: usize) -> Flood {
        let mut child = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                &gid.to_string(),
                "--clear-groups",
            ])
            .arg(EGPROBE)
            .arg("ctl-flood")
            .arg(socket)
            .arg(events.to_string())
            .arg(idle.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run setpriv egprobe ctl-flood: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut flood = Flood {
            child,
            report: Value::Null,
        };
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        flood.report = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = flood.child.kill();
            let mut err = String::new();
            if let Some(mut e) = flood.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!(
                "egprobe ctl-flood printed no report within 60 s ({e}): {line:?}, stderr {err:?}"
            )
        });
        flood
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        // Closing its stdin lets it go; kill it should it not.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric(addr: std::net::SocketAddr, reason: &str) -> Option<f64> {
    let r = http_get(addr, "/metrics");
    let all = parse_metrics(&r.body);
    samples(
        &all,
        "envguard_control_refused_total",
        &[("reason", reason)],
    )
    .first()
    .map(|s| s.value)
}

#[test]
fn control_group_members_cannot_crowd_root_out() {
    const EVENTS: usize = 1100;
    const IDLE: usize = 100;
    const PER_UID: u64 = 64;
    const SUBS_PER_UID: u64 = 16;
    let nogroup = gid_of("nogroup");
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(
        &AgentOptions::ephemeral()
            .control_group("nogroup")
            .metrics_listen("127.0.0.1:0"),
    );
    let socket = lab.agent().control_socket().to_owned();
    let flood = Flood::start(&socket, nogroup, EVENTS, IDLE);
    let report = &flood.report;

    // Root is served, promptly, while uid 65534 holds all it may.
    for args in [
        &["status", "--json"][..],
        &["mode", "audit"],
        &["mode", "enforce"],
        &["reload"],
    ] {
        let r = lab.cli(args);
        r.assert_ok(&format!(
            "root's `envguard {}` while uid 65534 floods the control socket (flood: {report})",
            args.join(" ")
        ));
        assert!(
            r.elapsed_ms() < PROMPT.as_secs_f64() * 1e3,
            "root's `envguard {}` took {:.0} ms while uid 65534 floods the control socket",
            args.join(" "),
            r.elapsed_ms()
        );
    }
    // Root's own connections are not held to the per-uid limit either.
    let root_idle: Vec<UnixStream> = (0..100).map(|_| connect(&socket)).collect();
    let r = lab.cli(&["status", "--json"]);
    r.assert_ok("root's status with 100 idle root connections and the flood");
    assert!(
        r.elapsed_ms() < PROMPT.as_secs_f64() * 1e3
            && r.json()["control"]["open"]["root"].as_u64() > Some(100),
        "root's status with 100 idle root connections open ({:.0} ms): {}",
        r.elapsed_ms(),
        r.json()["control"]
    );

    // What uid 65534 got: its share, and for every connection over it one
    // JSON line saying why; none closed without a word.
    let subs_error =
        format!("too many event subscriptions from uid {NOBODY} (limit {SUBS_PER_UID})");
    let conn_error = format!("too many connections from uid {NOBODY} (limit {PER_UID})");
    let refused_events = EVENTS as u64 - SUBS_PER_UID;
    let idle_served = PER_UID - SUBS_PER_UID;
    let refused_idle = IDLE as u64 - idle_served;
    assert_eq!(
        report["events"],
        json!({
            "subscribed": SUBS_PER_UID,
            "waiting": 0,
            "errors": {subs_error.clone(): refused_events},
            "silent": 0,
            "reset": 0,
            "other": [],
            "open_after_error": 0,
        }),
        "{EVENTS} events subscriptions from uid {NOBODY}, one after the other: \
         {SUBS_PER_UID} subscribed, every other one refused with one JSON line, then closed"
    );
    assert_eq!(
        report["idle"],
        json!({
            "subscribed": 0,
            "waiting": idle_served,
            "errors": {conn_error.clone(): refused_idle},
            "silent": 0,
            "reset": 0,
            "other": [],
            "open_after_error": 0,
        }),
        "{IDLE} idle connections from uid {NOBODY} holding {SUBS_PER_UID} subscriptions: \
         {idle_served} served (waiting for their request), the rest refused with one JSON line"
    );
    let sentinel: Value = serde_json::from_str(report["sentinel"].as_str().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the sentinel's answer is not JSON ({e}): {report}"));
    assert_eq!(sentinel, json!({"ok": false, "error": conn_error}));

    // Counted: status and metrics.
    let refused_conns = refused_idle + 1;
    let st = lab.status();
    assert_eq!(
        st["control"]["refused"],
        json!({
            "root": 0,
            "others": 0,
            "per_uid": refused_conns,
            "subscribers": 0,
            "subscribers_per_uid": refused_events,
        }),
        "status --json control: {}",
        st["control"]
    );
    assert_eq!(
        st["control"]["refused_total"],
        refused_conns + refused_events,
        "{}",
        st["control"]
    );
    assert_eq!(
        st["control"]["open"]["subscribers"], SUBS_PER_UID,
        "{}",
        st["control"]
    );
    let addr = lab.agent().metrics_addr();
    let deadline = Instant::now() + WAIT;
    loop {
        let got = (
            metric(addr, "per_uid"),
            metric(addr, "subscribers_per_uid"),
            metric(addr, "root"),
        );
        let want = (
            Some(refused_conns as f64),
            Some(refused_events as f64),
            Some(0.0),
        );
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "envguard_control_refused_total (per_uid, subscribers_per_uid, root) must reach {want:?}; it says {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Once the flood is gone, its places come back.
    drop(root_idle);
    drop(flood);
    let deadline = Instant::now() + WAIT;
    loop {
        let open = lab.status()["control"]["open"].clone();
        if open["others"] == 0 && open["subscribers"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "uid 65534's connections must be given back once closed: {open}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = lab.cli(&["status", "--json"]);
    r.assert_ok("status after the flood");
    lab.stop_agent();
}
