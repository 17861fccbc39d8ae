//! Validation of a policy file (or a directory's files, merged): the TOML
//! model in, the checked `Policy` out, every problem with its place.
use super::*;
use envguard_common::policy::ENV_CONFLICT_NAME;

pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    pub(super) lines: Lines,
    pub(super) errors: Vec<Diagnostic>,
    /// The files of `text`, in order.
    pub(super) sources: Vec<Source>,
    /// Whether `path` is a policy directory.
    pub(super) dir: bool,
}

impl Validator<'_> {
    pub(super) fn error(&mut self, span: Option<Range<usize>>, message: String) {
        let (path, line) = match span.map(|s| self.lines.line_of(s.start)) {
            Some(line) => {
                let (path, line) = locate(&self.sources, self.path, line);
                (path, Some(line))
            }
            None => (self.path.to_owned(), None),
        };
        self.errors.push(Diagnostic {
            path,
            line,
            message,
        });
    }

    /// Where a spanned item is, for a message about another one.
    pub(super) fn place_of<T>(&self, item: &Spanned<T>) -> String {
        let line = self.lines.line_of(item.span().start);
        let (path, line) = locate(&self.sources, self.path, line);
        format!("{}:{line}", path.display())
    }

    /// Adds a later file of a policy directory to the files before it.
    pub(super) fn merge(&mut self, into: &mut file::PolicyFile, f: file::PolicyFile) {
        if let Some(m) = f.mode {
            match &into.mode {
                Some(prev) => {
                    let msg = format!(
                        "mode is already set at {}; set it in one file",
                        self.place_of(prev)
                    );
                    self.at(&m, msg);
                }
                None => into.mode = Some(m),
            }
        }
        if let Some(d) = f.defaults {
            let into = into.defaults.get_or_insert(file::DefaultsFile {
                host: None,
                world: None,
            });
            for (key, new, old) in [
                ("host", d.host, &mut into.host),
                ("world", d.world, &mut into.world),
            ] {
                match (new, old.as_ref()) {
                    (Some(new), Some(prev)) => {
                        let msg = format!(
                            "[defaults] {key} is already set at {}; set it in one file",
                            self.place_of(prev)
                        );
                        self.at(&new, msg);
                    }
                    (Some(new), None) => *old = Some(new),
                    (None, _) => {}
                }
            }
        }
        for (name, env) in f.envs {
            if let Some((prev, _)) = into.envs.get_key_value(&name) {
                let msg = format!(
                    "env {} is already defined at {}; an env is defined in one file",
                    name.get_ref(),
                    self.place_of(prev)
                );
                self.at(&name, msg);
            } else {
                into.envs.insert(name, env);
            }
        }
        into.allow.extend(f.allow);
        into.deny.extend(f.deny);
        into.pair_mode.extend(f.pair_mode);
    }

    pub(super) fn at<T>(&mut self, item: &Spanned<T>, message: String) {
        self.error(Some(item.span()), message);
    }

    pub(super) fn finish(self) -> PolicyError {
        PolicyError::Invalid(self.errors)
    }

    pub(super) fn validate(&mut self, file: file::PolicyFile) -> Policy {
        let mode = match file.mode.as_ref() {
            None => Mode::Audit,
            Some(m) => self.mode(m).unwrap_or(Mode::Audit),
        };
        let (default_host, default_world) = match &file.defaults {
            None => (Default::Allow, Default::Allow),
            Some(d) => (
                self.default(d.host.as_ref()),
                self.default(d.world.as_ref()),
            ),
        };

        let mut envs = Vec::new();
        let mut cidr_owner: HashMap<IpNetwork, String> = HashMap::new();
        let mut cgroup_owner: HashMap<String, String> = HashMap::new();
        let mut ns_owner: HashMap<String, String> = HashMap::new();
        let mut iface_owner: Vec<(super::interfaces::IfacePattern, String)> = Vec::new();
        for (name, env) in &file.envs {
            let n = name.get_ref();
            if n.is_empty() {
                self.at(name, "an env name must not be empty".to_owned());
                continue;
            }
            if n.len() > envguard_common::policy::MAX_ENV_NAME {
                self.at(
                    name,
                    format!(
                        "env name {n:?} is longer than {} bytes",
                        envguard_common::policy::MAX_ENV_NAME
                    ),
                );
                continue;
            }
            if n == HOST || n == WORLD || n == ANY || n == ENV_CONFLICT_NAME {
                self.at(
                    name,
                    format!("\"{n}\" is reserved (host: untagged local workloads, world: addresses in no CIDR, *: any env, {ENV_CONFLICT_NAME}: addresses claimed by two envs); choose another name"),
                );
                continue;
            }
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                self.at(
                    name,
                    format!("env name {n:?} may only use letters, digits, '-', '_' and '.'"),
                );
                continue;
            }
            let mut lines = EnvLines {
                name: self.lines.line_of(name.span().start),
                ..EnvLines::default()
            };
            let mut cidrs = Vec::new();
            for c in &env.cidrs {
                let Some(net) = self.cidr(c) else { continue };
                match cidr_owner.get(&net) {
                    Some(owner) if owner == n => {
                        self.at(c, format!("CIDR {net} is listed twice in env {n}"))
                    }
                    Some(owner) => self.at(
                        c,
                        format!("CIDR {net} is already in env {owner}; a CIDR belongs to one env"),
                    ),
                    None => {
                        cidr_owner.insert(net, n.clone());
                        cidrs.push(net);
                        lines.cidrs.push(self.lines.line_of(c.span().start));
                    }
                }
            }
            let mut cgroups = Vec::new();
            for c in &env.cgroups {
                let Some(path) = self.cgroup(c) else { continue };
                match cgroup_owner.get(&path) {
                    Some(owner) if owner == n => {
                        self.at(c, format!("cgroup {path} is listed twice in env {n}"))
                    }
                    Some(owner) => self.at(
                        c,
                        format!(
                            "cgroup {path} is already in env {owner}; a cgroup belongs to one env"
                        ),
                    ),
                    None => {
                        cgroup_owner.insert(path.clone(), n.clone());
                        cgroups.push(path);
                        lines.cgroups.push(self.lines.line_of(c.span().start));
                    }
                }
            }
            let mut interfaces = Vec::new();
            for i in &env.interfaces {
                let pat = match super::interfaces::IfacePattern::parse(i.get_ref()) {
                    Ok(p) => p,
                    Err(e) => {
                        self.at(i, e);
                        continue;
                    }
                };
                match iface_owner.iter().find(|(p, _)| p.overlaps(&pat)) {
                    Some((p, owner)) if owner == n => self.at(
                        i,
                        format!("interface {pat} is listed twice in env {n} (overlaps {p})"),
                    ),
                    Some((p, owner)) => self.at(
                        i,
                        format!(
                            "interface {pat} in env {n} overlaps {p} in env {owner}; an interface belongs to one env"
                        ),
                    ),
                    None => {
                        iface_owner.push((pat.clone(), n.clone()));
                        interfaces.push(pat);
                    }
                }
            }
            let on_agent_loss = match env.on_agent_loss.as_ref() {
                None => OnLoss::Keep,
                Some(v) => match v.get_ref().as_str() {
                    "keep" => OnLoss::Keep,
                    "open" => OnLoss::Open,
                    "closed" => OnLoss::Closed,
                    other => {
                        self.at(
                            v,
                            format!("on_agent_loss must be \"keep\", \"open\" or \"closed\", not {other:?}"),
                        );
                        OnLoss::Keep
                    }
                },
            };
            let agent_loss_timeout = match env.agent_loss_timeout.as_ref() {
                None => DEFAULT_AGENT_LOSS_TIMEOUT,
                Some(v) => match humantime::parse_duration(v.get_ref()) {
                    Ok(d) if d >= MIN_AGENT_LOSS_TIMEOUT => d,
                    Ok(_) => {
                        self.at(
                            v,
                            format!(
                                "agent_loss_timeout must be at least {} (the agent beats once a second)",
                                humantime::format_duration(MIN_AGENT_LOSS_TIMEOUT)
                            ),
                        );
                        DEFAULT_AGENT_LOSS_TIMEOUT
                    }
                    Err(e) => {
                        self.at(
                            v,
                            format!(
                                "invalid agent_loss_timeout {:?}: {e} (e.g. \"30s\", \"2m\")",
                                v.get_ref()
                            ),
                        );
                        DEFAULT_AGENT_LOSS_TIMEOUT
                    }
                },
            };
            let mut probes = Vec::new();
            for p in &env.probes {
                match p.get_ref().parse::<ProbeTarget>() {
                    Ok(t) if probes.contains(&t) => {
                        self.at(p, format!("probe {t} is listed twice in env {n}"))
                    }
                    Ok(t) => {
                        probes.push(t);
                        lines.probes.push(self.lines.line_of(p.span().start));
                    }
                    Err(e) => self.at(p, e),
                }
            }
            let mut k8s_namespaces = Vec::new();
            for ns in &env.k8s_namespaces {
                let pattern = ns.get_ref();
                if let Err(why) = crate::containers::check_namespace_pattern(pattern) {
                    self.at(ns, why);
                    continue;
                }
                match ns_owner.get(pattern) {
                    Some(owner) => self.at(
                        ns,
                        format!(
                            "k8s namespace {pattern:?} is already mapped to env {owner}; a namespace belongs to one env"
                        ),
                    ),
                    None => {
                        ns_owner.insert(pattern.clone(), n.clone());
                        k8s_namespaces.push(pattern.clone());
                    }
                }
            }
            envs.push(Env {
                name: n.clone(),
                cgroups,
                cidrs,
                interfaces,
                on_agent_loss,
                agent_loss_timeout,
                probes,
                k8s_namespaces,
                lines,
            });
        }

        let known: BTreeMap<&str, ()> = file
            .envs
            .keys()
            .map(|k| (k.get_ref().as_str(), ()))
            .chain([(HOST, ()), (WORLD, ())])
            .collect();
        let mut rules = Vec::new();
        let tagged = file
            .allow
            .iter()
            .map(|r| (Action::Allow, r))
            .chain(file.deny.iter().map(|r| (Action::Deny, r)));
        for (action, rule) in tagged {
            let line = self.lines.line_of(rule.span().start);
            let r = rule.get_ref();
            let from = self.selector(&r.from, &known);
            let to = self.selector(&r.to, &known);
            let ports = r.ports.as_ref().map(|ports| {
                if ports.is_empty() {
                    self.error(
                        Some(rule.span()),
                        format!("ports = [] matches nothing; remove the rule, or remove `ports` to {action} any port"),
                    );
                }
                let mut specs = Vec::new();
                for p in ports {
                    match PortSpec::parse_entry(p.get_ref()) {
                        Ok(parsed) => specs.extend(parsed),
                        Err(e) => self.at(p, e),
                    }
                }
                specs
            });
            if let (Some(from), Some(to)) = (from, to) {
                let at = self
                    .dir
                    .then(|| place(&self.sources, self.path, line, true));
                rules.push(Rule {
                    action,
                    from,
                    to,
                    ports,
                    line,
                    at,
                });
            }
        }
        let mut pair_modes = Vec::new();
        for pm in &file.pair_mode {
            let line = self.lines.line_of(pm.span().start);
            let r = pm.get_ref();
            let from = self.selector(&r.from, &known);
            let to = self.selector(&r.to, &known);
            let mode = self.mode(&r.mode);
            if let (Some(from), Some(to), Some(mode)) = (from, to, mode) {
                pair_modes.push(PairMode {
                    from,
                    to,
                    mode,
                    line,
                });
            }
        }

        Policy {
            path: self.path.to_owned(),
            revision: format!("sha256:{:x}", Sha256::digest(self.text.as_bytes())),
            sources: self.sources.clone(),
            mode,
            default_host,
            default_world,
            envs,
            rules,
            pair_modes,
            files: Vec::new(),
        }
    }

    pub(super) fn mode(&mut self, m: &Spanned<String>) -> Option<Mode> {
        match parse_mode(m.get_ref()) {
            Ok(mode) => Some(mode),
            Err(e) => {
                self.at(m, e);
                None
            }
        }
    }

    pub(super) fn default(&mut self, value: Option<&Spanned<String>>) -> Default {
        match value.map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "allow")) => Default::Allow,
            Some((_, "deny")) => Default::Deny,
            Some((v, other)) => {
                self.at(
                    v,
                    format!("a default must be \"allow\" or \"deny\", not {other:?}"),
                );
                Default::Allow
            }
        }
    }

    pub(super) fn cidr(&mut self, c: &Spanned<String>) -> Option<IpNetwork> {
        let s = c.get_ref();
        let net: IpNetwork = match s.parse() {
            Ok(n) => n,
            Err(e) => {
                self.at(c, format!("invalid CIDR {s:?}: {e}"));
                return None;
            }
        };
        if net.network() != net.ip() {
            self.at(
                c,
                format!(
                    "CIDR {s} has host bits set; did you mean {}/{}?",
                    net.network(),
                    net.prefix()
                ),
            );
            return None;
        }
        Some(net)
    }

    pub(super) fn cgroup(&mut self, c: &Spanned<String>) -> Option<String> {
        match normalize_cgroup(c.get_ref()) {
            Ok(path) => Some(path),
            Err(e) => {
                self.at(c, e);
                None
            }
        }
    }

    pub(super) fn selector(
        &mut self,
        s: &Spanned<String>,
        known: &BTreeMap<&str, ()>,
    ) -> Option<Selector> {
        let name = s.get_ref();
        if name == ANY {
            return Some(Selector::Any);
        }
        if known.contains_key(name.as_str()) {
            return Some(Selector::Env(name.clone()));
        }
        let mut names: Vec<&str> = known.keys().copied().collect();
        names.push(ANY);
        self.at(
            s,
            format!("unknown env {name:?} in rule; known: {}", names.join(", ")),
        );
        None
    }
}
