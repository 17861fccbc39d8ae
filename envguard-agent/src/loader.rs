//! The only part of envguard that touches the kernel: loads the programs, pins
//! them under a bpffs directory, writes the compiled policy into the maps and
//! attaches to a cgroup — or adopts what an earlier agent left pinned.
//!
//! Pin layout: `<pin root>/layout-<fingerprint>/maps/<MAP>` and
//! `…/links/<program>`. The fingerprint changes with the maps' layout, so an
//! agent never adopts maps it would misread.
//!
//! (About 600 lines, kept whole on purpose: opening and adopting the pinned
//! state, writing a policy into both slots and the runtime map accessors all
//! work on the same `Ebpf` and slot bookkeeping; attaching lives in `attach`.)
//!
//! Here: opening or adopting the object, the policy into the maps, the
//! runtime reads and writes; attaching, pinning and detaching in `attach`.
use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{
        Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage,
        lpm_trie::Key,
    },
};
use envguard_common::{
    config::{AgentState, Config, Counter, EnvLoss, PolicyMeta},
    container::Registration,
    event::{DecisionKey, DedupKey, DedupValue},
    flow::SockEnv,
    maps,
    policy::{CgroupPath, EnvName, EnvValue, MAX_ENV_NAME, PairKey, RuleValue},
    programs,
};

use crate::{
    error::{Error, Result},
    pinroot,
    policy::compile::Compiled,
    sys,
};

mod attach;
mod clsact;
mod tc;

pub use attach::detach;
pub use tc::{TcInterface, TcMode};

/// The kernel object, built by build.rs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envguard-ebpf"));

/// The kernel object's bytes (for tests that read it).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The cgroup hooks in attach order, from the hook table
/// (`envguard_common::programs::HOOKS`).
pub const PROGRAMS: &[&str] = &programs::CGROUP_PROGRAMS;

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/envguard";

/// Knobs of the kernel side that change the maps' layout.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub pin_root: PathBuf,
    pub verifier_log: bool,
    /// Size of the event ring buffer in bytes (a power of two, ≥ 4096).
    pub ringbuf_bytes: Option<u32>,
    /// Capacity of the verdict cache.
    pub flow_cache_entries: Option<u32>,
    /// Repeats of a violation within this long of its last record are counted,
    /// not sent (zero sends every one).
    pub dedup_interval: std::time::Duration,
    /// The tc hooks as clsact + cls_bpf filters even where the kernel has
    /// tcx (the fallback of kernels before 6.6).
    pub force_clsact: bool,
}

/// An error's message with its whole source chain: aya's errors keep the
/// errno there.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn bpf_err(context: impl Into<String>, e: impl std::error::Error) -> Error {
    bpf_msg(context, error_chain(&e))
}

fn bpf_msg(context: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Bpf {
        context: context.into(),
        message: message.into(),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Names the maps' layout: the version and every map's type, key and value
/// size, flags and capacity as the object defines them (with the options'
/// overrides), so maps of another layout are never adopted.
fn layout_name(opts: &Options) -> Result<String> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| bpf_err("parsing the eBPF object", e))?;
    let mut defs: Vec<(&String, &aya_obj::Map)> = obj.maps.iter().collect();
    defs.sort_by_key(|(name, _)| *name);
    let mut bytes = maps::LAYOUT_VERSION.to_le_bytes().to_vec();
    for (name, m) in defs {
        let max_entries = match name.as_str() {
            maps::EVENTS => opts.ringbuf_bytes.unwrap_or(m.max_entries()),
            maps::FLOW_VERDICTS => opts.flow_cache_entries.unwrap_or(m.max_entries()),
            _ => m.max_entries(),
        };
        bytes.extend(name.as_bytes());
        for n in [
            m.map_type(),
            m.key_size(),
            m.value_size(),
            m.map_flags(),
            max_entries,
        ] {
            bytes.extend(n.to_le_bytes());
        }
    }
    Ok(format!("layout-{:016x}", sys::fnv1a(&[&bytes])))
}

