use std::path::Path;

use envguard_common::policy::{RULE_PREFIX_PAIR, RULE_PREFIX_PORT, RuleKey};

use super::{
    compile::{RULE_DEFAULT_HOST, compile, port_prefixes},
    *,
};

const EXAMPLE: &str = r#"mode = "enforce"                 # "audit" (default) | "enforce"

[envs.prod]
cgroups = ["/prod.slice"]        # cgroup v2 paths, relative to the cgroup2 mount
cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]

[envs.dev]
cgroups = ["/dev.slice"]
cidrs = ["198.18.20.0/24"]

[envs.shared]
cidrs = ["198.18.0.0/28"]

[[allow]]
from = "*"                       # an env name, or "*"
to = "shared"
ports = ["53/udp", "53/tcp", "8000-8100/tcp"]   # optional; absent means any port and protocol
"#;

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(Path::new("p.toml"), text)
}

/// The single error of a bad file, as "line: message".
fn error(text: &str) -> (Option<usize>, String) {
    match parse(text) {
        Ok(_) => panic!("policy unexpectedly valid:\n{text}"),
        Err(PolicyError::Invalid(errs)) => {
            assert_eq!(errs.len(), 1, "expected one error, got {errs:?}");
            assert_eq!(errs[0].path, Path::new("p.toml"));
            (errs[0].line, errs[0].message.clone())
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

#[test]
fn example_policy_parses() {
    let p = parse(EXAMPLE).expect("example is valid");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.env_names(), ["dev", "prod", "shared"]);
    assert_eq!(p.envs[1].cgroups, ["/prod.slice"]);
    assert_eq!(p.envs[1].cidrs.len(), 2);
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].from, Selector::Any);
    assert_eq!(p.rules[0].to, Selector::Env("shared".into()));
    assert_eq!(p.rules[0].line, 14);
    assert_eq!(p.rules[0].ports.as_ref().map(Vec::len), Some(3));
    assert!(p.revision.starts_with("sha256:") && p.revision.len() == 7 + 64);
}

#[test]
fn defaults_are_audit_and_allow() {
    let p = parse("[envs.a]\ncidrs = [\"198.18.1.0/24\"]\n").unwrap();
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.default_host, Default::Allow);
    assert_eq!(p.default_world, Default::Allow);
}

#[test]
fn bad_files_name_the_line() {
    let cases: &[(&str, usize, &str)] = &[
        ("mode = \"enforce\"\nmode = \"audit\"\n", 2, "duplicate key"),
        ("mode = \"block\"\n", 1, "mode must be"),
        ("[envs.a]\ncidrz = []\n", 2, "unknown field"),
        ("colour = 1\n", 1, "unknown field"),
        (
            "[envs.a]\n[[allow]]\nfrom = \"a\"\nto = \"b\"\n",
            4,
            "unknown env \"b\"",
        ),
        (
            "[envs.a]\ncidrs = [\"198.18.300.0/24\"]\n",
            2,
            "invalid CIDR",
        ),
        (
            "[envs.a]\ncidrs = [\"198.18.1.1/24\"]\n",
            2,
            "host bits set",
        ),
        (
            "[envs.a]\ncidrs = [\"198.18.1.0/24\"]\n[envs.b]\ncidrs = [\"198.18.1.0/24\"]\n",
            4,
            "already in env a",
        ),
        (
            "[envs.a]\ncgroups = [\"/x\"]\n[envs.b]\ncgroups = [\"/x/\"]\n",
            4,
            "already in env a",
        ),
        ("[envs.\"\"]\ncidrs = []\n", 1, "must not be empty"),
        ("[envs.host]\n", 1, "reserved"),
        ("[envs.a]\ncgroups = [\"x\"]\n", 2, "absolute path"),
        ("[envs.a]\ncgroups = [\"/x/../y\"]\n", 2, "'..'"),
        (
            "[envs.a]\n[[allow]]\nfrom = \"a\"\nto = \"world\"\nports = [\"0/tcp\"]\n",
            5,
            "invalid port",
        ),
        (
            "[envs.a]\n[[allow]]\nfrom = \"a\"\nto = \"world\"\nports = [\"70000\"]\n",
            5,
            "invalid port",
        ),
        (
            "[envs.a]\n[[allow]]\nfrom = \"a\"\nto = \"world\"\nports = [\"90-80/udp\"]\n",
            5,
            "90 is above 80",
        ),
        (
            "[envs.a]\n[[allow]]\nfrom = \"a\"\nto = \"world\"\nports = [\"53/sctp\"]\n",
            5,
            "protocol \"sctp\"",
        ),
        (
            "[envs.a]\n[[allow]]\nfrom = \"a\"\n",
            2,
            "missing field `to`",
        ),
        ("[envs.a\n", 1, ""),
        ("[defaults]\nhost = \"maybe\"\n", 2, "allow\" or \"deny\""),
    ];
    for (text, line, needle) in cases {
        let (got_line, msg) = error(text);
        assert_eq!(got_line, Some(*line), "line for {text:?}: {msg}");
        assert!(
            msg.contains(needle),
            "message for {text:?} lacks {needle:?}: {msg}"
        );
    }
}

