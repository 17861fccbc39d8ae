//! Containers in envs: what a container runtime tells envguard about a
//! container (the OCI state its hooks get, the runtime's state directory),
//! which env that puts the container in, and the registry of containers the
//! agent has registered.
//!
//! A container names its env with an annotation (`envguard.env=prod` by
//! default; the key is configurable), or, on Kubernetes, by its pod's
//! namespace (`io.kubernetes.pod.namespace`), which the *agent* maps to an env
//! through the policy's `k8s_namespaces` — the hook needs no policy.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{cgroups::is_below, policy::Env, sys::CgroupNames};

/// The annotation that names a container's env, unless the hook is given another.
pub const DEFAULT_ENV_KEY: &str = "envguard.env";
/// The annotation CRI runtimes (CRI-O, containerd) give every container of a pod.
pub const K8S_NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";

/// The container state an OCI runtime passes its hooks on stdin (runtime
/// spec, "State"). Unknown fields are ignored: runtimes add their own.
#[derive(Debug, Clone, Deserialize)]
pub struct HookState {
    #[serde(rename = "ociVersion", default)]
    pub oci_version: String,
    pub id: String,
    #[serde(default)]
    pub status: String,
    /// Absent in the `poststop` stage only.
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The subset of a bundle's `config.json` read here.
#[derive(Debug, Default, Deserialize)]
struct BundleConfig {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl HookState {
    /// The state's annotations over the bundle's `config.json` ones (the
    /// runtime copies the latter into the state; older runtimes did not).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut all = read_bundle_annotations(&self.bundle);
        all.extend(self.annotations.clone());
        all
    }
}

fn read_bundle_annotations(bundle: &Path) -> BTreeMap<String, String> {
    if bundle.as_os_str().is_empty() {
        return BTreeMap::new();
    }
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<BundleConfig>(&b).ok())
        .map(|c| c.annotations)
        .unwrap_or_default()
}

/// What a container's annotations say about its env.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Claim {
    /// Named by the env annotation.
    Env(String),
    /// A Kubernetes pod's namespace, for the agent to map.
    K8sNamespace(String),
}

/// The env claim of a container: its pod namespace (`ns_key`) wins over its
/// env annotation (`env_key`); `None` for a container with neither. On
/// Kubernetes a pod's annotations are written by whoever may create pods in
/// its namespace, so a dev team could annotate its pod `envguard.env=prod`;
/// the namespace is the orchestrator's word, and the operator's mapping
/// (`k8s_namespaces`) decides.
pub fn claim(annotations: &BTreeMap<String, String>, env_key: &str, ns_key: &str) -> Option<Claim> {
    let get = |k: &str| {
        annotations
            .get(k)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    if let Some(ns) = get(ns_key) {
        return Some(Claim::K8sNamespace(ns.to_owned()));
    }
    get(env_key).map(|env| Claim::Env(env.to_owned()))
}

/// A name for the container: the one its runtime or orchestrator gave it,
/// where the runtime says it (Kubernetes' container and pod names, nerdctl's
/// name annotation, containers/storage's `containers.json` for podman and
/// CRI-O), else the first 12 characters of its id.
pub fn container_name(id: &str, bundle: &Path, annotations: &BTreeMap<String, String>) -> String {
    let pod = annotations
        .get("io.kubernetes.pod.name")
        .or_else(|| annotations.get("io.kubernetes.cri.sandbox-name"));
    let container = annotations
        .get("io.kubernetes.container.name")
        .or_else(|| annotations.get("io.kubernetes.cri.container-name"));
    match (pod, container) {
        (Some(p), Some(c)) => return format!("{p}/{c}"),
        (None, Some(c)) => return c.clone(),
        _ => {}
    }
    if let Some(n) = annotations.get("nerdctl/name") {
        return n.clone();
    }
    if let Some(n) = storage_name(id, bundle) {
        return n;
    }
    id.chars().take(12).collect()
}

/// containers/storage (podman, CRI-O) keeps each container's names in
/// `<storage>/overlay-containers/containers.json`; the bundle is
/// `<storage>/overlay-containers/<id>/userdata`.
fn storage_name(id: &str, bundle: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Entry {
        id: String,
        #[serde(default)]
        names: Vec<String>,
    }
    let list = bundle.parent()?.parent()?.join("containers.json");
    let entries: Vec<Entry> = serde_json::from_slice(&std::fs::read(list).ok()?).ok()?;
    entries
        .into_iter()
        .find(|e| e.id == id)
        .and_then(|e| e.names.into_iter().next())
}

/// A `k8s_namespaces` entry: a namespace name (DNS label characters), or a
/// prefix of one followed by `*` (`*` alone matches every namespace).
pub fn check_namespace_pattern(p: &str) -> Result<(), String> {
    let stem = p.strip_suffix('*').unwrap_or(p);
    if p.is_empty() {
        return Err("a k8s namespace must not be empty".to_owned());
    }
    if stem.len() > 63
        || !stem
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "k8s namespace {p:?} must be a namespace name (a-z, 0-9, '-', at most 63) or a prefix of one ending in '*'"
        ));
    }
    Ok(())
}

