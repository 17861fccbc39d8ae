use std::path::Path;

use super::*;

fn lint_text(text: &str) -> Vec<(usize, String)> {
    let p = Policy::parse(Path::new("p.toml"), text).expect("valid policy");
    lint(&p)
        .into_iter()
        .map(|d| {
            assert_eq!(d.path, Path::new("p.toml"));
            (d.line.expect("every lint names a line"), d.message)
        })
        .collect()
}

/// The single warning of a policy.
#[track_caller]
fn one(text: &str) -> (usize, String) {
    let w = lint_text(text);
    assert_eq!(w.len(), 1, "expected one warning, got {w:#?}");
    w.into_iter().next().unwrap()
}

#[track_caller]
fn clean(text: &str) {
    let w = lint_text(text);
    assert!(w.is_empty(), "expected no warning, got {w:#?}");
}

const ENVS: &str = r#"mode = "enforce"
[envs.dev]
cgroups = ["/dev.slice"]
cidrs = ["198.18.20.0/24"]
[envs.prod]
cgroups = ["/prod.slice"]
cidrs = ["198.18.10.0/24"]
[envs.shared]
cidrs = ["198.18.0.0/28"]
"#;
/// Lines of `ENVS`.
const ENVS_LINES: usize = 9;

#[test]
fn the_example_policy_is_clean() {
    let text = include_str!("../../../../examples/policy.toml");
    clean(text);
    clean(ENVS);
}

#[test]
fn an_env_with_nothing_in_it() {
    let (line, m) = one("[envs.dev]\ncgroups = [\"/dev.slice\"]\n\n[envs.ghost]\n");
    assert_eq!(line, 4);
    assert!(m.contains("env ghost lists no cgroups and no CIDRs"), "{m}");
    // And every rule naming it matches only registered containers.
    let w = lint_text(
        "[envs.dev]\ncgroups = [\"/dev.slice\"]\n[envs.ghost]\n[[allow]]\nfrom = \"dev\"\nto = \"ghost\"\n",
    );
    assert_eq!(w.len(), 2, "{w:#?}");
    assert_eq!(w[1].0, 4);
    assert!(
        w[1].1
            .contains("matches only containers registered into env ghost"),
        "{}",
        w[1].1
    );
}

#[test]
fn an_allow_within_one_env() {
    let (line, m) = one(&format!("{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"dev\"\n"));
    assert_eq!(line, ENVS_LINES + 1);
    assert!(m.starts_with("allow dev -> dev never matters"), "{m}");
}

#[test]
fn an_allow_under_an_earlier_broader_allow() {
    let text = format!(
        "{ENVS}[[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"8000-8100/tcp\", \"53\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"8080/tcp\", \"53/udp\"]\n"
    );
    let (line, m) = one(&text);
    assert_eq!(line, ENVS_LINES + 5);
    assert!(
        m.contains("is redundant: the allow * -> shared")
            && m.contains(&format!("(line {})", ENVS_LINES + 1)),
        "{m}"
    );
}

#[test]
fn adjacent_ranges_together_cover_but_separate_rules_do_not() {
    // One rule with two adjacent ranges covers a range spanning both.
    let (_, m) = one(&format!(
        "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"1-100/tcp\", \"101-200/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"50-150/tcp\"]\n"
    ));
    assert!(m.contains("is redundant"), "{m}");
    // `b` (line 14) is not covered by `a` (line 10): another protocol, a
    // wider range, the port 0 a bare protocol also matches.
    for (a, b, a_covered) in [
        ("53/tcp", "53/udp", false),
        ("1-100/tcp", "1-101/tcp", true),
        ("1-65535/tcp", "tcp", true),
        ("tcp", "icmp", false),
    ] {
        let w = lint_text(&format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"{a}\"]\n\
                 [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"{b}\"]\n"
        ));
        let lines: Vec<usize> = w.iter().map(|(l, _)| *l).collect();
        let expected = if a_covered {
            vec![ENVS_LINES + 1]
        } else {
            vec![]
        };
        assert_eq!(lines, expected, "{a} then {b}: {w:#?}");
    }
    // A narrower source does not cover a wider one.
    clean(&format!(
        "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"shared\"\n[[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"53\"]\n"
    ));
}

