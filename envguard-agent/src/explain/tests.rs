use std::path::Path;

use super::*;
use crate::{
    control::Scope,
    policy::{Mode, Selector, compile::compile, ports::PROTO_TCP},
};

const POLICY: &str = r#"mode = "enforce"

[envs.prod]
cgroups = ["/prod.slice", "/prod.slice/dev-sandbox.slice/prod-agent.service"]
cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]

[envs.dev]
cgroups = ["/dev.slice", "/prod.slice/dev-sandbox.slice"]
cidrs = ["198.18.20.0/24", "198.18.10.128/25"]

[envs.staging]
cgroups = ["/staging.slice"]
cidrs = ["198.18.30.0/24"]

[envs.shared]
cidrs = ["198.18.0.0/28"]
on_agent_loss = "open"

[[allow]]
from = "*"
to = "shared"
ports = ["53", "8000-8100/tcp"]

[[allow]]
from = "dev"
to = "prod"
ports = ["5432/tcp"]

[[deny]]
from = "*"
to = "shared"
ports = ["8080/tcp"]

[[pair_mode]]
from = "dev"
to = "staging"
mode = "audit"
"#;

struct Fixture {
    policy: Policy,
    compiled: Compiled,
    modes: Modes,
    /// What a live agent learnt; `None` offline.
    endpoints: Option<BTreeMap<IpAddr, Owner>>,
}

fn fixture(text: &str) -> Fixture {
    let policy = Policy::parse(Path::new("p.toml"), text).expect("valid");
    let compiled = compile(&policy).expect("compiles");
    let modes = Modes::from_policy(&policy);
    Fixture {
        policy,
        compiled,
        modes,
        endpoints: Some(BTreeMap::new()),
    }
}

impl Fixture {
    fn explain(&self, from: &str, to: &str, port: &str) -> Explanation {
        let port: PortProto = port.parse().unwrap();
        explain(
            &self.policy,
            &self.compiled,
            &from.parse().unwrap(),
            &to.parse().unwrap(),
            port.proto,
            port.port,
            &State {
                modes: &self.modes,
                endpoints: self.endpoints.as_ref(),
            },
        )
        .unwrap()
    }
}

#[test]
fn endpoints_parse() {
    assert_eq!(
        "198.18.10.1".parse(),
        Ok(Endpoint::Ip("198.18.10.1".parse().unwrap()))
    );
    assert_eq!(
        "[2001:db8::1]".parse(),
        Ok(Endpoint::Ip("2001:db8::1".parse().unwrap()))
    );
    assert_eq!(
        "/prod.slice//app.service/".parse(),
        Ok(Endpoint::Cgroup("/prod.slice/app.service".into()))
    );
    assert_eq!("world".parse(), Ok(Endpoint::Env("world".into())));
    for bad in ["*", "", "198.18.10.0/24", "a b", "/a/../b"] {
        assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} must not parse");
    }
}

#[test]
fn ports_parse() {
    let p = |s: &str| s.parse::<PortProto>();
    assert_eq!(
        p("443/tcp"),
        Ok(PortProto {
            proto: PROTO_TCP,
            port: 443
        })
    );
    assert_eq!(p("icmp").unwrap().port, 0);
    assert_eq!(p("icmp").unwrap().to_string(), "icmp");
    assert_eq!(p("53/udp").unwrap().to_string(), "53/udp");
    for bad in ["53", "tcp", "1-2/tcp", "53/sctp", "0/tcp"] {
        assert!(p(bad).is_err(), "{bad:?} must not parse");
    }
}

