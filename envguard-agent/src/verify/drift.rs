//! Drift: the policy file, the policy the agent loaded, and the kernel's
//! policy maps (slot in force), compared entry by entry.
//!
//! The maps are read back through their pins (`<pin root>/layout-…/maps/`),
//! independently of the agent, and set against what compiling the policy the
//! agent reports as loaded (`policy` control request: its files' text at the
//! load) gives, with the env ids the kernel's `ENV_NAMES` holds. The
//! comparison itself is pure (`compare_map`): both sides are rendered into
//! the same readable keys and values first.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use envguard_common::{
    config::{Config, MODE_ENFORCE},
    maps,
    policy::{EnvName, EnvValue, PairKey, RuleKey, RuleValue},
};
use serde::{Deserialize, Serialize};

use crate::policy::{compile::Compiled, ports::proto_name};

/// One difference found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// `policy_file` (the file changed since the agent loaded it), `agent`
    /// (not running, not answering, another policy path), `kernel_map` (a
    /// map entry differs from the loaded policy), `kernel` (the maps could
    /// not be read, the mode differs).
    pub kind: String,
    /// The map, for `kernel_map`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map: Option<String>,
    /// `missing`, `extra` or `changed`, for `kernel_map`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    pub message: String,
}

impl Drift {
    pub fn new(kind: &str, message: String) -> Drift {
        Drift {
            kind: kind.to_owned(),
            map: None,
            change: None,
            message,
        }
    }
}

/// A map's entries as readable key → value.
pub type Entries = BTreeMap<String, String>;

/// Every difference between what `map` should hold and what it holds.
pub fn compare_map(map: &str, expected: &Entries, actual: &Entries) -> Vec<Drift> {
    let mut out = Vec::new();
    let entry = |change: &str, message: String| Drift {
        kind: "kernel_map".to_owned(),
        map: Some(map.to_owned()),
        change: Some(change.to_owned()),
        message: format!("kernel map {map} differs from the loaded policy: {message}"),
    };
    for (k, want) in expected {
        match actual.get(k) {
            None => out.push(entry("missing", format!("entry {k} ({want}) is missing"))),
            Some(got) if got != want => out.push(entry(
                "changed",
                format!("entry {k} is {got} in the kernel, {want} in the policy"),
            )),
            Some(_) => {}
        }
    }
    for (k, got) in actual {
        if !expected.contains_key(k) {
            out.push(entry(
                "extra",
                format!("entry {k} ({got}) is not in the policy"),
            ));
        }
    }
    out
}

/// What the kernel's policy maps hold (or should hold), readable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsView {
    /// By map name (with its slot suffix).
    pub maps: BTreeMap<String, Entries>,
    /// `audit` or `enforce`, from `CONFIG`.
    pub mode: Option<String>,
}

fn env(names: &[String], id: u32) -> String {
    match names.get(id as usize) {
        Some(n) if !n.is_empty() => n.clone(),
        _ => format!("#{id}"),
    }
}

/// `dev -> prod tcp/5432 (prefix 88)` for a rule key of `prefix` bits.
pub fn rule_key(names: &[String], prefix: u32, k: &RuleKey) -> String {
    let src = env(names, u32::from_be_bytes(k.src_env));
    let dst = env(names, u32::from_be_bytes(k.dst_env));
    let proto = proto_name(k.proto).map_or_else(|| k.proto.to_string(), str::to_owned);
    let port = u16::from_be_bytes(k.port);
    match prefix {
        p if p <= 64 => format!("{src} -> {dst} any (prefix {p})"),
        p if p <= 72 => format!("{src} -> {dst} {proto} any port (prefix {p})"),
        p => format!("{src} -> {dst} {proto}/{port} (prefix {p})"),
    }
}

fn rule_value(rule: u32) -> String {
    format!("rule {rule}")
}

fn env_value(names: &[String], id: u32) -> String {
    format!("env {}", env(names, id))
}

fn loss_value(l: &envguard_common::config::EnvLoss) -> String {
    let mode = match l.mode {
        envguard_common::config::ON_LOSS_KEEP => "keep".to_owned(),
        envguard_common::config::ON_LOSS_OPEN => "open".to_owned(),
        envguard_common::config::ON_LOSS_CLOSED => "closed".to_owned(),
        envguard_common::config::ON_LOSS_FOLLOW => "follow".to_owned(),
        m => format!("mode {m}"),
    };
    format!("{mode} after {} ms", l.timeout_ns / 1_000_000)
}

