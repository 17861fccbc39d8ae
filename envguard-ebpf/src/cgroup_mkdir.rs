//! raw_tracepoint/cgroup_mkdir: a listed cgroup is in its env from the moment
//! it exists. The tracepoint fires inside mkdir(2), after the cgroup is made
//! and before the call returns, so no task can be in it yet; the program
//! records the new cgroup's id in `CGROUP_ENVS` of every slot whose policy
//! lists its path. Without it a listed cgroup created (or recreated) while the
//! agent runs would be `host` until the agent's next poll.
//!
//! Arguments (`TP_PROTO(struct cgroup *cgrp, const char *path)`): the path is
//! the one the kernel formats for the event, from the hierarchy's root. The
//! id and the hierarchy are read at offsets the agent found in the kernel's
//! BTF (`MKDIR_OFFSETS`); a cgroup of a v1 hierarchy (hierarchy id ≠ 0, the
//! same paths exist there on hybrid hosts) is ignored.
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel_str},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use envguard_common::policy::{CgroupPath, EnvValue, MAX_CGROUP_PATH};

use crate::maps::{
    CGROUP_ENVS_A, CGROUP_ENVS_B, LISTED_CGROUPS_A, LISTED_CGROUPS_B, MKDIR_OFFSETS,
};

// A tracing program's return value is ignored; nothing here can fail the mkdir.
#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: RawTracePointContext) -> i32 {
    let _ = try_cgroup_mkdir(&ctx);
    0
}

#[inline(always)]
fn try_cgroup_mkdir(ctx: &RawTracePointContext) -> Result<(), i32> {
    let off = *MKDIR_OFFSETS.get(0).ok_or(0)?;
    if off.enabled == 0 {
        return Ok(());
    }
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let root: *const u8 =
        unsafe { bpf_probe_read_kernel(cgrp.add(off.cgroup_root as usize).cast::<*const u8>()) }?;
    let hierarchy: i32 =
        unsafe { bpf_probe_read_kernel(root.add(off.root_hierarchy_id as usize).cast::<i32>()) }?;
    if hierarchy != 0 {
        return Ok(());
    }
    // Zero-padded, as the agent writes the keys.
    let mut key = CgroupPath {
        bytes: [0; MAX_CGROUP_PATH],
    };
    let len = unsafe {
        bpf_probe_read_kernel_str(
            key.bytes.as_mut_ptr().cast(),
            MAX_CGROUP_PATH as u32,
            path.cast(),
        )
    };
    // `len` counts the NUL; a full buffer may be a path cut short, which must
    // not match a listed prefix of it (the agent lists none that long).
    if len <= 0 || len >= MAX_CGROUP_PATH as i64 {
        return Ok(());
    }
    let in_a = unsafe { LISTED_CGROUPS_A.get(&key) }.copied();
    let in_b = unsafe { LISTED_CGROUPS_B.get(&key) }.copied();
    if in_a.is_none() && in_b.is_none() {
        return Ok(());
    }
    let kn: *const u8 =
        unsafe { bpf_probe_read_kernel(cgrp.add(off.cgroup_kn as usize).cast::<*const u8>()) }?;
    let id: u64 = unsafe { bpf_probe_read_kernel(kn.add(off.kn_id as usize).cast::<u64>()) }?;
    // Each slot by its own policy, so the one in force and the one being
    // written both have it.
    if let Some(v) = in_a {
        record(true, id, &v)?;
    }
    if let Some(v) = in_b {
        record(false, id, &v)?;
    }
    Ok(())
}

#[inline(always)]
fn record(slot_a: bool, id: u64, v: &EnvValue) -> Result<(), i32> {
    if slot_a {
        CGROUP_ENVS_A.insert(&id, v, 0)
    } else {
        CGROUP_ENVS_B.insert(&id, v, 0)
    }
}
