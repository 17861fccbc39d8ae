//! Violation records into the ring buffer.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated},
};
use envguard_common::{
    config::{Counter, MODE_ENFORCE},
    event::{
        DIRECTION_EGRESS, DedupKey, DedupValue, VERDICT_AUDITED, VERDICT_DENIED, ViolationEvent,
    },
};

use crate::{
    classify::{Decision, Side, count},
    maps::{AGENT_STATE, DEDUP, EVENTS},
};

/// Reserves a record, zeroes it, lets `fill` write the flow's fields, stamps the
/// common ones and submits it. The record is written in place: building it on
/// the 512-byte BPF stack first would not fit beside the callers' state.
/// A full ring buffer is counted, never silent.
///
/// A repeat of `dedup`'s flow within the agent's dedup interval is only
/// counted; the agent reports the count as a rollup.
#[inline(always)]
pub fn emit(mode: u32, in_task: bool, dedup: &DedupKey, fill: impl FnOnce(&mut ViolationEvent)) {
    if repeated(dedup) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<ViolationEvent>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: the reservation is ours and sized for one record; zeroing it first
    // makes every field initialised before a reference is taken.
    let ev = unsafe {
        core::ptr::write_bytes(slot, 0, 1);
        &mut *slot
    };
    ev.boot_ns = unsafe { generated::bpf_ktime_get_boot_ns() };
    ev.mode = mode as u8;
    ev.verdict = if mode == MODE_ENFORCE {
        VERDICT_DENIED
    } else {
        VERDICT_AUDITED
    };
    ev.uid = u32::MAX;
    if in_task {
        ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        ev.uid = bpf_get_current_uid_gid() as u32;
        unsafe { generated::bpf_get_current_comm((&raw mut ev.comm).cast(), 16) };
    }
    fill(ev);
    // The agent is woken once a batch is pending, not for every record (a
    // wake-up per record was most of its CPU in a flood); it also drains
    // the ring on a short timer, which bounds how long a lone record waits.
    // Until an agent has said how much a batch is, the kernel decides.
    let batch = match AGENT_STATE.get(0) {
        Some(s) => s.events_wakeup_bytes,
        None => 0,
    };
    let flags = if batch == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= batch {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    entry.submit(flags);
}

/// Whether this violation repeats one reported less than the dedup interval
/// ago; if so it is counted. Otherwise the key's window restarts now.
#[inline(always)]
fn repeated(key: &DedupKey) -> bool {
    let interval = match AGENT_STATE.get(0) {
        Some(s) => s.dedup_interval_ns,
        None => 0,
    };
    if interval == 0 {
        return false;
    }
    let now = unsafe { generated::bpf_ktime_get_boot_ns() };
    if let Some(v) = DEDUP.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a map value, live for this program run
        // and written by no one else meanwhile.
        let v = unsafe { &mut *v };
        if now.saturating_sub(v.window_start_ns) < interval {
            v.suppressed += 1;
            v.last_ns = now;
            return true;
        }
        v.window_start_ns = now;
        v.last_ns = now;
        return false;
    }
    let fresh = DedupValue {
        window_start_ns: now,
        last_ns: now,
        suppressed: 0,
    };
    let _ = DEDUP.insert(key, &fresh, 0);
    false
}

/// Writes the two sides into source and destination according to the direction:
/// for egress the local side is the source, for ingress the destination.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn set_sides(
    ev: &mut ViolationEvent,
    direction: u8,
    local: &Side,
    local_addr: &[u8; 16],
    local_port: u16,
    remote: &Side,
    remote_addr: &[u8; 16],
    remote_port: u16,
    decision: &Decision,
) {
    ev.direction = direction;
    ev.peer_cgroup_id = remote.cgroup_id;
    ev.rule = decision.rule;
    if direction == DIRECTION_EGRESS {
        ev.src_addr = *local_addr;
        ev.src_port = local_port;
        ev.src_env = local.env;
        ev.src_env_from = local.from;
        ev.dst_addr = *remote_addr;
        ev.dst_port = remote_port;
        ev.dst_env = remote.env;
        ev.dst_env_from = remote.from;
    } else {
        ev.src_addr = *remote_addr;
        ev.src_port = remote_port;
        ev.src_env = remote.env;
        ev.src_env_from = remote.from;
        ev.dst_addr = *local_addr;
        ev.dst_port = local_port;
        ev.dst_env = local.env;
        ev.dst_env_from = local.from;
    }
}