/// The layout fingerprint of this build's kernel object with the default
/// options (`envguard --version`); `None` without kernel programs.
pub fn default_layout() -> Option<String> {
    layout_name(&Options::default()).ok()
}

/// The kernel side of a running agent: the object (maps and programs), the
/// lock on the pin root, and what an earlier agent left there.
pub struct Kernel {
    ebpf: Ebpf,
    layout_dir: PathBuf,
    pin_root: PathBuf,
    verifier_log: bool,
    /// Held for the agent's lifetime: one agent per pin root.
    _lock: File,
    /// The previous agent's state, when its maps were adopted.
    pub previous: Option<AgentState>,
    object_hash: u64,
    cgroup_id: u64,
    config: Config,
    /// Policies loaded by this agent (the metrics' revision).
    loads: u64,
    /// Lost events reported so far, by this agent and its predecessors.
    pub lost_reported: u64,
    dedup_interval_ns: u64,
    /// `AgentState::events_wakeup_bytes`.
    events_wakeup_bytes: u64,
    /// Interfaces (and direction: `true` ingress) this agent attached or
    /// adopted, and how: the poll leaves them alone.
    tc_attached: std::collections::BTreeMap<(u32, bool), TcMode>,
    force_clsact: bool,
    /// The maps pinned under the pin root when this agent opened it, in
    /// every layout: whose programs' clsact filters are this pin root's.
    own_maps: std::collections::BTreeSet<u32>,
}