/// The env a Kubernetes namespace maps to: an exact entry wins, else the
/// longest matching prefix, so `prod-*` in one env and `prod-eu-*` in
/// another mean what they say.
pub fn env_of_namespace<'a>(envs: &'a [Env], ns: &str) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for env in envs {
        for p in &env.k8s_namespaces {
            let rank = match p.strip_suffix('*') {
                None if p == ns => usize::MAX,
                Some(prefix) if ns.starts_with(prefix) => prefix.len(),
                _ => continue,
            };
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, &env.name));
            }
        }
    }
    best.map(|(_, e)| e)
}

/// A process's cgroup v2 path (the `0::` line of `/proc/<pid>/cgroup`).
pub fn cgroup_of_pid(pid: i32) -> std::io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    unified_cgroup(&text).ok_or_else(|| {
        std::io::Error::other(format!(
            "process {pid} is in no cgroup v2 (no 0:: line in /proc/{pid}/cgroup)"
        ))
    })
}

/// The `0::PATH` entry of a `/proc/<pid>/cgroup` text.
pub fn unified_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
        .filter(|p| p.starts_with('/'))
}

/// Who the container is, as its records and `status` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
}

/// The `register` request: put a container's cgroup into an env.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The container's cgroup, from the cgroup2 mount's root (`/a/b`).
    pub cgroup: String,
    pub claim: Claim,
    pub container: ContainerRef,
}

/// A registered container, as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub container: ContainerRef,
    /// The env's name: ids change with the policy, names do not.
    pub env: String,
    pub cgroup: String,
    pub cgroup_id: u64,
    /// RFC 3339.
    pub registered_at: String,
}

/// The registered containers by cgroup id.
#[derive(Debug, Default)]
pub struct Registry {
    by_cgroup: BTreeMap<u64, Registered>,
}

impl Registry {
    pub fn insert(&mut self, r: Registered) {
        self.by_cgroup.insert(r.cgroup_id, r);
    }

    pub fn remove(&mut self, cgroup_id: u64) -> Option<Registered> {
        self.by_cgroup.remove(&cgroup_id)
    }

