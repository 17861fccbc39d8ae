//! The only part of envguard that touches the kernel: loads the programs,
//! writes the compiled policy into the maps, attaches to a cgroup.
use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSkbAttachType, ProgramError},
};
use envguard_common::{
    config::{Config, Counter},
    flow::{BoundKey, BoundValue},
    maps,
    policy::{EnvValue, RuleKey, RuleValue},
    programs,
};

use crate::{
    error::{Error, Result},
    policy::compile::Compiled,
    sys,
};

/// The kernel object, built by build.rs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envguard-ebpf"));

/// Programs in attach order: socket bookkeeping and packet hooks first, the
/// hooks that refuse calls last, so that by the time a connect() is judged,
/// every later packet of it will be too.
const PROGRAMS: &[&str] = &[
    programs::POST_BIND4,
    programs::POST_BIND6,
    programs::SOCK_RELEASE,
    programs::SKB_INGRESS,
    programs::SKB_EGRESS,
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
];

/// An error with its whole source chain: aya's errors keep the errno there.
fn bpf_err(context: impl Into<String>, e: impl std::error::Error) -> Error {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    bpf_msg(context, message)
}

fn bpf_msg(context: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Bpf {
        context: context.into(),
        message: message.into(),
    }
}

/// Loads the object and every program into the kernel, without attaching.
/// A verifier rejection names the program; its log is included on request.
pub fn load(verifier_log: bool) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        return Err(Error::NoKernelObject);
    }
    sys::raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    if verifier_log {
        loader.verifier_log_level(VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| bpf_err("loading the eBPF object (creating maps)", e))?;
    for &name in PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| bpf_msg(format!("loading {name}"), "program missing from the object"))?;
        let res = match prog {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::CgroupSkb(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            _ => {
                return Err(bpf_msg(
                    format!("loading {name}"),
                    "unexpected program type",
                ));
            }
        };
        res.map_err(|e| load_error(name, e, verifier_log))?;
    }
    Ok(ebpf)
}

fn load_error(name: &str, e: ProgramError, verifier_log: bool) -> Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log: log,
        } => {
            let message = if verifier_log {
                format!("the kernel verifier rejected it ({io_error}):\n{log}")
            } else {
                format!(
                    "the kernel verifier rejected it ({io_error}); run with --verifier-log to see why"
                )
            };
            bpf_msg(format!("loading {name}"), message)
        }
        other => bpf_err(format!("loading {name}"), other),
    }
}

/// Writes a compiled policy into the maps, the configuration last, so that the
/// programs never see a mode or generation before its entries.
pub fn fill_maps(
    ebpf: &mut Ebpf,
    compiled: &Compiled,
    cgroup_ids: &[(u64, u32)],
    generation: u32,
) -> Result<()> {
    {
        let mut m: HashMap<_, u64, EnvValue> = map(ebpf, maps::CGROUP_ENVS)?;
        for &(id, env) in cgroup_ids {
            m.insert(id, EnvValue { env }, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::CGROUP_ENVS), e))?;
        }
    }
    {
        let mut m: LpmTrie<_, [u8; 4], EnvValue> = map(ebpf, maps::CIDR_ENVS_V4)?;
        for &(prefix, addr, env) in &compiled.cidrs_v4 {
            m.insert(&Key::new(prefix, addr), EnvValue { env }, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::CIDR_ENVS_V4), e))?;
        }
    }
    {
        let mut m: LpmTrie<_, [u8; 16], EnvValue> = map(ebpf, maps::CIDR_ENVS_V6)?;
        for &(prefix, addr, env) in &compiled.cidrs_v6 {
            m.insert(&Key::new(prefix, addr), EnvValue { env }, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::CIDR_ENVS_V6), e))?;
        }
    }
    {
        let mut m: LpmTrie<_, RuleKey, RuleValue> = map(ebpf, maps::RULES)?;
        for &(prefix, key, rule) in &compiled.rules {
            m.insert(&Key::new(prefix, key), RuleValue { rule }, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::RULES), e))?;
        }
    }
    set_config(
        ebpf,
        Config::new(
            compiled.mode,
            generation,
            compiled.min_level,
            compiled.max_level,
        ),
    )
}