impl Kernel {
    /// Mounts bpffs if needed, locks the pin root and loads the object, reusing
    /// the maps an earlier agent of the same layout pinned. Attaches nothing.
    pub fn open(opts: &Options) -> Result<Kernel> {
        if OBJECT.is_empty() {
            return Err(Error::NoKernelObject);
        }
        sys::raise_memlock_limit();
        sys::ensure_bpffs(&opts.pin_root)?;
        let lock = sys::lock_dir(&opts.pin_root, "starting the agent")?;
        let layout_dir = opts.pin_root.join(layout_name(opts)?);
        let maps_dir = layout_dir.join("maps");
        for dir in [&maps_dir, &layout_dir.join("links")] {
            pinroot::create_dir(&opts.pin_root, dir, "starting the agent")?;
        }
        let adopting = maps_dir.join(maps::CONFIG).exists();

        let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|&m| (m, maps_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(n) = opts.ringbuf_bytes {
            loader.map_max_entries(maps::EVENTS, n);
        }
        if let Some(n) = opts.flow_cache_entries {
            loader.map_max_entries(maps::FLOW_VERDICTS, n);
        }
        if opts.verifier_log {
            loader.verifier_log_level(VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| {
            bpf_err(
                format!(
                    "loading the eBPF object (maps pinned in {})",
                    maps_dir.display()
                ),
                e,
            )
        })?;

        let state: AgentState = array_get(&mut ebpf, maps::AGENT_STATE)?;
        let config: Config = array_get(&mut ebpf, maps::CONFIG)?;
        Ok(Kernel {
            ebpf,
            layout_dir,
            pin_root: opts.pin_root.clone(),
            verifier_log: opts.verifier_log,
            _lock: lock,
            previous: (adopting && state.object_hash != 0).then_some(state),
            object_hash: sys::fnv1a(&[OBJECT]),
            cgroup_id: 0,
            config,
            loads: 0,
            lost_reported: state.lost_reported,
            dedup_interval_ns: opts.dedup_interval.as_nanos() as u64,
            events_wakeup_bytes: envguard_common::config::events_wakeup_bytes(u64::from(
                opts.ringbuf_bytes.unwrap_or(maps::EVENTS_BYTES),
            )),
            tc_attached: Default::default(),
            force_clsact: opts.force_clsact,
            own_maps: clsact::own_maps(&opts.pin_root),
        })
    }

    pub fn adopted(&self) -> bool {
        self.previous.is_some()
    }

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// The policy generation in force (bumped by every load, and by every
    /// runtime change of the cgroups' envs).
    pub fn generation(&self) -> u32 {
        self.config.generation
    }

    /// Policies loaded by this agent: 1 after start, +1 per reload.
    pub fn policy_loads(&self) -> u64 {
        self.loads
    }

    /// Writes a compiled policy into the inactive slot of the policy maps, then
    /// makes it active with one update of CONFIG: no program ever sees a
    /// half-written policy, and cached verdicts of the old one go stale.
    ///
    /// `pair_modes` are the pairs' modes to install (the policy's, with the
    /// operator's runtime changes on top); `mode` the global one.
    ///
    /// `cgroup_ids` finds the listed cgroups' ids (path → id → env). It is
    /// called once the slot's listed paths are in (so the `cgroup_mkdir` watch
    /// records a cgroup created from then on in this slot) and its old ids
    /// cleared (so none the watch records is lost): a listed cgroup created
    /// during the load is in the slot either way. What the watch may still
    /// record from the old paths while they are replaced (a program that read
    /// an old path before the clear and writes after it) is removed by the
    /// daemon's next poll (`cgroups`), within a second.
    pub fn apply_policy(
        &mut self,
        compiled: &Compiled,
        cgroup_ids: impl FnOnce() -> Vec<(u64, u32)>,
        mode: u32,
        pair_modes: &[(PairKey, u32)],
        endpoints: impl FnOnce(&std::collections::HashMap<u64, u32>) -> Vec<(IpAddr, u32)>,
    ) -> Result<()> {
        let next = Config::new(self.config.generation.wrapping_add(1), mode);
        let slot = next.slot() as usize;
        let ebpf = &mut self.ebpf;
        {
            let name = maps::LISTED_CGROUPS[slot];
            let mut m: HashMap<_, CgroupPath, EnvValue> = map(ebpf, name)?;
            clear_hash(&mut m, name)?;
            for (path, env) in &compiled.cgroups {
                match CgroupPath::new(path) {
                    Some(k) => m
                        .insert(k, EnvValue { env: *env }, 0)
                        .map_err(|e| bpf_err(format!("writing {name}"), e))?,
                    None => log::warn!(
                        "cgroup {path} is too long for the kernel's cgroup_mkdir watch; \
                         when it is created, it is in its env from the agent's next poll (≤ 1 s)"
                    ),
                }
            }
        }
        {
            let mut m: HashMap<_, u64, EnvValue> = map(ebpf, maps::CGROUP_ENVS[slot])?;
            clear_hash(&mut m, maps::CGROUP_ENVS[slot])?;
            for (id, env) in cgroup_ids() {
                m.insert(id, EnvValue { env }, 0)
                    .map_err(|e| bpf_err(format!("writing {}", maps::CGROUP_ENVS[slot]), e))?;
            }
        }
        // Endpoints as the new slot's cgroups make them, before the slot is
        // in force: no flow to a container's address is judged by CIDR in
        // between.
        {
            let cgroups: std::collections::HashMap<u64, u32> = {
                let m: HashMap<_, u64, EnvValue> = map(ebpf, maps::CGROUP_ENVS[slot])?;
                m.iter()
                    .map(|r| r.map(|(id, v)| (id, v.env)))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| bpf_err(format!("reading {}", maps::CGROUP_ENVS[slot]), e))?
            };
            let entries = endpoints(&cgroups);
            fill_hash(
                ebpf,
                maps::ENDPOINTS_V4[slot],
                entries.iter().filter_map(|(a, env)| match a {
                    IpAddr::V4(v4) => Some((v4.octets(), EnvValue { env: *env })),
                    IpAddr::V6(_) => None,
                }),
            )?;
            fill_hash(
                ebpf,
                maps::ENDPOINTS_V6[slot],
                entries.iter().filter_map(|(a, env)| match a {
                    IpAddr::V6(v6) => Some((v6.octets(), EnvValue { env: *env })),
                    IpAddr::V4(_) => None,
                }),
            )?;
        }
        // Host addresses go to the exact-match maps the kernel looks at
        // first, everything shorter to the tries.
        fill_trie(
            ebpf,
            maps::CIDR_ENVS_V4[slot],
            compiled
                .cidrs_v4
                .iter()
                .filter(|&&(p, ..)| p < 32)
                .map(|&(p, a, env)| (Key::new(p, a), EnvValue { env })),
        )?;
        fill_hash(
            ebpf,
            maps::CIDR_HOSTS_V4[slot],
            compiled
                .cidrs_v4
                .iter()
                .filter(|&&(p, ..)| p == 32)
                .map(|&(_, a, env)| (a, EnvValue { env })),
        )?;
        fill_trie(
            ebpf,
            maps::CIDR_ENVS_V6[slot],
            compiled
                .cidrs_v6
                .iter()
                .filter(|&&(p, ..)| p < 128)
                .map(|&(p, a, env)| (Key::new(p, a), EnvValue { env })),
        )?;
        fill_hash(
            ebpf,
            maps::CIDR_HOSTS_V6[slot],
            compiled
                .cidrs_v6
                .iter()
                .filter(|&&(p, ..)| p == 128)
                .map(|&(_, a, env)| (a, EnvValue { env })),
        )?;
        fill_trie(
            ebpf,
            maps::RULES[slot],
            compiled
                .rules
                .iter()
                .map(|&(p, k, rule)| (Key::new(p, k), RuleValue { rule })),
        )?;
        fill_trie(
            ebpf,
            maps::DENY_RULES[slot],
            compiled
                .deny_rules
                .iter()
                .map(|&(p, k, rule)| (Key::new(p, k), RuleValue { rule })),
        )?;
        {
            let mut m: HashMap<_, PairKey, u32> = map(ebpf, maps::PAIR_MODES[slot])?;
            clear_hash(&mut m, maps::PAIR_MODES[slot])?;
            for (k, mode) in pair_modes {
                m.insert(k, mode, 0)
                    .map_err(|e| bpf_err(format!("writing {}", maps::PAIR_MODES[slot]), e))?;
            }
        }
        {
            let mut m: Array<_, EnvLoss> = map(ebpf, maps::ENV_LOSS[slot])?;
            for id in 0..maps::MAX_ENVS {
                let loss = compiled
                    .env_loss
                    .get(id as usize)
                    .copied()
                    .unwrap_or(EnvLoss::new(0, 0));
                m.set(id, loss, 0)
                    .map_err(|e| bpf_err(format!("writing {}", maps::ENV_LOSS[slot]), e))?;
            }
        }
        {
            let mut m: Array<_, PolicyMeta> = map(ebpf, maps::POLICY_META[slot])?;
            m.set(
                0,
                PolicyMeta::new(compiled.min_level, compiled.max_level),
                0,
            )
            .map_err(|e| bpf_err(format!("writing {}", maps::POLICY_META[slot]), e))?;
        }
        tc::fill_slot(ebpf, slot, compiled)?;
        self.set_config(next)?;
        self.loads += 1;
        self.write_env_names(&compiled.env_names)
    }

    /// Makes every cached verdict (and inbound tuple) stale without changing
    /// the slot: for when a cgroup's env changed under the policy in force.
    pub fn invalidate_verdicts(&mut self) -> Result<()> {
        let c = self.config;
        self.set_config(Config::new(c.generation.wrapping_add(2), c.mode))
    }

    /// The cgroups of the policy in force, as the kernel has them (what the
    /// agent wrote, and what the `cgroup_mkdir` watch recorded).
    pub fn cgroups(&mut self) -> Result<std::collections::HashMap<u64, u32>> {
        let name = maps::CGROUP_ENVS[self.config.slot() as usize];
        let m: HashMap<_, u64, EnvValue> = map(&mut self.ebpf, name)?;
        m.iter()
            .map(|r| r.map(|(id, v)| (id, v.env)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bpf_err(format!("reading {name}"), e))
    }

    /// Env names by id, as the policy in force assigned them (empty on a first start).
    pub fn env_names(&mut self) -> Result<Vec<String>> {
        let m: Array<_, EnvName> = map(&mut self.ebpf, maps::ENV_NAMES)?;
        let mut names = Vec::new();
        for id in 0..maps::MAX_ENVS {
            let raw = m
                .get(&id, 0)
                .map_err(|e| bpf_err(format!("reading {}", maps::ENV_NAMES), e))?;
            let len = raw
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(raw.name.len());
            names.push(String::from_utf8_lossy(&raw.name[..len]).into_owned());
        }
        while names.last().is_some_and(String::is_empty) {
            names.pop();
        }
        Ok(names)
    }

    fn write_env_names(&mut self, names: &[String]) -> Result<()> {
        let mut m: Array<_, EnvName> = map(&mut self.ebpf, maps::ENV_NAMES)?;
        for id in 0..maps::MAX_ENVS {
            let mut entry = EnvName {
                name: [0; MAX_ENV_NAME + 1],
            };
            if let Some(n) = names.get(id as usize) {
                let b = n.as_bytes();
                entry.name[..b.len().min(MAX_ENV_NAME)]
                    .copy_from_slice(&b[..b.len().min(MAX_ENV_NAME)]);
            }
            m.set(id, entry, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::ENV_NAMES), e))?;
        }
        Ok(())
    }

