//! The policy file as written: serde types with spans, so every error can name
//! its line. Nothing here is validated beyond TOML and the keys' names.
use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub mode: Option<Spanned<String>>,
    pub defaults: Option<DefaultsFile>,
    #[serde(default)]
    pub envs: BTreeMap<Spanned<String>, EnvFile>,
    #[serde(default)]
    pub allow: Vec<Spanned<RuleFile>>,
    #[serde(default)]
    pub deny: Vec<Spanned<RuleFile>>,
    /// `[[pair_mode]]`, not `[[mode]]`: TOML cannot hold both a `mode = "…"`
    /// string and a `[[mode]]` array in one file.
    #[serde(default)]
    pub pair_mode: Vec<Spanned<PairModeFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairModeFile {
    pub from: Spanned<String>,
    pub to: Spanned<String>,
    pub mode: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsFile {
    pub host: Option<Spanned<String>>,
    pub world: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFile {
    #[serde(default)]
    pub cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    pub on_agent_loss: Option<Spanned<String>>,
    pub agent_loss_timeout: Option<Spanned<String>>,
    /// `envguard verify`'s probe targets: `HOST:PORT/PROTO`.
    #[serde(default)]
    pub probes: Vec<Spanned<String>>,
    /// Kubernetes namespaces (names, or prefixes ending in `*`) whose
    /// containers the OCI hook registers in this env.
    #[serde(default)]
    pub k8s_namespaces: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub from: Spanned<String>,
    pub to: Spanned<String>,
    pub ports: Option<Vec<Spanned<String>>>,
}

/// `item` with its span moved by `by` bytes.
fn shift<T>(item: Spanned<T>, by: usize) -> Spanned<T> {
    let span = item.span();
    Spanned::new(span.start + by..span.end + by, item.into_inner())
}

fn shift_opt<T>(item: Option<Spanned<T>>, by: usize) -> Option<Spanned<T>> {
    item.map(|i| shift(i, by))
}

fn shift_all<T>(items: Vec<Spanned<T>>, by: usize) -> Vec<Spanned<T>> {
    items.into_iter().map(|i| shift(i, by)).collect()
}

impl PolicyFile {
    /// The file with every span moved by `by` bytes: its place in the files
    /// of a policy directory laid end to end.
    pub fn shifted(self, by: usize) -> PolicyFile {
        let rule = |r: Spanned<RuleFile>| {
            let r = shift(r, by);
            let span = r.span();
            let r = r.into_inner();
            Spanned::new(
                span,
                RuleFile {
                    from: shift(r.from, by),
                    to: shift(r.to, by),
                    ports: r.ports.map(|p| shift_all(p, by)),
                },
            )
        };
        PolicyFile {
            mode: shift_opt(self.mode, by),
            defaults: self.defaults.map(|d| DefaultsFile {
                host: shift_opt(d.host, by),
                world: shift_opt(d.world, by),
            }),
            envs: self
                .envs
                .into_iter()
                .map(|(name, e)| {
                    (
                        shift(name, by),
                        EnvFile {
                            cgroups: shift_all(e.cgroups, by),
                            cidrs: shift_all(e.cidrs, by),
                            interfaces: shift_all(e.interfaces, by),
                            on_agent_loss: shift_opt(e.on_agent_loss, by),
                            agent_loss_timeout: shift_opt(e.agent_loss_timeout, by),
                            probes: shift_all(e.probes, by),
                            k8s_namespaces: shift_all(e.k8s_namespaces, by),
                        },
                    )
                })
                .collect(),
            allow: self.allow.into_iter().map(rule).collect(),
            deny: self.deny.into_iter().map(rule).collect(),
            pair_mode: self
                .pair_mode
                .into_iter()
                .map(|pm| {
                    let pm = shift(pm, by);
                    let span = pm.span();
                    let pm = pm.into_inner();
                    Spanned::new(
                        span,
                        PairModeFile {
                            from: shift(pm.from, by),
                            to: shift(pm.to, by),
                            mode: shift(pm.mode, by),
                        },
                    )
                })
                .collect(),
        }
    }
}
