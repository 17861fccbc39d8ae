//! Hot reload: `envguard reload` and SIGHUP.
//!
//! While a dev→prod:9001 loop (forbidden by every version of the policy)
//! and a prod→prod:9000 loop (allowed by every version) run at 200/s:
//!
//! 1. A runtime pair mode (dev→shared audit) is set first.
//! 2. The file gains `[[allow]] dev→prod 9000/tcp` and `[[deny]] prod→prod
//!    9001/tcp`; `envguard reload` exits 0 and prints the new revision (the
//!    file's sha256), a new `policy_loaded` names it and the client as
//!    actor, and both rules are in force (deny beats the same-env default);
//!    the runtime pair mode survived.
//! 3. A file with an unknown env in a rule: `reload` exits non-zero with
//!    `FILE:LINE:` on stderr, a `policy_rejected` record says the same, and
//!    the previous policy stays in force (revision and traffic).
//! 4. SIGHUP with the allow rule removed: a new `policy_loaded` (actor: the
//!    agent, comm `SIGHUP`), dev→prod:9000 refused again.
//! 5. SIGHUP with a TOML syntax error: `policy_rejected`, nothing changes.
//!
//! Throughout: no dev→prod:9001 attempt ever connects and no prod→prod
//! attempt fails.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use envguard_tests::control::{assert_fields, assert_header, pair};
use envguard_tests::{
    AgentOptions, Client, ConnectLoop, Family, Lab, Mode, PolicyExtras, Proto, Site, sys,
};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const RATE: u32 = 200;
const WAIT: Duration = Duration::from_secs(10);

const ALLOW_DEV_PROD_9000: &str =
    "[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"9000/tcp\"]\n";
const DENY_PROD_PROD_9001: &str =
    "[[deny]]\nfrom = \"prod\"\nto = \"prod\"\nports = [\"9001/tcp\"]\n";

fn prod(port: u16) -> SocketAddr {
    SocketAddr::new(Site::Prod.addr(Family::V4), port)
}

fn any() -> IpAddr {
    Ipv6Addr::UNSPECIFIED.into()
}

fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {field:?} in {v}"))
}

/// `sha256:<hex>` of the file, as `sha256sum` computes it.
fn revision_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
    assert!(
        out.status.success(),
        "sha256sum {}: {out:?}",
        path.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    format!(
        "sha256:{}",
        text.split_whitespace().next().unwrap_or_default()
    )
}

fn outcome(lab: &Lab, client: Client, dst: SocketAddr) -> &'static str {
    let r = lab.probe(client, Proto::Tcp, dst, 1500);
    if r.ok {
        "connects"
    } else if r.is_refused() {
        "refused"
    } else {
        panic!(
            "{client:?} -> {dst}: neither connected nor refused: {}",
            r.raw
        )
    }
}