    pub fn get(&self, cgroup_id: u64) -> Option<&Registered> {
        self.by_cgroup.get(&cgroup_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Registered> {
        self.by_cgroup.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cgroup.is_empty()
    }

    /// The container a socket of cgroup `id` belongs to: the registered
    /// cgroup itself or its deepest registered ancestor (a container that
    /// makes cgroups of its own).
    pub fn container_of(&self, id: u64, names: &mut CgroupNames) -> Option<&ContainerRef> {
        if id == 0 {
            return None;
        }
        if let Some(r) = self.by_cgroup.get(&id) {
            return Some(&r.container);
        }
        if self.by_cgroup.is_empty() {
            return None;
        }
        let path = names.path(id)?;
        self.by_cgroup
            .values()
            .filter(|r| is_below(&path, &r.cgroup))
            .max_by_key(|r| r.cgroup.len())
            .map(|r| &r.container)
    }
}

/// A container found in a runtime's state directory at start.
#[derive(Debug, Clone)]
pub struct Found {
    pub state: HookState,
}

/// Where runc keeps its containers' state: `/run/runc` (podman and CRI-O
/// as root, plain runc) and `/run/containerd/runc/<namespace>` (containerd).
pub const RUNC_ROOTS: &[&str] = &["/run/runc", "/run/containerd/runc/*"];

/// The running containers runc's state directories know: each
/// `<root>/<id>/state.json` whose init process is alive, as hook state (its
/// bundle found through the `bundle=` label runc records).
pub fn discover(roots: &[&str]) -> Vec<Found> {
    let mut dirs = Vec::new();
    for root in roots {
        match root.strip_suffix("/*") {
            Some(parent) => {
                if let Ok(rd) = std::fs::read_dir(parent) {
                    dirs.extend(rd.flatten().map(|e| e.path()));
                }
            }
            None => dirs.push(PathBuf::from(root)),
        }
    }
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in rd.flatten() {
            let Ok(bytes) = std::fs::read(entry.path().join("state.json")) else {
                continue;
            };
            if let Some(state) = runc_state(&bytes) {
                out.push(Found { state });
            }
        }
    }
    out
}

/// A runc `state.json` as hook state, if its init process still runs.
pub fn runc_state(bytes: &[u8]) -> Option<HookState> {
    #[derive(Deserialize)]
    struct RuncConfig {
        #[serde(default)]
        labels: Vec<String>,
    }
    #[derive(Deserialize)]
    struct RuncState {
        id: String,
        init_process_pid: i32,
        config: RuncConfig,
    }
    let s: RuncState = serde_json::from_slice(bytes).ok()?;
    if s.init_process_pid <= 0 || !Path::new(&format!("/proc/{}", s.init_process_pid)).exists() {
        return None;
    }
    let bundle = s
        .config
        .labels
        .iter()
        .find_map(|l| l.strip_prefix("bundle="))
        .map(PathBuf::from)
        .unwrap_or_default();
    Some(HookState {
        oci_version: String::new(),
        annotations: read_bundle_annotations(&bundle),
        id: s.id,
        status: "running".to_owned(),
        pid: Some(s.init_process_pid),
        bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str, ns: &[&str]) -> Env {
        Env {
            name: name.to_owned(),
            cgroups: vec![],
            cidrs: vec![],
            on_agent_loss: crate::policy::OnLoss::Keep,
            agent_loss_timeout: std::time::Duration::from_secs(30),
            k8s_namespaces: ns.iter().map(|s| (*s).to_owned()).collect(),
            probes: vec![],
            interfaces: vec![],
            lines: Default::default(),
        }
    }

    #[test]
    fn hook_state_parses_and_claims() {
        let state: HookState = serde_json::from_str(
            r#"{"ociVersion":"1.0.2-dev","id":"abc","status":"creating","pid":692,
                "bundle":"/nonexistent/userdata","extra":1,
                "annotations":{"envguard.env":"dev","io.kubernetes.pod.namespace":"prod-x"}}"#,
        )
        .unwrap();
        assert_eq!(state.pid, Some(692));
        assert_eq!(state.id, "abc");
        let a = state.annotations();
        // The pod's namespace beats the env annotation its authors wrote.
        assert_eq!(
            claim(&a, DEFAULT_ENV_KEY, K8S_NAMESPACE_KEY),
            Some(Claim::K8sNamespace("prod-x".into()))
        );
        assert_eq!(
            claim(&a, DEFAULT_ENV_KEY, "no.such/namespace-key"),
            Some(Claim::Env("dev".into()))
        );
        assert_eq!(
            claim(&BTreeMap::new(), DEFAULT_ENV_KEY, K8S_NAMESPACE_KEY),
            None
        );
        let blank = BTreeMap::from([(DEFAULT_ENV_KEY.to_owned(), " ".to_owned())]);
        assert_eq!(claim(&blank, DEFAULT_ENV_KEY, K8S_NAMESPACE_KEY), None);
        // A state without annotations or pid (poststop) still parses.
        let bare: HookState = serde_json::from_str(r#"{"ociVersion":"1.0.2","id":"x"}"#).unwrap();
        assert_eq!((bare.pid, bare.annotations().len()), (None, 0));
    }

    #[test]
    fn bundle_annotations_fill_in() {
        let dir = std::env::temp_dir().join(format!("envguard-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"envguard.env":"prod","a":"bundle"}}"#,
        )
        .unwrap();
        let state = HookState {
            oci_version: String::new(),
            id: "c".into(),
            status: String::new(),
            pid: None,
            bundle: dir.clone(),
            annotations: BTreeMap::from([("a".to_owned(), "state".to_owned())]),
        };
        let a = state.annotations();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(a["envguard.env"], "prod");
        assert_eq!(a["a"], "state");
    }

    #[test]
    fn namespaces_map_exact_then_longest_prefix() {
        let envs = [
            env("prod", &["prod", "prod-*"]),
            env("eu", &["prod-eu-*"]),
            env("any", &["*"]),
        ];
        assert_eq!(env_of_namespace(&envs, "prod"), Some("prod"));
        assert_eq!(env_of_namespace(&envs, "prod-x"), Some("prod"));
        assert_eq!(env_of_namespace(&envs, "prod-eu-1"), Some("eu"));
        assert_eq!(env_of_namespace(&envs, "kube-system"), Some("any"));
        assert_eq!(env_of_namespace(&envs[..2], "dev"), None);
        for ok in ["prod", "prod-*", "*", "a1-b"] {
            assert!(check_namespace_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Prod", "pr*od", "a_b", "**"] {
            assert!(check_namespace_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroup_lines_and_names() {
        let text = "9:name=systemd:/x/libpod-1\n1:cpu:/x/libpod-1\n0::/x/libpod-1\n";
        assert_eq!(unified_cgroup(text).as_deref(), Some("/x/libpod-1"));
        assert_eq!(unified_cgroup("1:cpu:/a\n"), None);
        let k8s = BTreeMap::from([
            ("io.kubernetes.pod.name".to_owned(), "api-7d9".to_owned()),
            ("io.kubernetes.container.name".to_owned(), "app".to_owned()),
        ]);
        assert_eq!(
            container_name("0123456789abcdef", Path::new(""), &k8s),
            "api-7d9/app"
        );
        assert_eq!(
            container_name("0123456789abcdef", Path::new(""), &BTreeMap::new()),
            "0123456789ab"
        );
        let dir = std::env::temp_dir().join(format!("envguard-storage-{}", std::process::id()));
        let bundle = dir.join("cid/userdata");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(
            dir.join("containers.json"),
            r#"[{"id":"other","names":["x"]},{"id":"cid","names":["db"],"image":"i"}]"#,
        )
        .unwrap();
        let name = container_name("cid", &bundle, &BTreeMap::new());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(name, "db");
    }

    #[test]
    fn runc_state_needs_a_live_init() {
        let me = std::process::id();
        let live = format!(
            r#"{{"id":"c1","init_process_pid":{me},"config":{{"labels":["bundle=/nonexistent/b"]}}}}"#
        );
        let s = runc_state(live.as_bytes()).unwrap();
        assert_eq!((s.id.as_str(), s.pid), ("c1", Some(me as i32)));
        assert_eq!(s.bundle, Path::new("/nonexistent/b"));
        let dead = r#"{"id":"c2","init_process_pid":0,"config":{"labels":[]}}"#;
        assert!(runc_state(dead.as_bytes()).is_none());
        assert!(runc_state(b"not json").is_none());
    }
}
