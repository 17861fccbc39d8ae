//! The control socket itself: who may use it, what it does with hostile
//! requests, `status` as a person and a script read it, and the event
//! stream it serves.
//!
//! - Permissions: the default socket is 0600 root, and an unprivileged
//!   user (uid 65534, via `setpriv`) can neither read the status nor change
//!   the mode. With `--control-group nogroup` it is 0660 root:nogroup: a
//!   member reads `status` but `mode` and `reload` are refused with
//!   "permission denied" and change nothing; a non-member cannot connect;
//!   a member holding CAP_NET_ADMIN is refused too: only a client that
//!   connected as root may change state (capabilities can be gained after
//!   connecting, see the setuid test).
//! - Hostile clients: idle and half-sent requests do not stall a
//!   concurrent `status` and are cut off after 5 s; garbage, binary junk,
//!   a line one byte over 64 KiB (and 1 MiB without a newline), an
//!   unknown command, wrong types and unknown fields each get
//!   `{"ok":false,...}`; a request of exactly 64 KiB is served; the agent
//!   keeps serving and nothing changed.
//! - `status`: every line of the human output fits 80 columns, no colour
//!   codes when stdout is not a terminal; after k refused dev→prod
//!   attempts (TCP connects and UDP datagrams) and m allowed prod→prod
//!   connections, `--json` counts exactly k denied and m allowed, and the
//!   human counters say the same.
//! - Events: `envguard events --follow` and a raw `{"cmd":"events"}`
//!   subscriber receive exactly the agent's stdout records (same lines,
//!   `seq`, `boot_id`), in order and without gaps, from when they
//!   subscribed; one going away changes nothing for the others.

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use envguard_tests::agent::dump_lines;
use envguard_tests::control::{
    Creds, assert_fields, connect, matrix, pair, raw_request, read_answer,
};
use envguard_tests::process::udp_burst;
use envguard_tests::{
    AgentOptions, Client, Family, Lab, Mode, PolicyExtras, Proto, Site, Subscriber, sys,
};
use serde_json::{Value, json};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const WAIT: Duration = Duration::from_secs(10);
/// The documented request size limit.
const MAX_REQUEST: usize = 64 * 1024;
/// What an answer to a well-behaved request may take at most.
const PROMPT: Duration = Duration::from_secs(1);

fn at(site: Site, port: u16) -> SocketAddr {
    SocketAddr::new(site.addr(Family::V4), port)
}

fn any() -> IpAddr {
    Ipv6Addr::UNSPECIFIED.into()
}

/// gid of a group, from /etc/group.
fn gid_of(group: &str) -> u32 {
    let text = std::fs::read_to_string("/etc/group").expect("read /etc/group");
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&group)).then(|| f.get(2)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no group {group:?} in /etc/group (the test needs it)"))
}

/// Mode bits and group of the agent's control socket.
fn socket_perms(lab: &Lab) -> (u32, u32, u32) {
    let path = lab.agent().control_socket();
    let md = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (md.permissions().mode() & 0o7777, md.uid(), md.gid())
}

/// No `mode_change`/`policy_loaded`/`policy_rejected` record after `mark`,
/// proven with a sentinel: a status request cannot emit one, so a root
/// `mode` change of an untouched pair is used and must be the first.
fn assert_nothing_changed(lab: &Lab, mark: usize, why: &str) {
    let s = lab.cli(&["mode", "enforce", "--from", "shared", "--to", "dev"]);
    s.assert_ok("the sentinel mode change");
    let (at, _) = lab.agent().wait_for("the sentinel mode change", WAIT, |e| {
        e["kind"] == "mode_change" && e["actor"]["pid"] == s.pid
    });
    let stray: Vec<Value> = lab
        .agent()
        .lines(mark..at)
        .into_iter()
        .filter(|e| {
            matches!(
                e["kind"].as_str(),
                Some("mode_change" | "policy_loaded" | "policy_rejected")
            )
        })
        .collect();
    assert!(
        stray.is_empty(),
        "{why}: no state may have changed, yet the agent recorded:\n{}",
        dump_lines(&stray)
    );
}