/// ENV_LOSS by env id; all-zero entries (ids not in use, `keep` with no
/// timeout) are left out on both sides.
fn loss_entries(
    names: &[String],
    losses: impl Iterator<Item = (u32, envguard_common::config::EnvLoss)>,
) -> Entries {
    losses
        .filter(|(_, l)| l.mode != 0 || l.timeout_ns != 0)
        .map(|(id, l)| (format!("env {}", env(names, id)), loss_value(&l)))
        .collect()
}

fn meta_value(min: u32, max: u32) -> String {
    format!("cgroup levels {min}..={max}")
}

fn mode_name(m: u32) -> String {
    if m == MODE_ENFORCE {
        "enforce".to_owned()
    } else {
        "audit".to_owned()
    }
}

/// What the maps of `slot` hold for a compiled policy, with the pair modes
/// in force (`(from, to, mode)`: the policy's `[[pair_mode]]`s and runtime
/// switches, as `status` lists them).
pub fn expected(
    compiled: &Compiled,
    slot: usize,
    pair_modes: &[(String, String, String)],
) -> MapsView {
    let names = &compiled.env_names;
    let mut m: BTreeMap<String, Entries> = BTreeMap::new();
    let rules = |entries: &[(u32, RuleKey, u32)]| -> Entries {
        entries
            .iter()
            .map(|(p, k, r)| (rule_key(names, *p, k), rule_value(*r)))
            .collect()
    };
    m.insert(maps::RULES[slot].to_owned(), rules(&compiled.rules));
    m.insert(
        maps::DENY_RULES[slot].to_owned(),
        rules(&compiled.deny_rules),
    );
    let (mut v4, mut h4, mut v6, mut h6) = (
        Entries::new(),
        Entries::new(),
        Entries::new(),
        Entries::new(),
    );
    for (p, a, e) in &compiled.cidrs_v4 {
        let into = if *p == 32 { &mut h4 } else { &mut v4 };
        into.insert(format!("{}/{p}", Ipv4Addr::from(*a)), env_value(names, *e));
    }
    for (p, a, e) in &compiled.cidrs_v6 {
        let into = if *p == 128 { &mut h6 } else { &mut v6 };
        into.insert(format!("{}/{p}", Ipv6Addr::from(*a)), env_value(names, *e));
    }
    m.insert(maps::CIDR_ENVS_V4[slot].to_owned(), v4);
    m.insert(maps::CIDR_HOSTS_V4[slot].to_owned(), h4);
    m.insert(maps::CIDR_ENVS_V6[slot].to_owned(), v6);
    m.insert(maps::CIDR_HOSTS_V6[slot].to_owned(), h6);
    m.insert(
        maps::LISTED_CGROUPS[slot].to_owned(),
        compiled
            .cgroups
            .iter()
            // Paths too long for the kernel's key are left to the agent's poll.
            .filter(|(p, _)| envguard_common::policy::CgroupPath::new(p).is_some())
            .map(|(p, e)| (p.clone(), env_value(names, *e)))
            .collect(),
    );
    m.insert(
        maps::ENV_LOSS[slot].to_owned(),
        loss_entries(
            names,
            compiled
                .env_loss
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u32, *l)),
        ),
    );
    m.insert(
        maps::POLICY_META[slot].to_owned(),
        [(
            "0".to_owned(),
            meta_value(compiled.min_level, compiled.max_level),
        )]
        .into(),
    );
    m.insert(
        maps::PAIR_MODES[slot].to_owned(),
        pair_modes
            .iter()
            .map(|(f, t, mode)| (format!("{f} -> {t}"), mode.clone()))
            .collect(),
    );
    MapsView {
        maps: m,
        mode: None,
    }
}

/// Every difference between two views (maps present in `expected`).
pub fn compare(expected: &MapsView, actual: &MapsView) -> Vec<Drift> {
    let empty = Entries::new();
    let mut out = Vec::new();
    for (map, want) in &expected.maps {
        out.extend(compare_map(
            map,
            want,
            actual.maps.get(map).unwrap_or(&empty),
        ));
    }
    if let (Some(want), Some(got)) = (&expected.mode, &actual.mode)
        && want != got
    {
        out.push(Drift::new(
            "kernel",
            format!("the kernel's global mode (CONFIG) is {got}, the agent says {want}"),
        ));
    }
    out
}