#[test]
fn an_allow_that_a_deny_covers() {
    let text = format!(
        "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"5432/tcp\"]\n\
             [[deny]]\nfrom = \"*\"\nto = \"prod\"\nports = [\"tcp\"]\n"
    );
    let (line, m) = one(&text);
    assert_eq!(line, ENVS_LINES + 1);
    assert!(
        m.contains("never allows anything: the deny * -> prod [tcp]")
            && m.contains("deny beats allow"),
        "{m}"
    );
    // A deny of part of it leaves the rest allowed.
    clean(&format!(
        "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\n[[deny]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n"
    ));
}

#[test]
fn duplicate_rules() {
    // Written differently, the same flows: `53` is 53/tcp and 53/udp.
    let text = format!(
        "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"53\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"53/udp\", \"53/tcp\"]\n"
    );
    let (line, m) = one(&text);
    assert_eq!(line, ENVS_LINES + 5);
    assert!(m.contains("duplicates the allow dev -> prod"), "{m}");

    let text = format!(
        "{ENVS}[[deny]]\nfrom = \"dev\"\nto = \"prod\"\n[[deny]]\nfrom = \"dev\"\nto = \"prod\"\n"
    );
    let (line, m) = one(&text);
    assert_eq!(line, ENVS_LINES + 4);
    assert!(m.starts_with("deny dev -> prod duplicates the deny"), "{m}");
}

#[test]
fn a_deny_under_a_broader_deny() {
    let text = format!(
        "{ENVS}[[deny]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n[[deny]]\nfrom = \"*\"\nto = \"prod\"\n"
    );
    let (line, m) = one(&text);
    assert_eq!(line, ENVS_LINES + 1);
    assert!(
        m.contains("is redundant: the deny * -> prod") && m.contains("already refuses"),
        "{m}"
    );
    // A deny within one env is meaningful (it refuses same-env flows).
    clean(&format!(
        "{ENVS}[[deny]]\nfrom = \"prod\"\nto = \"prod\"\nports = [\"22/tcp\"]\n"
    ));
}

#[test]
fn an_allow_the_defaults_already_give() {
    let rule = "[[allow]]\nfrom = \"dev\"\nto = \"world\"\n";
    let (line, m) = one(&format!("{ENVS}{rule}"));
    assert_eq!(line, ENVS_LINES + 1);
    assert!(m.contains("changes nothing: [defaults]"), "{m}");
    // Not when the default denies, nor for host <-> world when one side does.
    let world_deny = ENVS.replace(
        "mode = \"enforce\"\n",
        "mode = \"enforce\"\n[defaults]\nworld = \"deny\"\n",
    );
    clean(&format!("{world_deny}{rule}"));
    let host_deny = ENVS.replace(
        "mode = \"enforce\"\n",
        "mode = \"enforce\"\n[defaults]\nhost = \"deny\"\n",
    );
    clean(&format!(
        "{host_deny}[[allow]]\nfrom = \"host\"\nto = \"world\"\n"
    ));
    // `*` includes declared envs, which no default covers.
    clean(&format!("{ENVS}[[allow]]\nfrom = \"*\"\nto = \"prod\"\n"));
}

#[test]
fn ports_listed_twice_in_one_rule() {
    let text = format!(
        "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"53\", \"53/udp\", \"8000-8100/tcp\", \"8080/tcp\"]\n"
    );
    let w = lint_text(&text);
    let msgs: Vec<&str> = w.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(w.len(), 2, "{msgs:#?}");
    assert!(msgs[0].ends_with("port 53/udp is listed twice"), "{msgs:?}");
    assert!(
        msgs[1].ends_with("port 8080/tcp is already covered by 8000-8100/tcp"),
        "{msgs:?}"
    );
}