    /// Switches the global mode without touching the policy: one map update.
    pub fn set_mode(&mut self, mode: u32) -> Result<()> {
        self.set_config(Config::new(self.config.generation, mode))
    }

    /// Sets (or, with `None`, clears) one pair's mode in the policy in force.
    pub fn set_pair_mode(&mut self, pair: PairKey, mode: Option<u32>) -> Result<()> {
        let name = maps::PAIR_MODES[self.config.slot() as usize];
        let mut m: HashMap<_, PairKey, u32> = map(&mut self.ebpf, name)?;
        match mode {
            Some(mode) => m.insert(pair, mode, 0),
            None => match m.remove(&pair) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        }
        .map_err(|e| bpf_err(format!("updating {name}"), e))
    }

    /// Violations counted instead of sent, per flow: (key, repeats ever summed
    /// over CPUs, earliest window start, latest repeat).
    pub fn dedup(&mut self) -> Result<Vec<(DedupKey, u64, u64, u64)>> {
        let m: PerCpuHashMap<_, DedupKey, DedupValue> = map(&mut self.ebpf, maps::DEDUP)?;
        let mut out = Vec::new();
        for item in m.iter() {
            let (k, values) = item.map_err(|e| bpf_err(format!("reading {}", maps::DEDUP), e))?;
            let total = values.iter().map(|v| v.suppressed).sum();
            let first = values
                .iter()
                .map(|v| v.window_start_ns)
                .filter(|&t| t != 0)
                .min()
                .unwrap_or(0);
            let last = values.iter().map(|v| v.last_ns).max().unwrap_or(0);
            out.push((k, total, first, last));
        }
        Ok(out)
    }

