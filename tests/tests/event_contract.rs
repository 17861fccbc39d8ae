//! The harness's event-contract hook: every line an [`Agent`] prints is
//! checked against `docs/schemas` (schema, header order, no undocumented
//! field), one `boot_id` and a gapless `seq`, and a breach fails the test
//! that owns the agent — whether it stops it or only drops it. Proven with a
//! stand-in agent (a shell script printing chosen lines, exiting 0 on
//! SIGTERM), so no kernel state is involved.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envguard_tests::schema_check::validate_line;
use envguard_tests::sinks::TempDir;
use envguard_tests::{Agent, AgentOptions, Mode, sys};
use serde_json::{Value, json};

const BOOT_ID: &str = "0123456789abcdef0123456789abcdef";

/// A record with the header the contract wants (`time` filled in by the
/// script: `@TIME@`).
fn record(kind: &str, seq: u64, body: Value) -> Value {
    let mut r = serde_json::Map::new();
    r.insert("kind".into(), kind.into());
    r.insert("time".into(), "@TIME@".into());
    r.insert("seq".into(), seq.into());
    r.insert("boot_id".into(), BOOT_ID.into());
    r.insert("host".into(), sys::hostname().into());
    r.extend(body.as_object().expect("an object body").clone());
    Value::Object(r)
}

fn policy_loaded(policy: &Path, pin_root: &Path) -> Value {
    record(
        "policy_loaded",
        0,
        json!({
            "policy": policy.display().to_string(),
            "revision": format!("sha256:{}", "0".repeat(64)),
            "envs": ["dev", "prod", "shared"],
            "mode": "enforce",
            "cgroup_root": "/",
            "hooks": ["post_bind4", "post_bind6", "skb_ingress", "skb_egress",
                      "connect4", "connect6", "sendmsg4", "sendmsg6"],
            "pin_root": pin_root.display().to_string(),
            "adopted": false,
        }),
    )
}

fn violation(seq: u64) -> Value {
    record(
        "violation",
        seq,
        json!({
            "mode": "enforce", "verdict": "denied", "direction": "egress", "hook": "connect4",
            "proto": "tcp",
            "source": {"ip": null, "port": null, "env": "dev", "env_from": "cgroup"},
            "destination": {"ip": "198.18.10.1", "port": 80, "env": "prod", "env_from": "cidr"},
            "process": {"pid": 12898, "comm": "python3", "uid": 0, "cgroup_id": 709,
                        "cgroup": "/dev.slice/app.service"},
            "rule": "default:cross-env (no allow rule for dev -> prod)",
        }),
    )
}

/// The record as the script prints it, with a real time.
fn concrete(v: &Value) -> String {
    v.to_string()
        .replace("@TIME@", "2026-11-23T10:45:47.852301113Z")
}

/// What the stand-in says on stderr once it printed everything.
const PRINTED: &str = "stand-in-printed-all";

/// A stand-in for `envguard run`: prints a `policy_loaded` for its own
/// policy path and pin root, then `extra`, then `tail` without a newline,
/// and exits 0 on SIGTERM/SIGINT.
struct FakeAgent {
    dir: TempDir,
    script: PathBuf,
}

impl FakeAgent {
    fn new(extra: &[Value], tail: Option<&str>) -> FakeAgent {
        let dir = TempDir::new();
        let script = dir.join("fake-envguard");
        let fake = FakeAgent { dir, script };
        let mut lines = vec![policy_loaded(&fake.policy(), &fake.pin_root())];
        lines.extend_from_slice(extra);
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let text = format!(
            "#!/bin/bash\ntrap 'term=1' TERM INT\nT=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)\n\
             cat <<EOF\n{}EOF\nprintf '%s' '{}'\necho {PRINTED} >&2\n\
             while [ -z \"$term\" ]; do sleep 0.05 & wait $!; done\nexit 0\n",
            body.replace("@TIME@", "$T"),
            tail.unwrap_or_default()
        );
        std::fs::write(&fake.script, text).expect("write the stand-in agent");
        let mut perms = std::fs::metadata(&fake.script)
            .expect("stat the stand-in agent")
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&fake.script, perms).expect("chmod the stand-in agent");
        fake
    }

    fn policy(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    fn pin_root(&self) -> PathBuf {
        self.dir.join("pins")
    }

    /// Starts it and waits until it printed everything.
    fn start(&self) -> Agent {
        let agent = Agent::start(
            &self.policy(),
            "/",
            Mode::Enforce,
            &self.pin_root(),
            &AgentOptions::default().binary(&self.script),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.stderr().contains(PRINTED) {
            assert!(
                Instant::now() < deadline,
                "the stand-in agent did not finish printing within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        agent
    }
}

/// The panic message of `f`, which must panic.
fn panic_message(what: &str, f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f))
        .err()
        .unwrap_or_else(|| panic!("{what}: the harness must fail the test, and did not"));
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

#[test]
fn the_stand_in_records_are_schema_valid() {
    // What the failing cases below change is the only thing wrong with them.
    let fake = FakeAgent::new(&[], None);
    for r in [
        policy_loaded(&fake.policy(), &fake.pin_root()),
        violation(1),
    ] {
        validate_line(&concrete(&r)).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_clean_stream_passes_stop_and_drop() {
    let fake = FakeAgent::new(&[violation(1), violation(2)], None);
    let agent = fake.start();
    agent.stop();
    let agent = fake.start();
    drop(agent);
}

#[test]
fn an_undocumented_field_or_unknown_kind_fails_the_test_that_drops_its_agent() {
    let mut extra = violation(1);
    extra["process"]["container"] = "c0ffee".into();
    let mut mystery = violation(2);
    mystery["kind"] = "mystery".into();
    let fake = FakeAgent::new(&[extra, mystery], None);
    let msg = panic_message("an agent dropped without stop", || {
        let agent = fake.start();
        drop(agent);
    });
    for want in [
        "break the event contract",
        "stdout line 1",
        "/process/container",
        "stdout line 2",
        "no schema for kind \"mystery\"",
    ] {
        assert!(
            msg.contains(want),
            "the failure must say {want:?}; it says:\n{msg}"
        );
    }
}

#[test]
fn a_seq_gap_or_a_missing_field_fails_stop() {
    let mut no_rule = violation(3);
    no_rule.as_object_mut().expect("an object").remove("rule");
    let fake = FakeAgent::new(&[violation(1), no_rule], None);
    let msg = panic_message("a stream with a gap", || {
        let agent = fake.start();
        agent.stop();
    });
    for want in ["seq 3 where 2 was due", "stdout line 2", "\"rule\""] {
        assert!(
            msg.contains(want),
            "the failure must say {want:?}; it says:\n{msg}"
        );
    }
}

#[test]
fn only_a_sigkill_excuses_a_line_cut_short() {
    let tail = r#"{"kind":"violation","time":"#;
    let fake = FakeAgent::new(&[violation(1)], Some(tail));
    let agent = fake.start();
    // Its output ends mid-line, as a SIGKILL can leave it: forgiven.
    agent.kill();
    let msg = panic_message("a line cut short without a SIGKILL", || {
        let agent = fake.start();
        drop(agent);
    });
    assert!(
        msg.contains("stdout line 2") && msg.contains("not a JSON record"),
        "the failure must name the cut line; it says:\n{msg}"
    );
}