#[test]
fn nested_cidrs() {
    let text = r#"[envs.corp]
cidrs = ["10.0.0.0/8"]
[envs.lab]
cidrs = [
  "10.1.0.0/16",
  "10.1.2.0/24",
]
[envs.odd]
cidrs = ["10.1.2.128/25", "2001:db8::/32"]
"#;
    let w = lint_text(text);
    assert_eq!(w.len(), 3, "{w:#?}");
    assert_eq!(w[0].0, 5);
    assert_eq!(
        w[0].1,
        "CIDR 10.1.0.0/16 of env lab lies inside 10.0.0.0/8 of env corp: its addresses belong to lab (the longest prefix wins), the rest of 10.0.0.0/8 to corp"
    );
    assert_eq!(w[1].0, 6);
    assert!(
        w[1].1
            .starts_with("CIDR 10.1.2.0/24 of env lab is redundant: it lies inside 10.1.0.0/16"),
        "{}",
        w[1].1
    );
    assert_eq!(w[2].0, 9);
    assert!(
        w[2].1
            .starts_with("CIDR 10.1.2.128/25 of env odd lies inside 10.1.2.0/24 of env lab"),
        "{}",
        w[2].1
    );

    // Inside its own env, but with another env's CIDR between: meaningful.
    let w = lint_text(
        "[envs.a]\ncidrs = [\"10.0.0.0/8\", \"10.1.2.0/24\"]\n[envs.b]\ncidrs = [\"10.1.0.0/16\"]\n",
    );
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(w.iter().all(|(_, m)| !m.contains("redundant")), "{w:#?}");

    // IPv4 and IPv6 do not nest.
    clean("[envs.a]\ncidrs = [\"0.0.0.0/0\"]\n[envs.b]\ncidrs = [\"2001:db8::/32\"]\n");
}

#[test]
fn an_ipv4_mapped_cidr() {
    let (line, m) = one("[envs.a]\ncidrs = [\"::ffff:198.18.0.0/112\"]\n");
    assert_eq!(line, 2);
    assert!(
        m.contains("never matches") && m.ends_with("write 198.18.0.0/16"),
        "{m}"
    );
}

#[test]
fn pair_modes() {
    // Repeats the global mode.
    let (line, m) = one(&format!(
        "{ENVS}[[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"enforce\"\n"
    ));
    assert_eq!(line, ENVS_LINES + 1);
    assert!(m.contains("repeats the global mode \"enforce\""), "{m}");

    // Overridden by a later entry for a superset of its pairs.
    let (line, m) = one(&format!(
        "{ENVS}[[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n"
    ));
    assert_eq!(line, ENVS_LINES + 1);
    assert!(
        m.contains(&format!("at line {} covers the same pairs", ENVS_LINES + 5)),
        "{m}"
    );

    // Repeating the global mode to override an earlier, broader entry is
    // what makes it useful: no warning.
    clean(&format!(
        "{ENVS}[[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"enforce\"\n"
    ));

    // Within one env: only matters with a deny or a closed fail mode.
    let (_, m) = one(&format!(
        "{ENVS}[[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"audit\"\n"
    ));
    assert!(m.contains("never matters: flows within prod"), "{m}");
    clean(&format!(
        "{ENVS}[[deny]]\nfrom = \"*\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"audit\"\n"
    ));
    clean(&format!(
        "{}[[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"audit\"\n",
        ENVS.replace(
            "cgroups = [\"/prod.slice\"]\n",
            "cgroups = [\"/prod.slice\"]\non_agent_loss = \"closed\"\n"
        )
    ));
}