#[test]
fn a_learnt_endpoint_beats_every_cidr_and_offline_says_it_cannot_see_them() {
    let mut f = fixture(POLICY);
    let prod = f.compiled.env_id("prod").expect("prod");
    // An address in dev's /24, learnt as a prod container's: the kernel
    // takes the endpoint's env first, and so must explain.
    let ip: IpAddr = "198.18.20.9".parse().unwrap();
    f.endpoints = Some(BTreeMap::from([(
        ip,
        Owner {
            env: prod,
            netns: 4026532001,
        },
    )]));
    for to in ["198.18.20.9", "::ffff:198.18.20.9"] {
        let e = f.explain("/dev.slice", to, "22/tcp");
        assert_eq!(e.to.env, "prod", "{to}");
        assert_eq!(e.to.env_from, "endpoint", "{to}");
        assert_eq!(
            e.to.reason,
            "endpoint 198.18.20.9: an address of network namespace 4026532001 (learnt), whose processes are in prod"
        );
        assert_eq!(e.decision, "violation");
        assert!(
            e.notes.iter().all(|n| !n.starts_with("offline")),
            "{:?}",
            e.notes
        );
    }
    let e = f.explain("198.18.20.9", "/prod.slice", "5432/tcp");
    assert_eq!(
        (e.from.env.as_str(), e.from.env_from.as_str()),
        ("prod", "endpoint")
    );

    // Offline: the CIDR, and a note that says what it cannot know.
    f.endpoints = None;
    let e = f.explain("/dev.slice", "198.18.20.9", "22/tcp");
    assert_eq!((e.to.env.as_str(), e.to.env_from.as_str()), ("dev", "cidr"));
    assert!(
        e.notes
            .iter()
            .any(|n| n.starts_with("offline: a container's address")),
        "{:?}",
        e.notes
    );
    let e = f.explain("/dev.slice", "/prod.slice", "22/tcp");
    assert!(
        e.notes.iter().all(|n| !n.starts_with("offline")),
        "no address, no note: {:?}",
        e.notes
    );
}

#[test]
fn ip_by_longest_prefix_and_default_world() {
    let f = fixture(POLICY);
    // 198.18.10.200 is in prod's /24 and dev's /25: the /25 wins.
    let e = f.explain("198.18.10.200", "198.18.10.1", "5432/tcp");
    assert_eq!(e.from.env, "dev");
    assert_eq!(e.from.env_from, "cidr");
    assert_eq!(e.from.reason, "cidr 198.18.10.128/25 of dev");
    assert_eq!(e.to.reason, "cidr 198.18.10.0/24 of prod");
    assert_eq!(e.decision, "allowed");
    assert_eq!(e.rule.label, "allow dev -> prod [5432/tcp] (line 24)");
    assert_eq!(e.rule.line, Some(24));
    assert_eq!(e.mode.effect, "allowed");

    // IPv6, and IPv4-mapped IPv6 counting as IPv4.
    let e = f.explain("::ffff:198.18.20.7", "2001:db8:10::5", "22/tcp");
    assert_eq!((e.from.env.as_str(), e.to.env.as_str()), ("dev", "prod"));
    assert_eq!(e.to.reason, "cidr 2001:db8:10::/48 of prod");
    assert_eq!(e.decision, "violation");
    assert_eq!(
        e.rule.label,
        "default:cross-env (no allow rule for dev -> prod)"
    );
    assert_eq!(e.rule.line, None);
    assert_eq!(e.mode.scope, "global");
    assert_eq!(e.mode.verdict, "denied");
    assert_eq!(e.mode.effect, "refused");

    let e = f.explain("/dev.slice", "203.0.113.9", "443/tcp");
    assert_eq!(e.to.env, "world");
    assert_eq!(e.to.env_from, "default");
    assert_eq!(e.to.reason, "default: in no CIDR → world");
    assert_eq!(e.decision, "allowed");
    assert_eq!(e.rule.label, "default:world=allow");
}