pub fn set_config(ebpf: &mut Ebpf, config: Config) -> Result<()> {
    let mut m: Array<_, Config> = map(ebpf, maps::CONFIG)?;
    m.set(0, config, 0)
        .map_err(|e| bpf_err(format!("writing {}", maps::CONFIG), e))
}

/// Adds or removes one cgroup of the policy, as it appears or goes away.
pub fn set_cgroup(ebpf: &mut Ebpf, id: u64, env: Option<u32>) -> Result<()> {
    let mut m: HashMap<_, u64, EnvValue> = map(ebpf, maps::CGROUP_ENVS)?;
    match env {
        Some(env) => m.insert(id, EnvValue { env }, 0),
        None => m.remove(&id),
    }
    .map_err(|e| bpf_err(format!("updating {}", maps::CGROUP_ENVS), e))
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

/// Attaches every program to `cgroup` (a directory under the cgroup2 mount).
/// aya attaches through BPF links, which the kernel always treats as
/// multi-attach (and refuses any flag for): whatever else is attached there
/// (systemd's, other tools') stays in force, and a call or packet passes only
/// if every program passes it.
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path) -> Result<()> {
    let dir = File::open(cgroup).map_err(|source| Error::Io {
        context: format!("opening cgroup {}", cgroup.display()),
        source,
    })?;
    for &name in PROGRAMS {
        let context = || format!("attaching {name} to {}", cgroup.display());
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| bpf_msg(context(), "program missing"))?;
        let mode = CgroupAttachMode::Single;
        let res = match prog {
            aya::programs::Program::CgroupSockAddr(p) => p.attach(&dir, mode).map(drop),
            aya::programs::Program::CgroupSock(p) => p.attach(&dir, mode).map(drop),
            aya::programs::Program::CgroupSkb(p) => {
                let ty = if name == programs::SKB_INGRESS {
                    CgroupSkbAttachType::Ingress
                } else {
                    CgroupSkbAttachType::Egress
                };
                p.attach(&dir, ty, mode).map(drop)
            }
            _ => return Err(bpf_msg(context(), "unexpected program type")),
        };
        res.map_err(|e| bpf_err(context(), e))?;
    }
    Ok(())
}

/// Records local sockets bound before the programs were attached.
pub fn record_bound(ebpf: &mut Ebpf, sockets: &[(BoundKey, BoundValue)]) -> Result<()> {
    {
        let mut m: HashMap<_, BoundKey, BoundValue> = map(ebpf, maps::BOUND_SOCKETS)?;
        for (k, v) in sockets {
            m.insert(k, v, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::BOUND_SOCKETS), e))?;
        }
    }
    let mut m: HashMap<_, u64, BoundKey> = map(ebpf, maps::BOUND_BY_COOKIE)?;
    for (k, v) in sockets {
        m.insert(v.cookie, k, 0)
            .map_err(|e| bpf_err(format!("writing {}", maps::BOUND_BY_COOKIE), e))?;
    }
    Ok(())
}

pub fn attached_hooks() -> &'static [&'static str] {
    PROGRAMS
}

pub fn take_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>> {
    let m = ebpf
        .take_map(maps::EVENTS)
        .ok_or_else(|| bpf_msg(format!("opening map {}", maps::EVENTS), "missing"))?;
    RingBuf::try_from(m).map_err(|e| bpf_err(format!("opening map {}", maps::EVENTS), e))
}

/// Sum over CPUs of one kernel counter.
pub fn counter(ebpf: &mut Ebpf, which: Counter) -> Result<u64> {
    let m: PerCpuArray<_, u64> = map(ebpf, maps::COUNTERS)?;
    let values = m
        .get(&(which as u32), 0)
        .map_err(|e| bpf_err(format!("reading {}", maps::COUNTERS), e))?;
    Ok(values.iter().sum())
}