/// Asserts each `(client, destination, outcome)`.
fn assert_traffic(lab: &Lab, when: &str, want: &[(Client, SocketAddr, &str)]) {
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|&(c, dst, w)| {
            let got = outcome(lab, c, dst);
            (got != w).then(|| format!("{c:?} -> tcp {dst}: expected it {w}, it {got}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{when}:\n  {}", wrong.join("\n  "));
}

/// The first line after `mark` matching `pred`.
fn next_record(lab: &Lab, mark: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let (at, rec) = lab.agent().wait_for(what, WAIT, |e| pred(e));
    assert!(
        at >= mark,
        "{what}: the matching record {rec} came before the action (line {at} < {mark})"
    );
    rec
}

fn advance(lp: &ConnectLoop, more: u64) {
    let now = lp.latest().map_or(0, |v| count(&v, "attempts"));
    lp.wait_attempts(now + more, WAIT);
}

#[test]
fn reload_and_sighup_swap_good_policies_and_refuse_bad_ones() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    for port in [9000, 9001] {
        lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], port);
    }
    lab.spawn_agent(&AgentOptions::ephemeral());
    let agent_pid = lab.agent().pid();
    let boot_id = lab.agent().ready_line()["boot_id"].clone();
    let path = lab.policy_path().to_owned();
    let shared = SocketAddr::new(Site::Shared.addr(Family::V4), 9000);
    let v1 = revision_of(&path);
    assert_eq!(
        lab.agent().ready_line()["revision"],
        v1.as_str(),
        "policy_loaded's revision is the file's sha256"
    );

    let forbidden = lab.connect_loop(Client::Dev, prod(9001), RATE);
    let allowed = lab.connect_loop(Client::Prod, prod(9000), RATE);
    forbidden.wait_attempts(20, WAIT);
    allowed.wait_attempts(20, WAIT);

    // 1. A runtime pair mode, set before any reload.
    lab.cli(&["mode", "audit", "--from", "dev", "--to", "shared"])
        .assert_ok("mode audit --from dev --to shared");
    assert_traffic(
        &lab,
        "before any reload",
        &[
            (Client::Dev, prod(9000), "refused"),
            (Client::Prod, prod(9001), "connects"),
            (Client::Dev, shared, "connects"),
        ],
    );

    // 2. A good change through `envguard reload`.
    let v2_extras = PolicyExtras {
        allow: ALLOW_DEV_PROD_9000.into(),
        tables: DENY_PROD_PROD_9001.into(),
        ..Default::default()
    };
    lab.set_policy(&v2_extras);
    let v2 = revision_of(&path);
    assert_ne!(v1, v2);
    let mark = lab.agent().len();
    let r = lab.cli(&["reload"]);
    r.assert_ok("reload of a good file");
    assert_eq!(
        r.stdout.trim(),
        format!("reloaded: {v2}"),
        "what `envguard reload` prints"
    );
    let rec = next_record(&lab, mark, "policy_loaded after reload", |e| {
        e["kind"] == "policy_loaded" && e["revision"] == v2.as_str()
    });
    assert_header(
        &rec,
        "policy_loaded",
        &boot_id,
        "policy_loaded after reload",
    );
    let ready = lab.agent().ready_line().clone();
    assert_fields(
        &rec,
        "policy_loaded after reload",
        &[
            ("policy", ready["policy"].clone()),
            ("mode", "enforce".into()),
            ("envs", ready["envs"].clone()),
            ("hooks", ready["hooks"].clone()),
            ("cgroup_root", ready["cgroup_root"].clone()),
            ("pin_root", ready["pin_root"].clone()),
            ("adopted", false.into()),
            ("actor.uid", 0.into()),
            ("actor.pid", r.pid.into()),
            ("actor.comm", "envguard".into()),
        ],
    );
    assert_traffic(
        &lab,
        "after reloading with allow dev->prod 9000/tcp and deny prod->prod 9001/tcp",
        &[
            (Client::Dev, prod(9000), "connects"),
            (Client::Dev, prod(9001), "refused"),
            (Client::Prod, prod(9001), "refused"),
            (Client::Prod, prod(9000), "connects"),
            (Client::Dev, shared, "connects"),
        ],
    );
    let (_, deny_rec) = lab
        .agent()
        .wait_for("the prod -> prod:9001 refusal", WAIT, |e| {
            e["kind"] == "violation"
                && e["source"]["env"] == "prod"
                && e["destination"]["env"] == "prod"
                && e["destination"]["port"] == 9001
        });
    assert_fields(
        &deny_rec,
        "a same-env flow refused by [[deny]]",
        &[("mode", "enforce".into()), ("verdict", "denied".into())],
    );
    let st = lab.status();
    assert_eq!(st["revision"], v2.as_str(), "status revision after reload");
    assert_fields(
        pair(&st, "dev", "shared"),
        "the runtime pair mode set before the reload",
        &[("mode", "audit".into()), ("mode_source", "runtime".into())],
    );
    advance(&forbidden, 10);

    // 3. A broken file through `envguard reload`.
    let good_v2 = lab.policy_text(&v2_extras);
    let broken = format!("{good_v2}\n[[deny]]\nfrom = \"dev\"\nto = \"nowhere\"\n");
    let line = broken
        .lines()
        .position(|l| l.contains("\"nowhere\""))
        .expect("the bad line")
        + 1;
    lab.write_policy_raw(&broken);
    let mark = lab.agent().len();
    let r = lab.cli(&["reload"]);
    r.assert_failed("reload of a file with an unknown env");
    let at = format!("{}:{line}:", path.display());
    assert!(
        r.stderr.contains(&at),
        "a refused reload must say where on stderr ({at}); {}",
        r.describe()
    );
    let rec = next_record(&lab, mark, "policy_rejected after reload", |e| {
        e["kind"] == "policy_rejected"
    });
    assert_header(&rec, "policy_rejected", &boot_id, "policy_rejected");
    assert_fields(
        &rec,
        "policy_rejected after reload",
        &[
            ("policy", path.display().to_string().into()),
            ("actor.uid", 0.into()),
            ("actor.pid", r.pid.into()),
            ("actor.comm", "envguard".into()),
        ],
    );
    assert!(
        rec["error"].as_str().is_some_and(|e| e.contains(&at)),
        "policy_rejected's error must say where ({at}): {rec}"
    );
    // Right after the refusal, the old policy is the one in force.
    assert_traffic(
        &lab,
        "after a refused reload (the previous policy stays)",
        &[
            (Client::Dev, prod(9001), "refused"),
            (Client::Prod, prod(9001), "refused"),
            (Client::Dev, prod(9000), "connects"),
            (Client::Dev, shared, "connects"),
        ],
    );
    assert_eq!(
        lab.status()["revision"],
        v2.as_str(),
        "revision after a refused reload"
    );

    // 4. A good change through SIGHUP.
    let v3_extras = PolicyExtras {
        tables: DENY_PROD_PROD_9001.into(),
        ..Default::default()
    };
    lab.set_policy(&v3_extras);
    let v3 = revision_of(&path);
    let mark = lab.agent().len();
    sys::signal(agent_pid, libc::SIGHUP);
    let rec = next_record(&lab, mark, "policy_loaded after SIGHUP", |e| {
        e["kind"] == "policy_loaded" && e["revision"] == v3.as_str()
    });
    assert_header(
        &rec,
        "policy_loaded",
        &boot_id,
        "policy_loaded after SIGHUP",
    );
    assert_fields(
        &rec,
        "policy_loaded after SIGHUP",
        &[
            ("mode", "enforce".into()),
            ("actor.pid", agent_pid.into()),
            ("actor.comm", "SIGHUP".into()),
        ],
    );
    assert_traffic(
        &lab,
        "after SIGHUP removed the allow rule",
        &[
            (Client::Dev, prod(9000), "refused"),
            (Client::Prod, prod(9001), "refused"),
            (Client::Prod, prod(9000), "connects"),
            (Client::Dev, shared, "connects"),
        ],
    );

    // 5. A broken file through SIGHUP.
    let broken = lab
        .policy_text(&v3_extras)
        .replace("mode = \"enforce\"", "mode = \"enforce");
    let line = broken
        .lines()
        .position(|l| l.starts_with("mode = "))
        .expect("the mode line")
        + 1;
    lab.write_policy_raw(&broken);
    let mark = lab.agent().len();
    sys::signal(agent_pid, libc::SIGHUP);
    let rec = next_record(&lab, mark, "policy_rejected after SIGHUP", |e| {
        e["kind"] == "policy_rejected" && e["actor"]["comm"] == "SIGHUP"
    });
    let at = format!("{}:{line}:", path.display());
    assert!(
        rec["error"].as_str().is_some_and(|e| e.contains(&at)),
        "policy_rejected's error must say where ({at}): {rec}"
    );
    assert_traffic(
        &lab,
        "after SIGHUP with a broken file (the previous policy stays)",
        &[
            (Client::Dev, prod(9000), "refused"),
            (Client::Prod, prod(9001), "refused"),
            (Client::Dev, shared, "connects"),
        ],
    );
    let st = lab.status();
    assert_eq!(
        st["revision"],
        v3.as_str(),
        "revision after a refused SIGHUP"
    );
    assert_fields(
        pair(&st, "dev", "shared"),
        "the runtime pair mode, after three reloads",
        &[("mode", "audit".into()), ("mode_source", "runtime".into())],
    );

    advance(&forbidden, 10);
    let f = forbidden.finish();
    let a = allowed.finish();
    assert!(
        count(&f, "connected") == 0 && count(&f, "eperm") == count(&f, "attempts"),
        "dev -> prod:9001 is forbidden by every version: no attempt may connect across the reloads; \
         got {} connected, {} EPERM of {} ({})",
        count(&f, "connected"),
        count(&f, "eperm"),
        count(&f, "attempts"),
        f["errors"]
    );
    assert!(
        count(&a, "ok") == count(&a, "attempts"),
        "prod -> prod:9000 is allowed by every version: no attempt may fail across the reloads; \
         got {} ok of {} ({})",
        count(&a, "ok"),
        count(&a, "attempts"),
        a["errors"]
    );
    eprintln!(
        "reloads under load: dev->prod:9001 {} attempts, {} let through; prod->prod:9000 {}/{} ok",
        count(&f, "attempts"),
        count(&f, "connected"),
        count(&a, "ok"),
        count(&a, "attempts")
    );
}