#[test]
fn cgroup_by_deepest_listed_ancestor() {
    let f = fixture(POLICY);
    let e = f.explain(
        "/prod.slice/dev-sandbox.slice/job-1.scope",
        "/prod.slice/db.service",
        "5432/tcp",
    );
    assert_eq!(e.from.env, "dev");
    assert_eq!(
        e.from.reason,
        "cgroup /prod.slice/dev-sandbox.slice (deepest listed ancestor)"
    );
    assert_eq!(e.to.env, "prod");
    assert_eq!(e.to.reason, "cgroup /prod.slice (deepest listed ancestor)");
    // Deeper still, prod again.
    let e = f.explain(
        "/prod.slice/dev-sandbox.slice/prod-agent.service",
        "staging",
        "80/tcp",
    );
    assert_eq!(e.from.env, "prod");
    assert!(e.from.reason.ends_with("(listed)"), "{}", e.from.reason);
    // Below nothing listed: host.
    let e = f.explain("/system.slice/sshd.service", "prod", "22/tcp");
    assert_eq!(e.from.env, "host");
    assert_eq!(e.from.reason, "default: below no listed cgroup → host");
    assert_eq!(e.rule.label, "default:host=allow");
    assert_eq!(e.decision, "allowed");
}

#[test]
fn env_names_and_same_env() {
    let f = fixture(POLICY);
    let e = f.explain("prod", "prod", "22/tcp");
    assert_eq!(e.from.env_from, "named");
    assert_eq!(e.from.reason, "named env");
    assert_eq!(e.decision, "allowed");
    assert!(e.rule.label.starts_with("same-env"), "{}", e.rule.label);
    let err = explain(
        &f.policy,
        &f.compiled,
        &Endpoint::Env("qa".into()),
        &Endpoint::Env("prod".into()),
        PROTO_TCP,
        1,
        &State::offline(&f.modes),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "unknown env \"qa\"; known: host, world, dev, prod, shared, staging"
    );
}

#[test]
fn deny_beats_allow_and_port_ranges() {
    let f = fixture(POLICY);
    // Inside the allowed range…
    let e = f.explain("dev", "198.18.0.5", "8081/tcp");
    assert_eq!(e.decision, "allowed");
    assert_eq!(e.rule.line, Some(19));
    // …but 8080/tcp is denied, even though the allow covers it.
    let e = f.explain("dev", "198.18.0.5", "8080/tcp");
    assert_eq!(e.decision, "violation");
    assert_eq!(e.rule.label, "deny * -> shared [8080/tcp] (line 29)");
    assert_eq!(e.rule.line, Some(29));
    assert_eq!(e.mode.effect, "refused");
    // A deny applies within one env too.
    let e = f.explain("shared", "shared", "8080/tcp");
    assert_eq!(e.decision, "violation");
    // Just outside the range.
    let e = f.explain("dev", "shared", "8101/tcp");
    assert_eq!(e.decision, "violation");
    // `53` is TCP and UDP; ICMP is not allowed.
    assert_eq!(f.explain("dev", "shared", "53/udp").decision, "allowed");
    assert_eq!(f.explain("dev", "shared", "icmp").decision, "violation");
    assert_eq!(f.explain("dev", "shared", "icmp").port, None);
}

#[test]
fn pair_mode_changes_what_the_mode_does() {
    let f = fixture(POLICY);
    let e = f.explain("/dev.slice/app.service", "198.18.30.4", "443/tcp");
    assert_eq!((e.from.env.as_str(), e.to.env.as_str()), ("dev", "staging"));
    assert_eq!(e.decision, "violation");
    assert_eq!(e.mode.mode, "audit");
    assert_eq!(e.mode.scope, "pair dev->staging");
    assert_eq!(e.mode.verdict, "audited");
    assert_eq!(e.mode.effect, "allowed and reported");
    assert_eq!(
        e.mode.origin.as_deref(),
        Some("[[pair_mode]] dev -> staging, line 34")
    );
    // The reverse pair has no mode of its own.
    let e = f.explain("staging", "dev", "443/tcp");
    assert_eq!(e.mode.scope, "global");
    assert_eq!(e.mode.effect, "refused");

    // The live state: a runtime override wins over the policy's.
    let mut modes = f.modes.clone();
    let pair = Scope::Pair {
        from: "dev".into(),
        to: "staging".into(),
    };
    modes.set(pair, Mode::Enforce, None);
    modes.set(Scope::Global, Mode::Audit, None);
    let e = explain(
        &f.policy,
        &f.compiled,
        &Endpoint::Env("dev".into()),
        &Endpoint::Env("staging".into()),
        PROTO_TCP,
        443,
        &State::offline(&modes),
    )
    .unwrap();
    assert_eq!(e.mode.effect, "refused");
    assert_eq!(e.mode.origin.as_deref(), Some("envguard mode"));
    let e = explain(
        &f.policy,
        &f.compiled,
        &Endpoint::Env("staging".into()),
        &Endpoint::Env("dev".into()),
        PROTO_TCP,
        443,
        &State::offline(&modes),
    )
    .unwrap();
    assert_eq!(e.mode.effect, "allowed and reported");
}