/// What happens to each flow between envs that can hold one (not the
/// empty ones): allowed, or a violation in some mode.
fn outcome(p: &Policy) -> Vec<String> {
    use crate::{
        explain::decide,
        modes::Modes,
        policy::{
            compile::compile,
            ports::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
        },
    };
    let flows: Vec<(u8, u16)> = [
        0, 1, 22, 53, 5432, 8000, 8079, 8080, 8081, 8100, 8101, 65535,
    ]
    .into_iter()
    .flat_map(|p| [(PROTO_TCP, p), (PROTO_UDP, p)])
    .chain([(PROTO_ICMP, 0)])
    .collect();
    let c = compile(p).unwrap();
    let modes = Modes::from_policy(p);
    let empty: Vec<&str> = p
        .envs
        .iter()
        .filter(|e| e.cgroups.is_empty() && e.cidrs.is_empty())
        .map(|e| e.name.as_str())
        .collect();
    let ids: Vec<u32> = c
        .env_ids()
        .filter(|&id| !empty.contains(&c.env_name(id)))
        .collect();
    let mut out = Vec::new();
    for &s in &ids {
        for &d in &ids {
            let (sn, dn) = (c.env_name(s), c.env_name(d));
            for &(proto, port) in &flows {
                let what = if decide(&c, s, d, proto, port).allowed {
                    "allowed".to_owned()
                } else {
                    format!("violation, {}", modes.of(sn, dn).0)
                };
                out.push(format!("{sn} -> {dn} {port}/{proto}: {what}"));
            }
        }
    }
    out
}

fn changes(a: &[String], b: &[String]) -> Vec<String> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("{x} => {y}"))
        .collect()
}

/// Removes, one at a time, each rule and pair mode the lint warns about,
/// and asserts that no flow's fate changes (for a pair mode repeating the
/// global mode, only while the global mode stays). Returns how many rules
/// and pair modes were warned about.
#[track_caller]
fn assert_warned_are_useless(policy: &Policy) -> (usize, usize) {
    let warned: Vec<usize> = lint(policy).iter().filter_map(|d| d.line).collect();
    let before = outcome(policy);
    let mut counts = (0, 0);
    for r in policy.rules.iter().filter(|r| warned.contains(&r.line)) {
        counts.0 += 1;
        let mut p = policy.clone();
        p.rules.retain(|x| x.line != r.line);
        let changed = changes(&before, &outcome(&p));
        assert!(
            changed.is_empty(),
            "removing {r} changes: {changed:#?}\nlint: {:#?}",
            lint(policy)
        );
    }
    for pm in policy
        .pair_modes
        .iter()
        .filter(|p| warned.contains(&p.line))
    {
        counts.1 += 1;
        let mut p = policy.clone();
        p.pair_modes.retain(|x| x.line != pm.line);
        let changed = changes(&before, &outcome(&p));
        assert!(
            changed.is_empty(),
            "removing the pair mode at line {} changes: {changed:#?}",
            pm.line
        );
        if pm.mode != policy.mode {
            let other = match policy.mode {
                crate::policy::Mode::Audit => crate::policy::Mode::Enforce,
                crate::policy::Mode::Enforce => crate::policy::Mode::Audit,
            };
            let (mut q, mut q0) = (p.clone(), policy.clone());
            q.mode = other;
            q0.mode = other;
            let changed = changes(&outcome(&q0), &outcome(&q));
            assert!(
                changed.is_empty(),
                "removing the pair mode at line {} changes, in the other global mode: {changed:#?}",
                pm.line
            );
        }
    }
    counts
}