#[test]
fn all_errors_are_reported_at_once() {
    let text = "[envs.a]\ncidrs = [\"nope\", \"198.18.1.0/24\"]\ncgroups = [\"rel\"]\n";
    match parse(text) {
        Err(PolicyError::Invalid(errs)) => {
            let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
            assert_eq!(rendered.len(), 2, "{rendered:?}");
            assert!(
                rendered[0].starts_with("p.toml:2: invalid CIDR"),
                "{rendered:?}"
            );
            assert!(
                rendered[1].starts_with("p.toml:3: cgroup \"rel\""),
                "{rendered:?}"
            );
        }
        other => panic!("expected two errors, got {other:?}"),
    }
}

#[test]
fn port_ranges_split_into_aligned_prefixes() {
    assert_eq!(port_prefixes(53, 53), [(53, 16)]);
    // 8000-8063, 8064-8095, 8096-8099, 8100.
    assert_eq!(port_prefixes(8000, 8100).len(), 4);
    assert_eq!(port_prefixes(1, 65535).len(), 16);
    // Every port of the range is covered exactly once, and nothing outside it.
    for (lo, hi) in [(8000u16, 8100u16), (1, 65535), (1023, 1025), (65535, 65535)] {
        let blocks = port_prefixes(lo, hi);
        let covered: u32 = blocks.iter().map(|(_, bits)| 1u32 << (16 - bits)).sum();
        assert_eq!(covered, u32::from(hi - lo) + 1, "{lo}-{hi}");
        for (start, bits) in blocks {
            let size = 1u32 << (16 - bits);
            assert_eq!(
                u32::from(start) % size,
                0,
                "block {start}/{bits} not aligned"
            );
            assert!(start >= lo && u32::from(start) + size - 1 <= u32::from(hi));
        }
    }
}

