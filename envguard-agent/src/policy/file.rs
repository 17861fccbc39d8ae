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
    pub on_agent_loss: Option<Spanned<String>>,
    pub agent_loss_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub from: Spanned<String>,
    pub to: Spanned<String>,
    pub ports: Option<Vec<Spanned<String>>>,
}