/// Soundness, checked: removing a rule or pair mode the lint calls
/// useless changes no flow's fate.
#[test]
fn what_the_lint_calls_useless_changes_nothing() {
    let text = format!(
        "{ENVS}[envs.ghost]\n[defaults]\nhost = \"deny\"\n\
             [[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"53\", \"8000-8100/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"8080/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"dev\"\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[allow]]\nfrom = \"prod\"\nto = \"world\"\n\
             [[allow]]\nfrom = \"dev\"\nto = \"ghost\"\n\
             [[allow]]\nfrom = \"prod\"\nto = \"dev\"\nports = [\"5432/tcp\"]\n\
             [[allow]]\nfrom = \"prod\"\nto = \"dev\"\nports = [\"5432/tcp\"]\n\
             [[deny]]\nfrom = \"*\"\nto = \"prod\"\nports = [\"tcp\"]\n\
             [[deny]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"dev\"\nto = \"shared\"\nmode = \"enforce\"\n\
             [[pair_mode]]\nfrom = \"shared\"\nto = \"shared\"\nmode = \"audit\"\n"
    );
    let policy = Policy::parse(Path::new("p.toml"), &text).unwrap();
    // Every kind above is found: the covered 8080, the self pair, the
    // denied 22, the world the defaults allow, the empty env, the
    // duplicate, the covered deny; the overridden, repeated and idle
    // pair modes.
    assert_eq!(
        assert_warned_are_useless(&policy),
        (7, 3),
        "{:#?}",
        lint(&policy)
    );
}

/// The same check over many generated policies.
#[test]
fn generated_policies_keep_the_lint_sound() {
    let mut seed: u64 = 0x5eed;
    let mut pick = |n: usize| {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    let sels = ["*", "host", "world", "dev", "prod", "shared"];
    let ports = [
        None,
        Some("\"53\""),
        Some("\"53/udp\""),
        Some("\"tcp\""),
        Some("\"8000-8100/tcp\""),
        Some("\"8080/tcp\""),
        Some("\"1-65535/tcp\""),
        Some("\"icmp\""),
        Some("\"53\", \"8080/tcp\""),
        Some("\"8000-8079/tcp\", \"8080-8100/tcp\""),
    ];
    let defaults = ["allow", "deny"];
    let modes = ["audit", "enforce"];
    let (mut warned_rules, mut warned_pms) = (0, 0);
    for _ in 0..300 {
        let mut text = format!(
            "mode = \"{}\"\n[defaults]\nhost = \"{}\"\nworld = \"{}\"\n\
                 [envs.dev]\ncgroups = [\"/dev\"]\n[envs.prod]\ncidrs = [\"198.18.10.0/24\"]\n\
                 [envs.shared]\ncidrs = [\"198.18.0.0/28\"]\n",
            modes[pick(2)],
            defaults[pick(2)],
            defaults[pick(2)]
        );
        for _ in 0..pick(7) {
            let table = ["allow", "allow", "deny"][pick(3)];
            text.push_str(&format!(
                "[[{table}]]\nfrom = \"{}\"\nto = \"{}\"\n",
                sels[pick(sels.len())],
                sels[pick(sels.len())]
            ));
            if let Some(p) = ports[pick(ports.len())] {
                text.push_str(&format!("ports = [{p}]\n"));
            }
        }
        for _ in 0..pick(4) {
            text.push_str(&format!(
                "[[pair_mode]]\nfrom = \"{}\"\nto = \"{}\"\nmode = \"{}\"\n",
                sels[pick(sels.len())],
                sels[pick(sels.len())],
                modes[pick(2)]
            ));
        }
        let policy = Policy::parse(Path::new("p.toml"), &text).unwrap();
        let (r, p) = assert_warned_are_useless(&policy);
        warned_rules += r;
        warned_pms += p;
    }
    // The generator does exercise the lint.
    assert!(
        warned_rules > 50 && warned_pms > 30,
        "{warned_rules} {warned_pms}"
    );
}

#[test]
fn a_realistic_policy_is_clean() {
    clean(&format!(
        "{ENVS}[defaults]\nworld = \"deny\"\n\
             [[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"53\", \"8000-8100/tcp\"]\n\
             [[allow]]\nfrom = \"prod\"\nto = \"world\"\nports = [\"443/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"8443/tcp\"]\n\
             [[deny]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"8000/tcp\"]\n\
             [[deny]]\nfrom = \"prod\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"enforce\"\n"
    ));
}
