//! The JSON Schemas in docs/schemas against example records of every kind:
//! hand-written ones in the README's shapes, and records made by the agent's
//! own serializers (`events::Stream` with the real bodies).
#[path = "support/schema_check.rs"]
mod schema_check;

use std::{net::Ipv6Addr, path::Path};

use envguard_agent::{
    events::{self, CounterRecord, LostEvents, Stream},
    policy::{Policy, compile::compile},
    sys::CgroupNames,
};
use envguard_common::event::{self as ev, ViolationEvent};
use schema_check::{SCHEMAS, check_stream, schemas, validate_line};
use serde_json::{Value, json};

const TIME: &str = "2026-11-23T10:45:47.852301113Z";
const BOOT_ID: &str = "5f0c7e0e94a44b8e9a572f5d0e6f6c11";

fn header(kind: &str, seq: u64) -> Value {
    json!({"kind": kind, "time": TIME, "seq": seq, "boot_id": BOOT_ID, "host": "vm"})
}

fn with(mut head: Value, body: Value) -> Value {
    let (Value::Object(h), Value::Object(b)) = (&mut head, body) else {
        unreachable!()
    };
    h.extend(b);
    head
}

fn violation_body() -> Value {
    json!({
        "mode": "enforce", "verdict": "denied", "direction": "egress", "hook": "connect4", "proto": "tcp",
        "source": {"ip": null, "port": null, "env": "dev", "env_from": "cgroup"},
        "destination": {"ip": "198.18.10.1", "port": 80, "env": "prod", "env_from": "cidr"},
        "process": {"pid": 12898, "comm": "python3", "uid": 0, "cgroup_id": 709, "cgroup": "/dev.slice/app.service"},
        "rule": "default:cross-env (no allow rule for dev -> prod)"
    })
}

fn actor() -> Value {
    json!({"uid": 0, "pid": 4242, "comm": "envguard"})
}

/// One example of every kind, in the documented shapes.
fn examples() -> Vec<Value> {
    let rollup = json!({
        "count": 41, "first_seen": "2026-11-23T10:45:37.852301113Z", "last_seen": TIME,
        "mode": "enforce", "verdict": "denied", "direction": "egress", "hook": "connect4", "proto": "tcp",
        "source": {"ip": null, "port": null, "env": "dev"},
        "destination": {"ip": "198.18.10.1", "port": 80, "env": "prod"},
        "process": {"pid": null, "comm": null, "uid": null, "cgroup_id": 709, "cgroup": "/dev.slice/app.service"}
    });
    vec![
        with(
            header("policy_loaded", 0),
            json!({
                "policy": "/etc/envguard/policy.toml",
                "revision": format!("sha256:{}", "4d".repeat(32)),
                "envs": ["dev", "prod"], "mode": "enforce", "cgroup_root": "/",
                "hooks": ["post_bind4", "post_bind6", "skb_ingress", "skb_egress",
                          "connect4", "connect6", "sendmsg4", "sendmsg6"],
                "pin_root": "/sys/fs/bpf/envguard", "adopted": false
            }),
        ),
        with(
            header("agent_gap", 1),
            json!({"gap_ms": 31000, "envs_failed_open": ["dev"], "envs_failed_closed": []}),
        ),
        with(header("violation", 2), violation_body()),
        with(header("violation_rollup", 3), rollup),
        with(
            header("lost_events", 4),
            json!({"source": "ringbuf", "count": 17}),
        ),
        with(
            header("lost_events", 5),
            json!({"source": "queue:syslog", "count": 3}),
        ),
        with(
            header("map_full", 6),
            json!({"source": "FLOW_VERDICTS", "count": 2}),
        ),
        with(
            header("socket_shared", 7),
            json!({"inode": 81234, "cookie": 4096, "envs": ["dev", "prod"],
                   "pids": [310, 298], "env": "prod"}),
        ),
        with(
            header("unparsable_packets", 8),
            json!({"source": "skb", "count": 1}),
        ),
        with(
            header("mode_change", 9),
            json!({"actor": actor(), "scope": "dev->prod", "from": "enforce", "to": "audit",
                   "expires_at": "2026-11-23T11:00:47.852301113Z", "reason": "request"}),
        ),
        with(
            header("mode_change", 10),
            json!({"actor": {"uid": null, "pid": 4242, "comm": "envguard (break-glass expiry)"},
                   "scope": "global", "from": "audit", "to": "enforce", "expires_at": null, "reason": "expired"}),
        ),
        with(
            header("policy_rejected", 11),
            json!({"policy": "/etc/envguard/policy.toml",
                   "error": "/etc/envguard/policy.toml:3: unknown env \"qa\"", "actor": actor()}),
        ),
        with(
            header("policy_loaded", 12),
            json!({
                "policy": "/etc/envguard/policy.toml",
                "revision": format!("sha256:{}", "0a".repeat(32)),
                "envs": [], "mode": "audit", "cgroup_root": "/sys.slice",
                "hooks": ["connect4"], "pin_root": "/sys/fs/bpf/envguard", "adopted": true,
                "actor": {"uid": null, "pid": 4242, "comm": "SIGHUP"}
            }),
        ),
        with(
            header("oversized_record", 13),
            json!({"original_kind": "policy_rejected", "bytes": 20000, "limit": 8096}),
        ),
        with(header("violations_suppressed", 14), json!({"count": 95})),
        with(
            header("endpoint_conflict", 15),
            json!({"address": "198.18.1.1", "envs": ["dev", "prod"],
                   "netns": [4026532801u64, 4026532873u64], "pids": [311, 402],
                   "env": "endpoint-conflict"}),
        ),
    ]
}

