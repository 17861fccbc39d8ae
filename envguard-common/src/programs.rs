//! Program names (the kernel functions' names), shared so that userspace never
//! repeats a literal.

pub const CONNECT4: &str = "connect4";
pub const CONNECT6: &str = "connect6";
pub const SENDMSG4: &str = "sendmsg4";
pub const SENDMSG6: &str = "sendmsg6";
pub const POST_BIND4: &str = "post_bind4";
pub const POST_BIND6: &str = "post_bind6";
pub const SKB_INGRESS: &str = "skb_ingress";
pub const SKB_EGRESS: &str = "skb_egress";
/// Raw tracepoint `cgroup_mkdir`: records a listed cgroup's id as it is created.
pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