    /// The kernel's decision counters, summed over CPUs.
    pub fn decisions(&mut self) -> Result<Vec<(DecisionKey, u64)>> {
        let m: PerCpuHashMap<_, DecisionKey, u64> = map(&mut self.ebpf, maps::DECISIONS)?;
        let mut out = Vec::new();
        for item in m.iter() {
            let (k, values) =
                item.map_err(|e| bpf_err(format!("reading {}", maps::DECISIONS), e))?;
            out.push((k, values.iter().sum()));
        }
        Ok(out)
    }

    fn set_config(&mut self, config: Config) -> Result<()> {
        let mut m: Array<_, Config> = map(&mut self.ebpf, maps::CONFIG)?;
        m.set(0, config, 0)
            .map_err(|e| bpf_err(format!("writing {}", maps::CONFIG), e))?;
        self.config = config;
        Ok(())
    }

    /// Adds or removes one cgroup of the active policy, as it appears or goes away.
    pub fn set_cgroup(&mut self, id: u64, env: Option<u32>) -> Result<()> {
        let name = maps::CGROUP_ENVS[self.config.slot() as usize];
        let mut m: HashMap<_, u64, EnvValue> = map(&mut self.ebpf, name)?;
        match env {
            Some(env) => m.insert(id, EnvValue { env }, 0),
            None => match m.remove(&id) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        }
        .map_err(|e| bpf_err(format!("updating {name}"), e))
    }