#[test]
fn compile_example() {
    let c = compile(&parse(EXAMPLE).unwrap()).unwrap();
    assert_eq!(c.env_names, ["host", "world", "dev", "prod", "shared"]);
    assert_eq!(c.mode, envguard_common::config::MODE_ENFORCE);
    assert_eq!(
        c.cgroups,
        [("/dev.slice".to_owned(), 2), ("/prod.slice".to_owned(), 3)]
    );
    assert_eq!((c.min_level, c.max_level), (1, 1));
    assert_eq!(c.cidrs_v4.len(), 3);
    assert_eq!(
        c.cidrs_v6,
        [(
            48,
            "2001:db8:10::"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            3
        )]
    );
    // * -> shared: from host, world, dev, prod (not shared itself) on 53/udp,
    // 53/tcp and 4 blocks of 8000-8100/tcp.
    let to_shared: Vec<_> = c
        .rules
        .iter()
        .filter(|(_, k, _)| k.dst_env == 4u32.to_be_bytes())
        .collect();
    let explicit = to_shared.iter().filter(|(_, _, id)| *id == 0).count();
    assert_eq!(explicit, 4 * 6);
    assert!(
        c.rules
            .contains(&(RULE_PREFIX_PORT, RuleKey::new(2, 4, 17, 53), 0))
    );
    // Defaults allow host and world with everyone.
    assert!(c.rules.contains(&(
        RULE_PREFIX_PAIR,
        RuleKey::new(0, 3, 0, 0),
        RULE_DEFAULT_HOST
    )));
    assert!(c.rules.contains(&(
        RULE_PREFIX_PAIR,
        RuleKey::new(3, 0, 0, 0),
        RULE_DEFAULT_HOST
    )));
    // dev -> prod has no entry at all: a violation.
    assert!(
        !c.rules
            .iter()
            .any(|(_, k, _)| *k == RuleKey::new(2, 3, 0, 0))
    );
}

#[test]
fn deny_defaults_leave_no_pair_entries() {
    let text = "[defaults]\nhost = \"deny\"\n[envs.a]\ncidrs = [\"198.18.1.0/24\"]\n";
    let c = compile(&parse(text).unwrap()).unwrap();
    assert!(
        !c.rules
            .iter()
            .any(|(_, k, _)| k.src_env == 0u32.to_be_bytes() || k.dst_env == 0u32.to_be_bytes())
    );
    assert!(
        c.rules
            .iter()
            .any(|(_, k, _)| *k == RuleKey::new(1, 2, 0, 0))
    );
}

#[test]
fn bare_port_means_tcp_and_udp() {
    let specs = PortSpec::parse_entry("53").unwrap();
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[0].to_string(), "53/tcp");
    assert_eq!(specs[1].to_string(), "53/udp");
    assert_eq!(PortSpec::parse_entry("icmp").unwrap()[0].ports, None);
}

