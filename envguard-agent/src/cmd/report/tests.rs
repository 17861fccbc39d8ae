use envguard_common::event::DecisionKey;

use super::*;
use crate::history::{Seen, Source, Tally};

const T0: u64 = 1_800_000_000;

fn name(k: &DecisionKey) -> Key {
    let env = |i: u32| ["unknown", "dev", "prod", "staging"][i as usize].to_owned();
    Key {
        src_env: env(k.src_env),
        dst_env: env(k.dst_env),
        verdict: match k.verdict {
            1 => "denied",
            2 => "audited",
            _ => "allowed",
        }
        .into(),
        mode: if k.verdict == 2 { "audit" } else { "enforce" }.into(),
        direction: "egress".into(),
        proto: if k.proto == 17 { "udp" } else { "tcp" }.into(),
    }
}

fn history() -> History {
    let mut h = History::new();
    let envs: Vec<String> = ["dev", "prod", "staging"].map(String::from).to_vec();
    let src = Source {
        boot_id: "b".into(),
        map_id: 3,
    };
    let mut t = Tally::default();
    t.add(&Seen {
        src_env: "dev",
        dst_env: "staging",
        verdict: "audited",
        proto: "tcp",
        dst_ip: Some("198.18.0.9"),
        dst_port: Some(9000),
        comm: Some("egprobe"),
        cgroup: Some("/t/dev"),
        cgroup_id: 7,
        count: 2,
    });
    h.sample(
        T0,
        &src,
        &[
            (DecisionKey::new(1, 2, 1, 0, 6, 1), 6),
            (DecisionKey::new(2, 2, 3, 0, 6, 1), 4),
            (DecisionKey::new(1, 3, 2, 0, 6, 0), 2),
        ],
        name,
        &envs,
        &mut t,
    );
    h.sample(
        T0 + 3600,
        &src,
        &[
            (DecisionKey::new(1, 2, 1, 0, 6, 1), 7),
            (DecisionKey::new(2, 2, 3, 0, 6, 1), 4),
            (DecisionKey::new(1, 3, 2, 0, 6, 0), 2),
            (DecisionKey::new(1, 2, 1, 0, 17, 1), 1),
        ],
        name,
        &envs,
        &mut t,
    );
    h
}

#[test]
fn the_matrix_sums_the_window_and_lists_silent_pairs() {
    let h = history();
    let r = build(&h, T0, T0 + 3600, None, "/s");
    assert_eq!(r.envs, ["dev", "prod", "staging"]);
    assert_eq!(r.matrix.len(), 9);
    let cell = |s: &str, d: &str| {
        r.matrix
            .iter()
            .find(|p| p.src_env == s && p.dst_env == d)
            .map(|p| (p.allowed, p.denied, p.audited))
            .unwrap()
    };
    assert_eq!(cell("dev", "prod"), (0, 8, 0));
    assert_eq!(cell("prod", "prod"), (4, 0, 0));
    assert_eq!(cell("dev", "staging"), (0, 0, 2));
    assert_eq!(r.never_seen.len(), 6);
    assert!(r.never_seen.contains(&["staging".into(), "dev".into()]));
    assert_eq!(r.would_refuse.len(), 1);
    let w = &r.would_refuse[0];
    assert_eq!((w.decisions, w.attempts), (2, 2));
    assert_eq!(w.destinations.top[0].name, "198.18.0.9:9000");
    assert_eq!(w.processes.top[0].name, "egprobe");
    // A window holding only the second sample: its deltas alone.
    let r = build(&h, T0 + 1, T0 + 3600, None, "/s");
    assert_eq!(
        r.counters
            .iter()
            .map(|r| (r.key.proto.as_str(), r.count))
            .collect::<Vec<_>>(),
        [("tcp", 1), ("udp", 1)]
    );
    assert!(r.coverage.complete);
    // --pair keeps one cell.
    let r = build(&h, 0, u64::MAX, Some(&("dev".into(), "prod".into())), "/s");
    assert_eq!(r.matrix.len(), 1);
    assert!(r.would_refuse.is_empty());
}

#[test]
fn text_csv_and_dot_say_the_same() {
    let r = build(&history(), T0, T0 + 3600, None, "/s");
    let t = text(&r, 5);
    let row = |env: &str| {
        t.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&env))
    };
    assert_eq!(row("dev"), Some(vec!["dev", "·", "0/8/0", "0/0/2"]), "{t}");
    assert_eq!(row("prod"), Some(vec!["prod", "·", "4/0/0", "·"]), "{t}");
    assert!(t.contains("dev -> staging: 2 decisions, 2 attempts"), "{t}");
    assert!(t.contains("destinations  198.18.0.9:9000 (2)"), "{t}");
    let c = csv(&r);
    assert_eq!(
        c,
        "src_env,dst_env,verdict,mode,direction,proto,count\n\
         dev,prod,denied,enforce,egress,tcp,7\n\
         dev,prod,denied,enforce,egress,udp,1\n\
         dev,staging,audited,audit,egress,tcp,2\n\
         prod,prod,allowed,enforce,egress,tcp,4\n"
    );
    let d = dot(&r);
    assert!(d.starts_with("digraph envguard {"), "{d}");
    assert!(
        d.contains("\"dev\" -> \"prod\" [label=\"refused 8\", penwidth=2.50, weight=8, color=red"),
        "{d}"
    );
    assert!(
        d.contains("\"prod\" -> \"prod\" [label=\"allowed 4\""),
        "{d}"
    );
    assert!(d.contains("style=dashed"), "audited only: dashed\n{d}");
    assert!(!d.contains("\"staging\" ->"), "{d}");
}

#[test]
fn when_is_a_duration_back_or_a_time() {
    let now = UNIX_EPOCH + Duration::from_secs(T0);
    assert_eq!(parse_when("7d", now).unwrap(), T0 - 7 * 86_400);
    assert_eq!(parse_when("90m", now).unwrap(), T0 - 5400);
    assert_eq!(parse_when("2027-01-15T08:00:00Z", now).unwrap(), T0);
    assert!(parse_when("yesterday", now).is_err());
}