#[test]
fn defaults_deny() {
    let text = POLICY.replace(
        "mode = \"enforce\"\n",
        "mode = \"enforce\"\n[defaults]\nhost = \"deny\"\nworld = \"deny\"\n",
    );
    let f = fixture(&text);
    let e = f.explain("/system.slice/cron.service", "prod", "22/tcp");
    assert_eq!(e.decision, "violation");
    assert_eq!(e.rule.label, "default:host=deny");
    let e = f.explain("prod", "192.0.2.1", "443/tcp");
    assert_eq!(e.decision, "violation");
    assert_eq!(e.rule.label, "default:world=deny");
    // An explicit allow still opens the way to shared.
    assert_eq!(f.explain("host", "shared", "53/udp").decision, "allowed");
    // host <-> world: either side's deny is enough.
    let only_world = POLICY.replace(
        "mode = \"enforce\"\n",
        "mode = \"enforce\"\n[defaults]\nworld = \"deny\"\n",
    );
    let f = fixture(&only_world);
    let e = f.explain("host", "world", "443/tcp");
    assert_eq!(e.decision, "violation");
    assert_eq!(e.rule.label, "default:world=deny");
    assert_eq!(f.explain("host", "prod", "443/tcp").decision, "allowed");
}

/// The README's semantics, read straight off the policy: the compiled
/// lookups must agree with it everywhere.
fn by_the_book(p: &Policy, src: &str, dst: &str, proto: u8, port: u16) -> bool {
    use crate::policy::{Action, Default, HOST, WORLD};
    let sel =
        |s: &Selector, env: &str| matches!(s, Selector::Any) || *s == Selector::Env(env.into());
    let matches = |r: &&crate::policy::Rule| {
        sel(&r.from, src)
            && sel(&r.to, dst)
            && r.ports.as_ref().is_none_or(|specs| {
                specs.iter().any(|s| {
                    s.proto == proto && s.ports.is_none_or(|(lo, hi)| lo <= port && port <= hi)
                })
            })
    };
    if p.rules
        .iter()
        .filter(|r| r.action == Action::Deny)
        .any(|r| matches(&r))
    {
        return false;
    }
    if src == dst
        || p.rules
            .iter()
            .filter(|r| r.action == Action::Allow)
            .any(|r| matches(&r))
    {
        return true;
    }
    let involves = |e: &str| src == e || dst == e;
    (involves(HOST) || involves(WORLD))
        && !(involves(HOST) && p.default_host == Default::Deny)
        && !(involves(WORLD) && p.default_world == Default::Deny)
}

