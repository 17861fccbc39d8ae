//! Types shared by the kernel programs and the userspace agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields, zeroed by the constructors) and has its size pinned by a
//! compile-time assertion, so the two sides can never disagree on a layout.
#![no_std]

pub mod config;
pub mod container;
pub mod decide;
pub mod event;
pub mod flow;
pub mod maps;
pub mod policy;
pub mod programs;

#[cfg(feature = "user")]
mod pod {
    use crate::{config, container, event, flow, policy};

    // SAFETY: all of these are `#[repr(C)]`, plain integers and byte arrays, with
    // every padding byte spelled out, so any bit pattern is a valid value.
    unsafe impl aya::Pod for config::Config {}
    unsafe impl aya::Pod for config::PolicyMeta {}
    unsafe impl aya::Pod for config::EnvLoss {}
    unsafe impl aya::Pod for config::AgentState {}
    unsafe impl aya::Pod for config::CgroupOffsets {}
    unsafe impl aya::Pod for policy::CgroupPath {}
    unsafe impl aya::Pod for policy::EnvValue {}
    unsafe impl aya::Pod for policy::RuleKey {}
    unsafe impl aya::Pod for policy::RuleValue {}
    unsafe impl aya::Pod for policy::PairKey {}
    unsafe impl aya::Pod for policy::EnvName {}
    unsafe impl aya::Pod for event::DecisionKey {}
    unsafe impl aya::Pod for event::DedupKey {}
    unsafe impl aya::Pod for event::DedupValue {}
    unsafe impl aya::Pod for flow::FlowKey {}
    unsafe impl aya::Pod for flow::FlowVerdict {}
    unsafe impl aya::Pod for flow::DecideKey {}
    unsafe impl aya::Pod for flow::DecideValue {}
    unsafe impl aya::Pod for flow::TupleKey {}
    unsafe impl aya::Pod for flow::SockEnv {}
    unsafe impl aya::Pod for flow::TcFlowKey {}
    unsafe impl aya::Pod for policy::IfaceEnv {}
    unsafe impl aya::Pod for event::ViolationEvent {}
    unsafe impl aya::Pod for container::Registration {}
}