    /// Widens the active slot's cgroup walk to take in `level`: a cgroup
    /// registered at run time may sit deeper (or shallower) than every
    /// listed one.
    pub fn widen_levels(&mut self, level: u32) -> Result<()> {
        let name = maps::POLICY_META[self.config.slot() as usize];
        let mut m: Array<_, PolicyMeta> = map(&mut self.ebpf, name)?;
        let now = m
            .get(&0, 0)
            .map_err(|e| bpf_err(format!("reading {name}"), e))?;
        let wide = widened(now, level);
        if wide != now {
            m.set(0, wide, 0)
                .map_err(|e| bpf_err(format!("writing {name}"), e))?;
        }
        Ok(())
    }

    /// The registered containers the pinned map holds.
    pub fn registrations(&mut self) -> Result<Vec<(u64, Registration)>> {
        let name = maps::REGISTERED_CGROUPS;
        let m: HashMap<_, u64, Registration> = map(&mut self.ebpf, name)?;
        m.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bpf_err(format!("reading {name}"), e))
    }

    /// Records (or, with `None`, forgets) a registered container.
    pub fn set_registration(&mut self, id: u64, r: Option<&Registration>) -> Result<()> {
        let name = maps::REGISTERED_CGROUPS;
        let mut m: HashMap<_, u64, Registration> = map(&mut self.ebpf, name)?;
        match r {
            Some(r) => m.insert(id, r, 0),
            None => match m.remove(&id) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        }
        .map_err(|e| bpf_err(format!("updating {name}"), e))
    }

    /// Adds, changes or removes one container endpoint of the active slot.
    pub fn set_endpoint(&mut self, addr: IpAddr, env: Option<u32>) -> Result<()> {
        let slot = self.config.slot() as usize;
        match addr {
            IpAddr::V4(a) => {
                set_or_remove(&mut self.ebpf, maps::ENDPOINTS_V4[slot], a.octets(), env)
            }
            IpAddr::V6(a) => {
                set_or_remove(&mut self.ebpf, maps::ENDPOINTS_V6[slot], a.octets(), env)
            }
        }
    }

    /// Tells the kernel the agent is alive (the watchdog's input), and records
    /// how many lost events have been reported.
    /// The kernel's id of the `DECISIONS` map: the history tells a map it
    /// sampled before (adopted) from a new one (counters from 0) by it.
    pub fn decisions_map_id(&self) -> Result<u32> {
        match self.ebpf.map(maps::DECISIONS) {
            Some(aya::maps::Map::PerCpuHashMap(data)) => data
                .info()
                .map(|i| i.id())
                .map_err(|e| bpf_err(format!("reading the id of {}", maps::DECISIONS), e)),
            _ => Err(bpf_msg(
                format!("opening map {}", maps::DECISIONS),
                "missing from the object or not a per-CPU hash map",
            )),
        }
    }

    pub fn heartbeat(&mut self) -> Result<()> {
        let state = AgentState {
            heartbeat_ns: sys::boot_ns(),
            object_hash: self.object_hash,
            cgroup_id: self.cgroup_id,
            lost_reported: self.lost_reported,
            dedup_interval_ns: self.dedup_interval_ns,
            events_wakeup_bytes: self.events_wakeup_bytes,
        };
        let mut m: Array<_, AgentState> = map(&mut self.ebpf, maps::AGENT_STATE)?;
        m.set(0, state, 0)
            .map_err(|e| bpf_err(format!("writing {}", maps::AGENT_STATE), e))
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let m = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or_else(|| bpf_msg(format!("opening map {}", maps::EVENTS), "missing"))?;
        RingBuf::try_from(m).map_err(|e| bpf_err(format!("opening map {}", maps::EVENTS), e))
    }

    /// Sum over CPUs of one kernel counter.
    pub fn counter(&mut self, which: Counter) -> Result<u64> {
        let m: PerCpuArray<_, u64> = map(&mut self.ebpf, maps::COUNTERS)?;
        let values = m
            .get(&(which as u32), 0)
            .map_err(|e| bpf_err(format!("reading {}", maps::COUNTERS), e))?;
        Ok(values.iter().sum())
    }

    /// A socket's env as the kernel keeps it on the socket, if it has one.
    pub fn sock_env(&mut self, socket: &impl std::os::fd::AsRawFd) -> Option<SockEnv> {
        let m: SkStorage<_, SockEnv> = map(&mut self.ebpf, maps::SOCK_ENVS).ok()?;
        m.get(socket, 0).ok()
    }

    /// Sets a socket's env (the agent's word on who holds it).
    pub fn set_sock_env(
        &mut self,
        socket: &impl std::os::fd::AsRawFd,
        value: &SockEnv,
    ) -> Result<()> {
        let mut m: SkStorage<_, SockEnv> = map(&mut self.ebpf, maps::SOCK_ENVS)?;
        m.insert(socket, value, 0)
            .map_err(|e| bpf_err(format!("writing {}", maps::SOCK_ENVS), e))
    }
}