#[test]
fn decisions_agree_with_the_policy_semantics() {
    let variants = [
        POLICY.to_owned(),
        POLICY.replace(
            "mode = \"enforce\"\n",
            "mode = \"enforce\"\n[defaults]\nhost = \"deny\"\n",
        ),
        POLICY.replace(
            "mode = \"enforce\"\n",
            "mode = \"enforce\"\n[defaults]\nworld = \"deny\"\n",
        ),
    ];
    let ports = [
        1, 22, 53, 5432, 7999, 8000, 8063, 8064, 8079, 8080, 8081, 8100, 8101, 65535,
    ];
    for text in &variants {
        let f = fixture(text);
        for src in f.compiled.env_ids() {
            for dst in f.compiled.env_ids() {
                let (s, d) = (f.compiled.env_name(src), f.compiled.env_name(dst));
                let flows = ports
                    .iter()
                    .flat_map(|&p| [(PROTO_TCP, p), (crate::policy::ports::PROTO_UDP, p)])
                    .chain([(crate::policy::ports::PROTO_ICMP, 0)]);
                for (proto, port) in flows {
                    assert_eq!(
                        decide(&f.compiled, src, dst, proto, port).allowed,
                        by_the_book(&f.policy, s, d, proto, port),
                        "{s} -> {d} {port}/{proto}"
                    );
                }
            }
        }
    }
}

#[test]
fn notes_and_human_output() {
    let f = fixture(POLICY);
    let e = f.explain("dev", "127.0.0.1", "5432/tcp");
    assert!(
        e.notes.iter().any(|n| n.contains("is on this host")),
        "{:?}",
        e.notes
    );
    // No same-host socket lookup for ICMP, nor for a source.
    assert!(f.explain("dev", "127.0.0.1", "icmp").notes.is_empty());
    assert!(f.explain("::1", "dev", "22/tcp").notes.is_empty());
    assert_eq!(f.explain("shared", "shared", "53/udp").notes.len(), 1);
    let e = f.explain("dev", "shared", "53/udp");
    assert!(
        e.notes.iter().any(|n| n.contains("shared's fail mode")),
        "{:?}",
        e.notes
    );

    let e = f.explain("/dev.slice/app.service", "198.18.10.1", "5432/tcp");
    assert!(e.notes.is_empty(), "{:?}", e.notes);
    assert_eq!(
        e.to_string(),
        "\
from     /dev.slice/app.service  dev   cgroup /dev.slice (deepest listed ancestor)
to       198.18.10.1             prod  cidr 198.18.10.0/24 of prod
flow     dev -> prod, 5432/tcp
decision allowed
rule     allow dev -> prod [5432/tcp] (line 24)
mode     enforce (global): allowed"
    );

    // JSON round trip, for the agent's answer to a client.
    let json = serde_json::to_string(&e).unwrap();
    let back: Explanation = serde_json::from_str(&json).unwrap();
    assert_eq!(back, e);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["to"]["env_from"], "cidr");
    assert_eq!(v["rule"]["line"], 24);
    assert_eq!(v["mode"]["verdict"], "allowed");
}

#[test]
fn interfaces_resolve_to_their_env() {
    let policy = crate::policy::Policy::parse(
        std::path::Path::new("p.toml"),
        "[envs.dev]\ninterfaces = [\"tap-dev*\"]\n[envs.prod]\ncidrs = [\"198.18.10.0/24\"]\n",
    )
    .unwrap();
    let compiled = crate::policy::compile::compile(&policy).unwrap();
    assert_eq!(
        "iface:tap-dev3".parse(),
        Ok(Endpoint::Interface("tap-dev3".into()))
    );
    assert!("iface:tap-*".parse::<Endpoint>().is_err());
    assert!("iface:".parse::<Endpoint>().is_err());
    let modes = Modes::from_policy(&policy);
    let e = explain(
        &policy,
        &compiled,
        &Endpoint::Interface("tap-dev3".into()),
        &Endpoint::Ip("198.18.10.5".parse().unwrap()),
        PROTO_TCP,
        5432,
        &State::offline(&modes),
    )
    .unwrap();
    assert_eq!(e.from.env, "dev");
    assert_eq!(e.from.env_from, "interface");
    assert_eq!(e.to.env, "prod");
    assert_eq!(e.decision, "violation", "{}", e.decision);
}