#[test]
fn root_only_socket_refuses_unprivileged_users() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral());
    assert_eq!(
        socket_perms(&lab),
        (0o600, 0, 0),
        "the default control socket is 0600 root:root"
    );
    let mark = lab.agent().len();
    let nobody = Creds::nobody(65534);
    for args in [
        &["status", "--json"][..],
        &["mode", "audit"],
        &["reload"],
        &["events"],
    ] {
        let r = lab.agent().cli(args, Some(&nobody));
        r.assert_failed(&format!("{} as uid 65534 on the 0600 socket", args[0]));
        assert!(
            r.stderr.contains("Permission denied"),
            "{} as uid 65534: the refusal must say why; {}",
            args[0],
            r.describe()
        );
    }
    // Even with CAP_NET_ADMIN: the file mode decides who may connect.
    let r = lab
        .agent()
        .cli(&["mode", "audit"], Some(&nobody.clone().with_net_admin()));
    r.assert_failed("mode audit as uid 65534 with CAP_NET_ADMIN on the 0600 socket");
    let st = lab.status();
    assert_fields(
        &st,
        "status after the refused requests",
        &[("mode", "enforce".into()), ("mode_source", "policy".into())],
    );
    assert_nothing_changed(&lab, mark, "requests by uid 65534 on a 0600 socket");
}

#[test]
fn control_group_reads_status_but_may_not_change_state() {
    let nogroup = gid_of("nogroup");
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral().control_group("nogroup"));
    assert_eq!(
        socket_perms(&lab),
        (0o660, 0, nogroup),
        "with --control-group nogroup the socket is 0660 root:nogroup"
    );
    let mark = lab.agent().len();
    let member = Creds::nobody(nogroup);
    let r = lab.agent().cli(&["status", "--json"], Some(&member));
    r.assert_ok("status as a member of the control group");
    let st = r.json();
    assert_eq!(st["pid"], lab.agent().pid(), "status as a member: {st}");
    let r = lab.agent().cli(&["status"], Some(&member));
    r.assert_ok("human status as a member of the control group");
    for args in [
        &["mode", "audit"][..],
        &[
            "mode", "audit", "--from", "dev", "--to", "prod", "--for", "1h",
        ],
        &["reload"],
    ] {
        let r = lab.agent().cli(args, Some(&member));
        r.assert_failed(&format!(
            "`{}` as a member without CAP_NET_ADMIN",
            args.join(" ")
        ));
        assert!(
            r.stderr.contains("permission denied"),
            "`{}` as uid 65534: the refusal must say \"permission denied\"; {}",
            args.join(" "),
            r.describe()
        );
    }
    let r = lab
        .agent()
        .cli(&["status", "--json"], Some(&Creds::nobody(1)));
    r.assert_failed("status as uid 65534 outside the control group");
    assert!(
        r.stderr.contains("Permission denied"),
        "outside the group, connecting is refused: {}",
        r.describe()
    );
    // Nothing changed.
    let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 1500);
    assert!(r.is_refused(), "dev -> prod still enforced: {}", r.raw);
    let st = lab.status();
    assert_eq!(st["pending_reverts"], json!([]), "{st}");
    assert_fields(
        &st,
        "status after refused changes",
        &[("mode", "enforce".into()), ("mode_source", "policy".into())],
    );
    assert_nothing_changed(
        &lab,
        mark,
        "mode/reload by a group member without CAP_NET_ADMIN",
    );

    // A member with CAP_NET_ADMIN is refused as well: the agent trusts only
    // the uid the kernel recorded at connect time.
    let admin = member.with_net_admin();
    let r = lab.agent().cli(
        &["mode", "audit", "--from", "dev", "--to", "prod"],
        Some(&admin),
    );
    r.assert_failed("mode as a group member holding CAP_NET_ADMIN");
    assert!(
        r.stderr.contains("permission denied"),
        "CAP_NET_ADMIN without root: {}",
        r.describe()
    );
    let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 1500);
    assert!(r.is_refused(), "dev -> prod still enforced: {}", r.raw);
}