/// The directory of the pinned maps under `pin_root`: the one layout with a
/// pinned `CONFIG`, or this build's own if there are several.
pub fn maps_dir(pin_root: &Path) -> anyhow::Result<PathBuf> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(pin_root)
        .map_err(|e| anyhow::anyhow!("reading the pin root {}: {e}", pin_root.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("layout-") && e.path().join("maps").join(maps::CONFIG).exists() {
            found.push(name);
        }
    }
    found.sort();
    let pick = match found.as_slice() {
        [] => anyhow::bail!(
            "no pinned envguard maps under {} (is enforcement in place?)",
            pin_root.display()
        ),
        [one] => one.clone(),
        many => match crate::loader::default_layout().filter(|d| many.contains(d)) {
            Some(own) => own,
            None => anyhow::bail!(
                "several pinned layouts under {} ({}), none of this build",
                pin_root.display(),
                many.join(", ")
            ),
        },
    };
    Ok(pin_root.join(pick).join("maps"))
}

fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| anyhow::anyhow!("opening the pinned map {}: {e}", path.display()))?;
    Map::from_map_data(data).map_err(|e| anyhow::anyhow!("reading map {name}: {e}"))
}

fn ctx(name: &str) -> impl Fn(aya::maps::MapError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("reading map {name}: {e}")
}

/// Age of the agent's last heartbeat in the pinned `AGENT_STATE`; `None`
/// when it never beat.
pub fn heartbeat_age(dir: &Path) -> anyhow::Result<Option<std::time::Duration>> {
    let state: Array<MapData, envguard_common::config::AgentState> = open(dir, maps::AGENT_STATE)?
        .try_into()
        .map_err(ctx(maps::AGENT_STATE))?;
    let s = state.get(&0, 0).map_err(ctx(maps::AGENT_STATE))?;
    Ok((s.heartbeat_ns != 0).then(|| {
        std::time::Duration::from_nanos(crate::sys::boot_ns().saturating_sub(s.heartbeat_ns))
    }))
}

/// The slot in force and the env names by id, from the pinned maps.
pub fn read_ids(dir: &Path) -> anyhow::Result<(usize, Vec<String>)> {
    let config: Array<MapData, Config> = open(dir, maps::CONFIG)?
        .try_into()
        .map_err(ctx(maps::CONFIG))?;
    let config = config.get(&0, 0).map_err(ctx(maps::CONFIG))?;
    let names: Array<MapData, EnvName> = open(dir, maps::ENV_NAMES)?
        .try_into()
        .map_err(ctx(maps::ENV_NAMES))?;
    let mut out = Vec::new();
    for n in names.iter() {
        let n = n.map_err(ctx(maps::ENV_NAMES))?;
        let len = n.name.iter().position(|&b| b == 0).unwrap_or(n.name.len());
        out.push(String::from_utf8_lossy(&n.name[..len]).into_owned());
    }
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    Ok((config.slot() as usize, out))
}