/// `meta` with `level` inside its walk; an empty walk (min above max)
/// becomes that one level.
pub fn widened(meta: PolicyMeta, level: u32) -> PolicyMeta {
    if meta.min_level > meta.max_level {
        PolicyMeta::new(level, level)
    } else {
        PolicyMeta::new(meta.min_level.min(level), meta.max_level.max(level))
    }
}

fn map<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map>,
    T::Error: std::error::Error,
{
    let m = ebpf
        .map_mut(name)
        .ok_or_else(|| bpf_msg(format!("opening map {name}"), "missing from the object"))?;
    T::try_from(m).map_err(|e| bpf_err(format!("opening map {name}"), e))
}

fn set_or_remove<K: aya::Pod>(ebpf: &mut Ebpf, name: &str, key: K, env: Option<u32>) -> Result<()> {
    let mut m: HashMap<_, K, EnvValue> = map(ebpf, name)?;
    match env {
        Some(env) => m.insert(key, EnvValue { env }, 0),
        None => match m.remove(&key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        },
    }
    .map_err(|e| bpf_err(format!("updating {name}"), e))
}

fn array_get<T: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let m: Array<_, T> = map(ebpf, name)?;
    m.get(&0, 0)
        .map_err(|e| bpf_err(format!("reading {name}"), e))
}

fn clear_hash<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<&mut MapData, K, V>,
    name: &str,
) -> Result<()> {
    let keys: Vec<K> = m.keys().filter_map(std::result::Result::ok).collect();
    for k in keys {
        m.remove(&k)
            .map_err(|e| bpf_err(format!("clearing {name}"), e))?;
    }
    Ok(())
}

/// Empties a hash map, then fills it.
fn fill_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    entries: impl Iterator<Item = (K, V)>,
) -> Result<()> {
    let mut m: HashMap<_, K, V> = map(ebpf, name)?;
    clear_hash(&mut m, name)?;
    for (k, v) in entries {
        m.insert(k, v, 0)
            .map_err(|e| bpf_err(format!("writing {name}"), e))?;
    }
    Ok(())
}

/// Empties an LPM trie, then fills it.
fn fill_trie<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    entries: impl Iterator<Item = (Key<K>, V)>,
) -> Result<()> {
    let mut m: LpmTrie<_, K, V> = map(ebpf, name)?;
    let keys: Vec<Key<K>> = m.keys().filter_map(std::result::Result::ok).collect();
    for k in keys {
        m.remove(&k)
            .map_err(|e| bpf_err(format!("clearing {name}"), e))?;
    }
    for (k, v) in entries {
        m.insert(&k, v, 0)
            .map_err(|e| bpf_err(format!("writing {name}"), e))?;
    }
    Ok(())
}