/// A setuid-root copy of egprobe in the temp dir, removed on drop.
struct SetuidCopy(std::path::PathBuf);

impl SetuidCopy {
    fn new() -> SetuidCopy {
        let path = std::env::temp_dir().join(sys::unique_name("envguard-suid-egprobe"));
        std::fs::copy(EGPROBE, &path)
            .unwrap_or_else(|e| panic!("copy egprobe to {}: {e}", path.display()));
        let copy = SetuidCopy(path);
        std::fs::set_permissions(&copy.0, std::fs::Permissions::from_mode(0o4755))
            .unwrap_or_else(|e| panic!("chmod 4755 {}: {e}", copy.0.display()));
        copy
    }
}

impl Drop for SetuidCopy {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            eprintln!("envguard-tests: cleanup: remove {}: {e}", self.0.display());
        }
    }
}

#[test]
fn a_member_cannot_borrow_privileges_after_connecting() {
    // A member of the control group connects without any privilege, then
    // the connecting process execs a setuid-root program (as `passwd` or
    // `chsh` waiting at their prompt would be) while a child of it sends
    // `mode audit` on the connection. The caller that connected had no
    // right to change anything; the request must be refused.
    let nogroup = gid_of("nogroup");
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral().control_group("nogroup"));
    let mark = lab.agent().len();
    let suid = SetuidCopy::new();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            &nogroup.to_string(),
            "--clear-groups",
        ])
        .arg(EGPROBE)
        .arg("ctl-race")
        .arg(lab.agent().control_socket())
        .arg(r#"{"cmd":"mode","mode":"audit"}"#)
        .arg(&suid.0)
        .args(["hold", "1000"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run setpriv egprobe ctl-race: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "egprobe ctl-race printed no report ({e}): {out:?}, stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        report["peer_had_net_admin"],
        true,
        "test setup: the setuid-root copy {} must run with CAP_NET_ADMIN (is the temp dir mounted nosuid?): {report}",
        suid.0.display()
    );
    let answer: Value = report["answer"]
        .as_str()
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_else(|| panic!("no JSON answer from the agent: {report}"));
    let changed = lab.status()["mode"] != "enforce";
    assert!(
        answer["ok"] == false
            && answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("permission denied"))
            && !changed,
        "uid 65534 connected without any capability: its `mode audit` must be refused with \
         \"permission denied\" and change nothing, whatever the connecting process execs afterwards; \
         the agent answered {answer} and the global mode is now {} (records: {})",
        lab.status()["mode"],
        dump_lines(&lab.agent().lines(mark..lab.agent().len()))
    );
    assert_nothing_changed(
        &lab,
        mark,
        "a request after the connecting process gained privileges",
    );
}