/// What the policy maps of `slot` hold now.
pub fn read_kernel(dir: &Path, slot: usize, names: &[String]) -> anyhow::Result<MapsView> {
    let mut m: BTreeMap<String, Entries> = BTreeMap::new();
    for name in [maps::RULES[slot], maps::DENY_RULES[slot]] {
        let trie: LpmTrie<MapData, RuleKey, RuleValue> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in trie.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            e.insert(
                rule_key(names, k.prefix_len(), &k.data()),
                rule_value(v.rule),
            );
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::CIDR_ENVS_V4[slot];
        let trie: LpmTrie<MapData, [u8; 4], EnvValue> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in trie.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            e.insert(
                format!("{}/{}", Ipv4Addr::from(k.data()), k.prefix_len()),
                env_value(names, v.env),
            );
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::CIDR_ENVS_V6[slot];
        let trie: LpmTrie<MapData, [u8; 16], EnvValue> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in trie.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            e.insert(
                format!("{}/{}", Ipv6Addr::from(k.data()), k.prefix_len()),
                env_value(names, v.env),
            );
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::CIDR_HOSTS_V4[slot];
        let h: HashMap<MapData, [u8; 4], EnvValue> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in h.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            e.insert(format!("{}/32", Ipv4Addr::from(k)), env_value(names, v.env));
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::CIDR_HOSTS_V6[slot];
        let h: HashMap<MapData, [u8; 16], EnvValue> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in h.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            e.insert(
                format!("{}/128", Ipv6Addr::from(k)),
                env_value(names, v.env),
            );
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::PAIR_MODES[slot];
        let h: HashMap<MapData, PairKey, u32> = open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in h.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            e.insert(
                format!("{} -> {}", env(names, k.src_env), env(names, k.dst_env)),
                mode_name(v),
            );
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::LISTED_CGROUPS[slot];
        let h: HashMap<MapData, envguard_common::policy::CgroupPath, EnvValue> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut e = Entries::new();
        for item in h.iter() {
            let (k, v) = item.map_err(ctx(name))?;
            let len = k
                .bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(k.bytes.len());
            e.insert(
                String::from_utf8_lossy(&k.bytes[..len]).into_owned(),
                env_value(names, v.env),
            );
        }
        m.insert(name.to_owned(), e);
    }
    {
        let name = maps::ENV_LOSS[slot];
        let a: Array<MapData, envguard_common::config::EnvLoss> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let mut all = Vec::new();
        for (i, l) in a.iter().enumerate() {
            all.push((i as u32, l.map_err(ctx(name))?));
        }
        m.insert(name.to_owned(), loss_entries(names, all.into_iter()));
    }
    {
        let name = maps::POLICY_META[slot];
        let a: Array<MapData, envguard_common::config::PolicyMeta> =
            open(dir, name)?.try_into().map_err(ctx(name))?;
        let meta = a.get(&0, 0).map_err(ctx(name))?;
        m.insert(
            name.to_owned(),
            [("0".to_owned(), meta_value(meta.min_level, meta.max_level))].into(),
        );
    }
    let config: Array<MapData, Config> = open(dir, maps::CONFIG)?
        .try_into()
        .map_err(ctx(maps::CONFIG))?;
    let config = config.get(&0, 0).map_err(ctx(maps::CONFIG))?;
    Ok(MapsView {
        maps: m,
        mode: Some(mode_name(config.mode)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, compile::compile};

    #[test]
    fn every_difference_is_named() {
        let want: Entries = [("a".into(), "rule 0".into()), ("b".into(), "rule 1".into())].into();
        let got: Entries = [("b".into(), "rule 7".into()), ("c".into(), "rule 2".into())].into();
        let d = compare_map("RULES_A", &want, &got);
        let msgs: Vec<(&str, &str)> = d
            .iter()
            .map(|d| (d.change.as_deref().unwrap(), d.message.as_str()))
            .collect();
        assert_eq!(
            msgs,
            [
                (
                    "missing",
                    "kernel map RULES_A differs from the loaded policy: entry a (rule 0) is missing"
                ),
                (
                    "changed",
                    "kernel map RULES_A differs from the loaded policy: entry b is rule 7 in the kernel, rule 1 in the policy"
                ),
                (
                    "extra",
                    "kernel map RULES_A differs from the loaded policy: entry c (rule 2) is not in the policy"
                ),
            ]
        );
        assert!(
            d.iter()
                .all(|d| d.kind == "kernel_map" && d.map.as_deref() == Some("RULES_A"))
        );
        assert!(compare_map("RULES_A", &want, &want).is_empty());
    }

    #[test]
    fn expected_view_renders_the_compiled_policy() {
        let p = Policy::parse(
            Path::new("p.toml"),
            "[envs.prod]\ncidrs = [\"198.18.10.0/24\", \"198.18.10.9/32\", \"2001:db8:10::/48\"]\n[envs.dev]\ncidrs = [\"198.18.20.0/24\"]\n[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"5432/tcp\"]\n",
        )
        .unwrap();
        let c = compile(&p).unwrap();
        let pairs = [("dev".to_owned(), "prod".to_owned(), "audit".to_owned())];
        let v = expected(&c, 1, &pairs);
        assert_eq!(
            v.maps["RULES_B"]
                .get("dev -> prod tcp/5432 (prefix 88)")
                .map(String::as_str),
            Some("rule 0")
        );
        assert_eq!(v.maps["CIDR_HOSTS_V4_B"]["198.18.10.9/32"], "env prod");
        assert_eq!(v.maps["CIDR_ENVS_V4_B"]["198.18.20.0/24"], "env dev");
        assert_eq!(v.maps["CIDR_ENVS_V6_B"]["2001:db8:10::/48"], "env prod");
        assert_eq!(v.maps["PAIR_MODES_B"]["dev -> prod"], "audit");
        assert_eq!(v.maps["ENV_LOSS_B"]["env prod"], "keep after 30000 ms");
        assert_eq!(v.maps["ENV_LOSS_B"]["env host"], "follow after 0 ms");
        assert_eq!(v.maps["POLICY_META_B"]["0"], "cgroup levels 1..=0");
        assert!(v.maps["LISTED_CGROUPS_B"].is_empty());
        assert!(compare(&v, &v).is_empty());
        let mut changed = v.clone();
        changed
            .maps
            .get_mut("RULES_B")
            .unwrap()
            .insert("dev -> prod tcp/5432 (prefix 88)".into(), "rule 9".into());
        let d = compare(&v, &changed);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].change.as_deref(), Some("changed"));
    }
}