#[test]
fn agent_loss_settings_parse_and_compile() {
    let text = "[envs.a]\ncidrs = [\"198.18.1.0/24\"]\non_agent_loss = \"closed\"\nagent_loss_timeout = \"5s\"\n[envs.b]\ncidrs = [\"198.18.2.0/24\"]\n";
    let p = parse(text).unwrap();
    assert_eq!(p.envs[0].on_agent_loss, OnLoss::Closed);
    assert_eq!(
        p.envs[0].agent_loss_timeout,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(p.envs[1].on_agent_loss, OnLoss::Keep);
    assert_eq!(p.envs[1].agent_loss_timeout, DEFAULT_AGENT_LOSS_TIMEOUT);
    let c = compile(&p).unwrap();
    use envguard_common::config::{EnvLoss, ON_LOSS_CLOSED, ON_LOSS_FOLLOW, ON_LOSS_KEEP};
    assert_eq!(c.env_loss.len(), 4);
    assert_eq!(c.env_loss[2], EnvLoss::new(ON_LOSS_CLOSED, 5_000_000_000));
    assert_eq!(c.env_loss[3].mode, ON_LOSS_KEEP);
    // host and world allow by default: they follow a peer that fails open.
    assert_eq!(c.env_loss[0], EnvLoss::new(ON_LOSS_FOLLOW, 0));
    assert_eq!(c.env_loss[1], EnvLoss::new(ON_LOSS_FOLLOW, 0));
    let denied = format!("[defaults]\nhost = \"deny\"\n{text}");
    let c = compile(&parse(&denied).unwrap()).unwrap();
    assert_eq!(c.env_loss[0], EnvLoss::new(ON_LOSS_KEEP, 0));
    assert_eq!(c.env_loss[1], EnvLoss::new(ON_LOSS_FOLLOW, 0));
    for (text, needle) in [
        (
            "[envs.a]\non_agent_loss = \"maybe\"\n",
            "on_agent_loss must be",
        ),
        (
            "[envs.a]\nagent_loss_timeout = \"soon\"\n",
            "invalid agent_loss_timeout",
        ),
        ("[envs.a]\nagent_loss_timeout = \"500ms\"\n", "at least 2s"),
    ] {
        let (line, msg) = error(text);
        assert_eq!(line, Some(2), "{msg}");
        assert!(msg.contains(needle), "{msg}");
    }
}

#[test]
fn probes_parse_and_bad_ones_name_their_line() {
    let p = parse(
        "[envs.prod]\ncidrs = [\"198.18.10.0/24\"]\nprobes = [\"198.18.10.5:5432/tcp\", \"vault.prod.internal:8200/tcp\", \"[2001:db8::5]:53/udp\"]\n",
    )
    .unwrap();
    let probes: Vec<String> = p.envs[0].probes.iter().map(ToString::to_string).collect();
    assert_eq!(
        probes,
        [
            "198.18.10.5:5432/tcp",
            "vault.prod.internal:8200/tcp",
            "[2001:db8::5]:53/udp"
        ]
    );
    assert_eq!(p.envs[0].lines.probes, [3, 3, 3]);
    let text = "[envs.prod]\ncidrs = [\"198.18.10.0/24\"]\nprobes = [\n  \"198.18.10.5:5432\",\n  \"198.18.10.5:53/udp\",\n  \"198.18.10.5:53/udp\",\n]\n";
    match parse(text) {
        Err(PolicyError::Invalid(errs)) => {
            let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
            assert_eq!(
                rendered,
                [
                    "p.toml:4: probe \"198.18.10.5:5432\" names no protocol: a probe is HOST:PORT/PROTO, e.g. \"198.18.10.5:5432/tcp\", \"vault.prod.internal:8200/tcp\" or \"[2001:db8::5]:53/udp\"",
                    "p.toml:6: probe 198.18.10.5:53/udp is listed twice in env prod",
                ]
            );
        }
        other => panic!("expected two errors, got {other:?}"),
    }
}

#[test]
fn interfaces_parse() {
    let p = parse(
        "[envs.dev]\ninterfaces = [\"tap-dev*\"]\n[envs.prod]\ninterfaces = [\"tap-prod*\", \"br-prod\"]\n",
    )
    .expect("valid");
    assert_eq!(p.envs[0].name, "dev");
    assert_eq!(
        p.envs[0].interfaces,
        [interfaces::IfacePattern::Prefix("tap-dev".into())]
    );
    assert_eq!(
        p.envs[1].interfaces,
        [
            interfaces::IfacePattern::Prefix("tap-prod".into()),
            interfaces::IfacePattern::Name("br-prod".into())
        ]
    );
}

#[test]
fn interface_errors_name_the_line_and_both_envs() {
    for (text, line, says) in [
        (
            "[envs.a]\ninterfaces = [\"tap-*\"]\n[envs.b]\ninterfaces = [\"tap-b1\"]\n",
            4,
            "interface tap-b1 in env b overlaps tap-* in env a",
        ),
        (
            "[envs.a]\ninterfaces = [\"br0\"]\n[envs.b]\ninterfaces = [\"br0\"]\n",
            4,
            "interface br0 in env b overlaps br0 in env a",
        ),
        (
            "[envs.a]\ninterfaces = [\"br0\", \"br*\"]\n",
            2,
            "listed twice in env a",
        ),
        ("[envs.a]\ninterfaces = [\"*\"]\n", 2, "every interface"),
        (
            "[envs.a]\ninterfaces = [\"t*p\"]\n",
            2,
            "only allowed at the end",
        ),
        (
            "[envs.a]\ninterfaces = [\"sixteen-bytes-xx\"]\n",
            2,
            "longer than 15 bytes",
        ),
    ] {
        let (l, msg) = error(text);
        assert_eq!(l, Some(line), "{text}: {msg}");
        assert!(msg.contains(says), "{text}: {msg}");
    }
}