/// Sends `bytes`, expects `{"ok":false,"error":...}` (with `needle` in the
/// error, if given) within [`PROMPT`] (plus transfer time).
fn assert_refused_request(lab: &Lab, what: &str, bytes: Vec<u8>, needle: Option<&str>) {
    let t = Instant::now();
    let v = raw_request(lab.agent().control_socket(), bytes, Duration::from_secs(5));
    assert!(
        v["ok"] == false && v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: must get {{\"ok\":false,\"error\":...}}, got {v}"
    );
    if let Some(n) = needle {
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(n)),
            "{what}: the error must mention {n:?}: {v}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{what}: answered after {:?}",
        t.elapsed()
    );
}

/// `status` over a raw connection answers promptly and correctly.
fn assert_status_served(lab: &Lab, when: &str) {
    let t = Instant::now();
    let v = raw_request(
        lab.agent().control_socket(),
        b"{\"cmd\":\"status\"}\n".to_vec(),
        PROMPT,
    );
    assert!(
        v["ok"] == true && v["result"]["pid"] == lab.agent().pid(),
        "{when}: status must be served; got {v}"
    );
    assert!(
        t.elapsed() < PROMPT,
        "{when}: status took {:?}",
        t.elapsed()
    );
}

#[test]
fn hostile_clients_get_errors_and_never_stall_the_agent() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    // An explicit --control-socket (the client commands get it too); the
    // agent removes it when it stops, the harness if the agent could not.
    let path = std::env::temp_dir().join(format!("{}.sock", sys::unique_name("envguard-ctl")));
    lab.spawn_agent(&AgentOptions::ephemeral().control_socket(&path));
    let socket = lab.agent().control_socket().to_owned();
    assert_eq!(
        socket, path,
        "the agent listens where --control-socket said"
    );
    let mark = lab.agent().len();

    // Idle clients: one sends nothing, one half a request; 100 more idle.
    let opened = Instant::now();
    let silent = connect(&socket);
    let mut partial = connect(&socket);
    partial
        .write_all(b"{\"cmd\":\"sta")
        .expect("send half a request");
    let idle: Vec<UnixStream> = (0..100).map(|_| connect(&socket)).collect();
    assert_status_served(&lab, "with 102 idle clients connected");
    let r = lab.cli(&["status", "--json"]);
    r.assert_ok("envguard status with idle clients connected");
    assert!(
        r.elapsed_ms() < PROMPT.as_secs_f64() * 1e3,
        "envguard status took {:.0} ms with idle clients connected",
        r.elapsed_ms()
    );

    let line = |s: &str| format!("{s}\n").into_bytes();
    assert_refused_request(
        &lab,
        "a line that is not JSON",
        line("hello agent"),
        Some("malformed"),
    );
    assert_refused_request(
        &lab,
        "binary junk",
        (0u8..=255).chain([b'\n']).collect(),
        None,
    );
    assert_refused_request(&lab, "an empty line", line(""), None);
    assert_refused_request(&lab, "a JSON array", line("[1,2,3]"), None);
    assert_refused_request(&lab, "JSON without cmd", line("{\"mode\":\"audit\"}"), None);
    assert_refused_request(
        &lab,
        "an unknown command",
        line(r#"{"cmd":"shutdown"}"#),
        Some("shutdown"),
    );
    assert_refused_request(
        &lab,
        "a mode of the wrong type",
        line(r#"{"cmd":"mode","mode":1}"#),
        None,
    );
    assert_refused_request(
        &lab,
        "an unknown mode",
        line(r#"{"cmd":"mode","mode":"off"}"#),
        None,
    );
    assert_refused_request(
        &lab,
        "a negative duration",
        line(r#"{"cmd":"mode","mode":"audit","for_secs":-1}"#),
        None,
    );
    assert_refused_request(
        &lab,
        "a pair with one side",
        line(r#"{"cmd":"mode","mode":"audit","from":"dev"}"#),
        None,
    );
    assert_refused_request(
        &lab,
        "an unknown env",
        line(r#"{"cmd":"mode","mode":"audit","from":"dev","to":"qa"}"#),
        Some("qa"),
    );
    // Size: exactly the limit (newline included) is served; one byte more is not.
    let padded = |total: usize| {
        let mut b = b"{\"cmd\":\"status\"}".to_vec();
        b.resize(total - 1, b' ');
        b.push(b'\n');
        b
    };
    let v = raw_request(&socket, padded(MAX_REQUEST), Duration::from_secs(5));
    assert!(
        v["ok"] == true,
        "a {MAX_REQUEST}-byte request (newline included) is within the limit: {v}"
    );
    assert_refused_request(
        &lab,
        "a line one byte over 64 KiB",
        padded(MAX_REQUEST + 1),
        Some("larger"),
    );
    assert_refused_request(
        &lab,
        "1 MiB without a newline",
        vec![b'x'; 1 << 20],
        Some("larger"),
    );
    assert_status_served(&lab, "after the hostile requests");

    // The idle ones are cut off after 5 s, with an error.
    for (what, stream) in [("a silent client", &silent), ("half a request", &partial)] {
        let left = Duration::from_secs(8).saturating_sub(opened.elapsed());
        let answer = read_answer(stream, left)
            .unwrap_or_else(|e| panic!("{what}: no answer within 8 s of connecting: {e}"));
        let waited = opened.elapsed();
        let v: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{what}: answer is not JSON ({e}): {answer:?}"));
        assert!(
            v["ok"] == false && waited >= Duration::from_millis(4500),
            "{what}: must be refused once the 5 s are up (after {waited:?}): {v}"
        );
    }
    drop(idle);
    let st = lab.status();
    assert_fields(
        &st,
        "status after hostile clients",
        &[("mode", "enforce".into()), ("mode_source", "policy".into())],
    );
    assert_eq!(st["pending_reverts"], json!([]), "{st}");
    assert_nothing_changed(&lab, mark, "hostile requests");
}

#[test]
fn unknown_fields_are_refused_for_every_command() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral());
    let mark = lab.agent().len();
    let mut accepted = Vec::new();
    for req in [
        r#"{"cmd":"status","verbose":true}"#,
        r#"{"cmd":"mode","mode":"audit","scope":"all"}"#,
        r#"{"cmd":"reload","policy":"/etc/passwd"}"#,
        r#"{"cmd":"events","since":0}"#,
    ] {
        let v = raw_request(
            lab.agent().control_socket(),
            format!("{req}\n").into_bytes(),
            Duration::from_secs(5),
        );
        if v["ok"] != false {
            accepted.push(format!("{req} -> {v}"));
        }
    }
    assert!(
        accepted.is_empty(),
        "requests are schema-checked: an unknown field must be refused with {{\"ok\":false}} \
         and change nothing, but the agent accepted:\n  {}",
        accepted.join("\n  ")
    );
    assert_nothing_changed(&lab, mark, "requests with unknown fields");
}

#[test]
fn status_fits_80_columns_and_counts_exactly() {
    let extras = PolicyExtras::dev_to_staging_audited();
    let mut lab = Lab::with_policy(EGPROBE, Mode::Enforce, &extras);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral());
    // Something in every part of the output: a runtime pair mode and a
    // pending break-glass revert.
    lab.cli(&["mode", "audit", "--from", "prod", "--to", "dev"])
        .assert_ok("mode audit --from prod --to dev");
    lab.cli(&[
        "mode", "audit", "--from", "staging", "--to", "dev", "--for", "10m",
    ])
    .assert_ok("mode audit --from staging --to dev --for 10m");

    // k refused dev -> prod attempts: TCP connects and UDP datagrams.
    const TCP: u64 = 3;
    const UDP: u32 = 20;
    for _ in 0..TCP {
        let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 1500);
        assert!(r.is_refused(), "dev -> prod refused: {}", r.raw);
    }
    let b = udp_burst(
        lab.egprobe(),
        &lab.client_place(Client::Dev),
        at(Site::Prod, 9999),
        UDP,
    );
    assert!(
        b["eperm"] == UDP && b["ok"] == 0,
        "all {UDP} datagrams refused: {b}"
    );
    let k = TCP + u64::from(UDP);
    // m allowed prod -> prod connections.
    const M: u64 = 4;
    for _ in 0..M {
        let r = lab.probe(Client::Prod, Proto::Tcp, at(Site::Prod, 9000), 3000);
        assert!(r.ok, "prod -> prod connects: {}", r.raw);
    }

    let st = lab.status();
    let ready = lab.agent().ready_line().clone();
    assert_fields(
        &st,
        "status --json",
        &[
            ("pid", lab.agent().pid().into()),
            ("policy", ready["policy"].clone()),
            ("revision", ready["revision"].clone()),
            ("mode", "enforce".into()),
            ("mode_source", "policy".into()),
            ("cgroup_root", ready["cgroup_root"].clone()),
            ("hooks", ready["hooks"].clone()),
            ("pin_root", ready["pin_root"].clone()),
            ("adopted", false.into()),
            (
                "envs",
                json!(["host", "world", "dev", "prod", "shared", "staging"]),
            ),
        ],
    );
    let mut keys: Vec<&str> = st
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    for key in [
        "since",
        "uptime_s",
        "pid",
        "policy",
        "revision",
        "mode",
        "mode_source",
        "cgroup_root",
        "hooks",
        "pin_root",
        "adopted",
        "envs",
        "pending_reverts",
        "pairs",
    ] {
        assert!(keys.contains(&key), "status --json lacks {key:?}: {keys:?}");
    }
    assert!(
        st["uptime_s"].is_u64() && envguard_tests::event::check_time(&st["since"]).is_ok(),
        "status --json: since and uptime_s: {st}"
    );
    assert_eq!(
        st["pairs"].as_array().map(Vec::len),
        Some(36),
        "status --json: one pair per (from, to) of the 6 envs"
    );
    assert_eq!(
        st["pending_reverts"].as_array().map(Vec::len),
        Some(1),
        "status --json: the pending revert of staging->dev: {}",
        st["pending_reverts"]
    );
    let counts = |from: &str, to: &str| {
        let p = pair(&st, from, to);
        [&p["allowed"], &p["denied"], &p["audited"]].map(|v| {
            v.as_u64()
                .unwrap_or_else(|| panic!("pair {from} -> {to} without counters: {p}"))
        })
    };
    assert_eq!(
        counts("dev", "prod"),
        [0, k, 0],
        "dev -> prod [allowed, denied, audited] after {TCP} refused connects and {UDP} refused datagrams"
    );
    assert_eq!(
        counts("prod", "prod"),
        [M, 0, 0],
        "prod -> prod [allowed, denied, audited] after {M} connections"
    );
    let others: Vec<String> = st["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .filter(|p| p["to"] != "prod" || (p["from"] != "dev" && p["from"] != "prod"))
        .filter(|p| p["allowed"] != 0 || p["denied"] != 0 || p["audited"] != 0)
        .map(ToString::to_string)
        .collect();
    assert!(
        others.is_empty(),
        "no other decisions were made: {others:?}"
    );

    let r = lab.cli(&["status"]);
    r.assert_ok("status");
    let text = &r.stdout;
    assert!(
        !text.contains('\x1b'),
        "no colour codes when stdout is not a terminal:\n{text}"
    );
    for (label, want) in [("dev -> prod", [0, k, 0]), ("prod -> prod", [M, 0, 0])] {
        let row = text
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no counters row {label:?}:\n{text}"));
        let nums: Vec<u64> = row[label.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap_or(u64::MAX))
            .collect();
        assert_eq!(nums, want, "counters row {row:?}");
    }
    let m = matrix(text);
    let envs: Vec<&str> = ["host", "world", "dev", "prod", "shared", "staging"].to_vec();
    for from in &envs {
        for to in &envs {
            assert!(
                m.contains_key(&((*from).to_owned(), (*to).to_owned())),
                "the matrix lacks {from} -> {to}:\n{text}"
            );
        }
    }
    for ((from, to), cell) in [
        (("dev", "prod"), "deny"),
        (("prod", "dev"), "audit*"),
        (("staging", "dev"), "audit*"),
        (("dev", "staging"), "audit*"),
        (("prod", "shared"), "ports"),
        (("prod", "prod"), "allow"),
    ] {
        assert_eq!(
            m.get(&(from.to_owned(), to.to_owned())).map(String::as_str),
            Some(cell),
            "matrix cell {from} -> {to}:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("pending") && l.contains("staging->dev")),
        "the pending revert of staging->dev must show:\n{text}"
    );
    // Last, so that the checks above run whatever this says.
    let wide: Vec<String> = text
        .lines()
        .filter(|l| l.chars().count() > 80)
        .map(|l| format!("{} columns: {l:?}", l.chars().count()))
        .collect();
    assert!(
        wide.is_empty(),
        "every line of `envguard status` must fit 80 columns:\n  {}\nwhole output:\n{text}",
        wide.join("\n  ")
    );
}

/// Checks that `got` is a gapless run of the agent's stdout records: each
/// line equal to the stdout line with its `seq` (stdout line i has seq i).
fn assert_same_records(lab: &Lab, who: &str, got: &[Value]) {
    let first = got
        .first()
        .unwrap_or_else(|| panic!("{who} received nothing"));
    let from = first["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("{who}: a record without seq: {first}")) as usize;
    let stdout = lab.agent().lines(0..from + got.len());
    for (i, l) in stdout.iter().enumerate() {
        assert_eq!(
            l["seq"], i,
            "the agent's stdout line {i} must have seq {i}: {l}"
        );
    }
    for (j, rec) in got.iter().enumerate() {
        assert_eq!(
            Some(rec),
            stdout.get(from + j),
            "{who}: its record {j} must be the agent's stdout record with seq {} (same fields, same boot_id)",
            from + j
        );
    }
}

#[test]
fn event_subscribers_see_exactly_the_stdout_records() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral());
    let boot_id = lab.agent().ready_line()["boot_id"].clone();
    let follower = Subscriber::follow(&lab.agent().client_args());
    let raw = Subscriber::raw(lab.agent().control_socket());
    // The raw one is subscribed once it got its answer; the CLI one once it
    // prints what the agent emits: emit records until it does.
    let deadline = Instant::now() + WAIT;
    while follower.lines().is_empty() {
        assert!(
            Instant::now() < deadline,
            "envguard events --follow printed nothing within {WAIT:?} of violations; bad lines {:?}",
            follower.bad()
        );
        let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 1500);
        assert!(r.is_refused(), "{}", r.raw);
        let _ = follower.wait_lines(Duration::from_millis(100), |l| !l.is_empty());
    }

    // Records of every kind the control socket causes, and violations.
    lab.cli(&["mode", "audit", "--from", "dev", "--to", "prod"])
        .assert_ok("mode audit --from dev --to prod");
    let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 3000);
    assert!(r.ok, "{}", r.raw);
    lab.cli(&["mode", "enforce", "--from", "dev", "--to", "prod"])
        .assert_ok("mode enforce --from dev --to prod");
    lab.cli(&["reload"]).assert_ok("reload");
    let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 1500);
    assert!(r.is_refused(), "{}", r.raw);
    let (last, _) = lab.agent().wait_for("the last violation", WAIT, |e| {
        e["kind"] == "violation" && e["process"]["pid"] == r.pid
    });

    // A non-following `envguard events` ends by itself once it is quiet.
    let quiet = lab.cli(&["events"]);
    quiet.assert_ok("envguard events (without --follow)");
    assert!(
        quiet.elapsed_ms() < 5000.0,
        "envguard events without --follow must exit once idle; it took {:.0} ms",
        quiet.elapsed_ms()
    );

    for sub in [&follower, &raw] {
        let got = sub
            .wait_lines(WAIT, |l| {
                l.last()
                    .is_some_and(|e| e["seq"].as_u64() >= Some(last as u64))
            })
            .unwrap_or_else(|l| {
                panic!(
                    "{} did not receive up to seq {last} within {WAIT:?}; it got:\n{}",
                    sub.desc(),
                    dump_lines(&l)
                )
            });
        assert!(
            sub.bad().is_empty(),
            "{}: non-JSON lines {:?}",
            sub.desc(),
            sub.bad()
        );
        assert_same_records(&lab, sub.desc(), &got);
        for kind in ["mode_change", "policy_loaded", "violation"] {
            assert!(
                got.iter()
                    .any(|e| e["kind"] == kind && e["boot_id"] == boot_id),
                "{} must have received a {kind} record of this run:\n{}",
                sub.desc(),
                dump_lines(&got)
            );
        }
    }
    // The raw subscriber subscribed before any of these records: it has them all.
    let raw_first = raw.lines()[0]["seq"].as_u64().unwrap_or(u64::MAX);
    assert!(
        raw_first <= 1,
        "the raw subscriber was subscribed before the first violation (seq 1): first seq {raw_first}"
    );

    // A subscriber that goes away changes nothing for the others.
    drop(follower);
    let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 1500);
    assert!(r.is_refused(), "{}", r.raw);
    let (at, _) = lab
        .agent()
        .wait_for("a violation after a subscriber left", WAIT, |e| {
            e["kind"] == "violation" && e["process"]["pid"] == r.pid
        });
    let got = raw
        .wait_lines(WAIT, |l| {
            l.last()
                .is_some_and(|e| e["seq"].as_u64() >= Some(at as u64))
        })
        .unwrap_or_else(|l| panic!("the raw subscriber stopped receiving:\n{}", dump_lines(&l)));
    assert_same_records(&lab, raw.desc(), &got);
}