#[test]
fn every_schema_is_valid_and_every_example_matches_its_schema() {
    let all = examples();
    for (kind, _) in SCHEMAS {
        assert!(
            all.iter().any(|r| r["kind"] == *kind),
            "no example of {kind}"
        );
    }
    let lines: Vec<String> = all.iter().map(Value::to_string).collect();
    for line in &lines {
        validate_line(line).unwrap_or_else(|e| panic!("{e}"));
    }
    check_stream(&lines).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_schema_has_the_same_header() {
    let s = schemas();
    let reference = s.schema("lost_events").unwrap();
    for (kind, _) in SCHEMAS {
        let schema = s.schema(kind).unwrap();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(&required[..5], schema_check::HEADER, "{kind}");
        assert_eq!(schema["properties"]["kind"]["const"], *kind);
        for field in ["time", "seq", "host", "boot_id", "suppressed"] {
            assert_eq!(
                schema["properties"][field], reference["properties"][field],
                "{kind}.{field}"
            );
        }
    }
}

#[test]
fn schemas_reject_what_breaks_the_contract() {
    let bad = |record: Value, why: &str| {
        let line = record.to_string();
        let err = validate_line(&line).expect_err(&format!("accepted ({why}): {line}"));
        assert!(!err.is_empty());
    };
    let v = || with(header("violation", 0), violation_body());
    for field in ["kind", "time", "seq", "host", "boot_id"] {
        let mut r = v();
        r.as_object_mut().unwrap().remove(field);
        bad(r, &format!("no {field}"));
    }
    let mut r = v();
    r["time"] = json!("2026-11-23T10:45:47Z");
    bad(r, "time without nanoseconds");
    let mut r = v();
    r["time"] = json!("2026-13-23T10:45:47.852301113Z");
    bad(r, "month 13");
    let mut r = v();
    r["seq"] = json!(-1);
    bad(r, "negative seq");
    let mut r = v();
    r["verdict"] = json!("allowed");
    bad(r, "allowed is never a violation");
    let mut r = v();
    r["destination"]["ip"] = json!("198.18.10.300");
    bad(r, "bad IPv4");
    let mut r = v();
    r["destination"]["port"] = json!(0);
    bad(r, "port 0");
    let mut r = v();
    r["process"].as_object_mut().unwrap().remove("uid");
    bad(r, "process without uid");
    let mut r = v();
    r["hook"] = json!("unknown");
    bad(r, "unknown hook");
    let mut r = v();
    r["boot_id"] = json!("run-1");
    bad(r, "boot_id is 32 hex digits");
    let mut r = v();
    r["source"].as_object_mut().unwrap().remove("env_from");
    bad(r, "a violation knows where its envs come from");
    let mut r = with(
        header("lost_events", 0),
        json!({"source": "disk", "count": 1}),
    );
    bad(r.clone(), "unknown loss source");
    r["source"] = json!("queue:file");
    r["count"] = json!(0);
    bad(r, "a zero loss is not reported");
    let r = with(
        header("mode_change", 0),
        json!({"actor": actor(), "scope": "global", "from": "enforce", "to": "audit", "reason": "request"}),
    );
    bad(r, "no expires_at");
    bad(
        with(header("no_such_kind", 0), json!({})),
        "a kind without a schema",
    );
    // Header order.
    let mut r = serde_json::Map::new();
    r.insert("time".into(), json!(TIME));
    r.extend(v().as_object().unwrap().clone());
    bad(Value::Object(r), "header out of order");
    // Fields the schema does not describe: caught by the project's check, but
    // the published schema itself accepts them (fields may be added).
    let mut r = v();
    r["new_field"] = json!(1);
    r["process"]["new_nested"] = json!(2);
    let err = validate_line(&r.to_string()).unwrap_err();
    assert!(
        err.contains("/new_field") && err.contains("/process/new_nested"),
        "{err}"
    );
    let schema = schemas().schema("violation").unwrap();
    assert!(jsonschema::draft202012::is_valid(schema, &r));
    // The rate limit's count is documented on every kind.
    let mut r = v();
    r["suppressed"] = json!(12);
    validate_line(&r.to_string()).unwrap();
}

#[test]
fn stream_check_finds_gaps_and_repeats() {
    let line = |seq: u64, boot: &str| {
        let mut r = with(
            header("lost_events", seq),
            json!({"source": "ringbuf", "count": 1}),
        );
        r["boot_id"] = json!(boot.repeat(32));
        r.to_string()
    };
    check_stream(&[line(0, "a"), line(1, "a"), line(0, "b"), line(2, "a")]).unwrap();
    let err = check_stream(&[line(0, "a"), line(2, "a")]).unwrap_err();
    assert!(err.contains("seq 2 where 1 was due"), "{err}");
    assert!(check_stream(&[line(0, "a"), line(0, "a")]).is_err());
    assert!(check_stream(&[line(1, "a")]).is_err());
}

/// Records made by the agent's own code: a `Stream` with the real bodies.
#[test]
fn the_agents_records_match_the_schemas() {
    let policy = Policy::parse(
        Path::new("policy.toml"),
        r#"
mode = "enforce"
[envs.prod]
cgroups = ["/prod.slice"]
cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]
[envs.dev]
cgroups = ["/dev.slice"]
cidrs = ["198.18.20.0/24"]
on_agent_loss = "open"
agent_loss_timeout = "2s"
"#,
    )
    .unwrap();
    let compiled = compile(&policy).unwrap();
    let mut names = CgroupNames::new(Path::new("/nonexistent-cgroup-mount"));
    names.insert(709, "/dev.slice/app.service".to_owned());

    let mut stream = Stream::new(Vec::<String>::new());
    let mapped = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets();
    let kernel_records = [
        // connect4 from dev to prod, enforce: no local address yet.
        (
            ev::HOOK_CONNECT4,
            ev::DIRECTION_EGRESS,
            [0u8; 16],
            mapped([198, 18, 10, 1]),
            0,
            80,
            1234,
        ),
        // An inbound SYN at the packet hook: no process.
        (
            ev::HOOK_SKB_INGRESS,
            ev::DIRECTION_INGRESS,
            mapped([198, 18, 20, 7]),
            mapped([198, 18, 10, 5]),
            40000,
            5432,
            0,
        ),
        // IPv6.
        (
            ev::HOOK_SENDMSG6,
            ev::DIRECTION_EGRESS,
            "2001:db8:20::7".parse::<Ipv6Addr>().unwrap().octets(),
            "2001:db8:10::1".parse::<Ipv6Addr>().unwrap().octets(),
            5353,
            53,
            77,
        ),
    ];
    for (hook, direction, src, dst, sport, dport, pid) in kernel_records {
        // SAFETY: a plain-old-data record of integers and byte arrays; all
        // zeroes is a valid value (and new fields stay zero).
        let mut e: ViolationEvent = unsafe { std::mem::zeroed() };
        e.hook = hook;
        e.direction = direction;
        e.family = if hook == ev::HOOK_SENDMSG6 {
            ev::AF_INET6
        } else {
            ev::AF_INET
        };
        e.src_addr = src;
        e.dst_addr = dst;
        e.src_port = sport;
        e.dst_port = dport;
        e.pid = pid;
        e.comm[..7].copy_from_slice(b"python3");
        e.uid = if pid == 0 { u32::MAX } else { 1000 };
        e.cgroup_id = 709;
        e.src_env = compiled.env_id("dev").unwrap();
        e.dst_env = compiled.env_id("prod").unwrap();
        e.src_env_from = ev::ENV_FROM_CGROUP;
        e.dst_env_from = ev::ENV_FROM_CIDR;
        e.proto = if hook == ev::HOOK_CONNECT4 || hook == ev::HOOK_SKB_INGRESS {
            6
        } else {
            17
        };
        e.verdict = ev::VERDICT_DENIED;
        e.mode = envguard_common::config::MODE_ENFORCE as u8;
        e.rule = envguard_common::policy::RULE_NONE;
        // The local socket is in a registered container: its side carries
        // `container`, which the schema must describe.
        let mut containers = envguard_agent::containers::Registry::default();
        containers.insert(envguard_agent::containers::Registered {
            container: envguard_agent::containers::ContainerRef {
                id: "9a9f478d9be3cb4c2ba9245d42eb95a66e2ccd9d938d5141749c2e67f75a3332".into(),
                name: "api".into(),
            },
            env: "dev".into(),
            cgroup: "/machine/libpod-9a9f478d9be3".into(),
            cgroup_id: 709,
            registered_at: "2026-11-30T16:00:00Z".into(),
        });
        let body = events::violation(&policy, &compiled, &mut names, &containers, &e);
        stream.emit("violation", None, &body).unwrap();
    }
    stream
        .emit(
            "lost_events",
            None,
            &LostEvents {
                source: "ringbuf".into(),
                count: 5,
            },
        )
        .unwrap();
    stream
        .emit(
            "map_full",
            None,
            &CounterRecord {
                source: "FLOW_VERDICTS",
                count: 1,
            },
        )
        .unwrap();
    stream
        .emit(
            "map_full",
            None,
            &CounterRecord {
                source: "SOCK_ENVS",
                count: 9,
            },
        )
        .unwrap();
    stream
        .emit(
            "unparsable_packets",
            None,
            &CounterRecord {
                source: "skb",
                count: 3,
            },
        )
        .unwrap();
    let gap = events::agent_gap(&policy, std::time::Duration::from_secs(5));
    stream.emit("agent_gap", None, &gap).unwrap();
    stream
        .emit(
            "policy_loaded",
            None,
            &events::PolicyLoaded {
                policy: "/etc/envguard/policy.toml".to_owned(),
                revision: &policy.revision,
                envs: policy.env_names(),
                mode: policy.mode.to_string(),
                cgroup_root: "/".to_owned(),
                hooks: envguard_agent::loader::PROGRAMS,
                pin_root: "/sys/fs/bpf/envguard".to_owned(),
                adopted: false,
            },
        )
        .unwrap();
    // A rollup of repeats, as the daemon makes it from a DEDUP entry.
    // SAFETY: plain-old-data, as above.
    let mut k: envguard_common::event::DedupKey = unsafe { std::mem::zeroed() };
    k.cgroup_id = 709;
    k.remote_addr = mapped([198, 18, 10, 1]);
    k.src_env = compiled.env_id("dev").unwrap();
    k.dst_env = compiled.env_id("prod").unwrap();
    k.dst_port = 80;
    k.proto = 6;
    k.direction = ev::DIRECTION_EGRESS;
    k.verdict = ev::VERDICT_DENIED;
    k.hook = ev::HOOK_CONNECT4;
    let now = envguard_agent::sys::boot_ns();
    let mut containers = envguard_agent::containers::Registry::default();
    containers.insert(envguard_agent::containers::Registered {
        container: envguard_agent::containers::ContainerRef {
            id: "9a9f478d9be3".into(),
            name: "api".into(),
        },
        env: "dev".into(),
        cgroup: "/machine/libpod-9a9f478d9be3".into(),
        cgroup_id: 709,
        registered_at: "2026-11-30T16:00:00Z".into(),
    });
    let body = events::rollup(
        &compiled,
        &mut names,
        &containers,
        &k,
        41,
        now - 5_000_000_000,
        now,
    );
    stream.emit("violation_rollup", Some(now), &body).unwrap();
    let text = stream.into_inner().join("\n");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10);
    check_stream(&lines).unwrap_or_else(|e| panic!("{e}"));
    let first: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["destination"]["ip"], "198.18.10.1");
    let gap: Value = serde_json::from_str(lines[7]).unwrap();
    assert_eq!(gap["envs_failed_open"], json!(["dev"]));
}
