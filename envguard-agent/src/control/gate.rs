//! Admission to the control socket: how many connections and `events`
//! subscriptions it serves at once, per user, and what it refused.
use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};

/// How many connections and event subscriptions the control socket serves at
/// once. Root has a bound of its own that no other user's connections count
/// against, so members of `--control-group` cannot crowd root out (with
/// `events` subscriptions or idle connections); other users share one bound
/// and each has a smaller one of their own. A connection over a bound gets
/// one JSON error line saying which, and is closed; every refusal is counted
/// (`status`, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Connections from uid 0.
    pub root: usize,
    /// Connections from all other users together.
    pub others: usize,
    /// Connections from one user other than root.
    pub per_uid: usize,
    /// `events` subscriptions from all users other than root together.
    pub subscribers: usize,
    /// `events` subscriptions from one user other than root.
    pub subscribers_per_uid: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            root: 1024,
            others: 1024,
            per_uid: 64,
            subscribers: 256,
            subscribers_per_uid: 16,
        }
    }
}

/// Why a connection was refused: a `Limits` field's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    Root,
    Others,
    PerUid,
    Subscribers,
    SubscribersPerUid,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Root,
        Refusal::Others,
        Refusal::PerUid,
        Refusal::Subscribers,
        Refusal::SubscribersPerUid,
    ];

    /// The label in `status` and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Root => "root",
            Refusal::Others => "others",
            Refusal::PerUid => "per_uid",
            Refusal::Subscribers => "subscribers",
            Refusal::SubscribersPerUid => "subscribers_per_uid",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    root: usize,
    others: usize,
    per_uid: HashMap<u32, usize>,
    subscribers: usize,
    subscribers_per_uid: HashMap<u32, usize>,
    refused: [u64; Refusal::ALL.len()],
}

/// Admission to the control socket: counts what is open, per user, and what
/// was refused. Shared by the accept loop, the connections and `status`.
#[derive(Debug, Default)]
pub struct Gate {
    limits: Limits,
    counts: std::sync::Mutex<Counts>,
}

/// A connection's place, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    pub(super) gate: Arc<Gate>,
    uid: u32,
    subscriber: bool,
}

impl Gate {
    pub fn new(limits: Limits) -> Gate {
        Gate {
            limits,
            counts: std::sync::Mutex::default(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a refusal; returns its message.
    fn refuse(c: &mut Counts, why: Refusal, message: String) -> String {
        c.refused[why as usize] += 1;
        message
    }

    /// A place for a new connection from `uid`, or why there is none.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        let l = self.limits;
        let mut c = self.counts();
        if uid == 0 {
            if c.root >= l.root {
                return Err(Self::refuse(
                    &mut c,
                    Refusal::Root,
                    format!("too many connections from root (limit {})", l.root),
                ));
            }
            c.root += 1;
        } else {
            let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
            if mine >= l.per_uid {
                return Err(Self::refuse(
                    &mut c,
                    Refusal::PerUid,
                    format!("too many connections from uid {uid} (limit {})", l.per_uid),
                ));
            }
            if c.others >= l.others {
                return Err(Self::refuse(
                    &mut c,
                    Refusal::Others,
                    format!(
                        "too many connections from users other than root (limit {})",
                        l.others
                    ),
                ));
            }
            c.others += 1;
            *c.per_uid.entry(uid).or_default() += 1;
        }
        Ok(Slot {
            gate: self.clone(),
            uid,
            subscriber: false,
        })
    }

    /// Turns `slot` into an `events` subscriber's, or says why not (the
    /// slot stays a plain connection's).
    pub fn subscribe(&self, slot: &mut Slot) -> Result<(), String> {
        if slot.uid == 0 || slot.subscriber {
            slot.subscriber = true;
            return Ok(());
        }
        let l = self.limits;
        let mut c = self.counts();
        let uid = slot.uid;
        let mine = c.subscribers_per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= l.subscribers_per_uid {
            return Err(Self::refuse(
                &mut c,
                Refusal::SubscribersPerUid,
                format!(
                    "too many event subscriptions from uid {uid} (limit {})",
                    l.subscribers_per_uid
                ),
            ));
        }
        if c.subscribers >= l.subscribers {
            return Err(Self::refuse(
                &mut c,
                Refusal::Subscribers,
                format!(
                    "too many event subscriptions from users other than root (limit {})",
                    l.subscribers
                ),
            ));
        }
        c.subscribers += 1;
        *c.subscribers_per_uid.entry(uid).or_default() += 1;
        slot.subscriber = true;
        Ok(())
    }

    /// Refusals so far, by reason.
    pub fn refused(&self) -> Vec<(Refusal, u64)> {
        let c = self.counts();
        Refusal::ALL
            .iter()
            .map(|&r| (r, c.refused[r as usize]))
            .collect()
    }

    /// For `status`: what is open, what was refused, the limits.
    pub fn status(&self) -> ControlStatus {
        let c = self.counts();
        let n = |r: Refusal| c.refused[r as usize];
        let refused = RefusedCounts {
            root: n(Refusal::Root),
            others: n(Refusal::Others),
            per_uid: n(Refusal::PerUid),
            subscribers: n(Refusal::Subscribers),
            subscribers_per_uid: n(Refusal::SubscribersPerUid),
        };
        ControlStatus {
            open: OpenConnections {
                root: c.root,
                others: c.others,
                subscribers: c.subscribers,
            },
            refused_total: c.refused.iter().sum(),
            refused,
            limits: self.limits,
        }
    }
}

/// The control socket's admission in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub open: OpenConnections,
    pub refused_total: u64,
    /// By reason, named as the [`Limits`] field that refused.
    pub refused: RefusedCounts,
    pub limits: Limits,
}

/// Connections open now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenConnections {
    pub root: usize,
    pub others: usize,
    /// `events` subscriptions of users other than root.
    pub subscribers: usize,
}

/// Refusals since start, by reason ([`Refusal::name`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCounts {
    pub root: u64,
    pub others: u64,
    pub per_uid: u64,
    pub subscribers: u64,
    pub subscribers_per_uid: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        if self.uid == 0 {
            c.root -= 1;
            return;
        }
        c.others -= 1;
        let uid = self.uid;
        let release = |m: &mut HashMap<u32, usize>| {
            if let Some(n) = m.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&uid);
                }
            }
        };
        release(&mut c.per_uid);
        if self.subscriber {
            c.subscribers -= 1;
            release(&mut c.subscribers_per_uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_keeps_its_own_room_and_users_their_share() {
        let gate = Arc::new(Gate::new(Limits {
            root: 3,
            others: 4,
            per_uid: 3,
            subscribers: 3,
            subscribers_per_uid: 2,
        }));
        // One user takes all it may: 3 connections, 2 of them subscribed.
        let mut a: Vec<Slot> = (0..3).map(|_| gate.admit(1000).unwrap()).collect();
        assert_eq!(
            gate.admit(1000).err().as_deref(),
            Some("too many connections from uid 1000 (limit 3)")
        );
        gate.subscribe(&mut a[0]).unwrap();
        gate.subscribe(&mut a[1]).unwrap();
        assert_eq!(
            gate.subscribe(&mut a[2]),
            Err("too many event subscriptions from uid 1000 (limit 2)".to_owned())
        );
        // Another user gets the rest of the shared room.
        let mut b = gate.admit(1001).unwrap();
        gate.subscribe(&mut b).unwrap();
        assert_eq!(
            gate.admit(1002).err().as_deref(),
            Some("too many connections from users other than root (limit 4)")
        );
        // Root is not counted against any of it, subscribed or not.
        let mut r: Vec<Slot> = (0..3).map(|_| gate.admit(0).unwrap()).collect();
        for s in &mut r {
            gate.subscribe(s).unwrap();
        }
        assert_eq!(
            gate.admit(0).err().as_deref(),
            Some("too many connections from root (limit 3)")
        );
        let st = serde_json::to_value(gate.status()).unwrap();
        assert_eq!(
            st["open"],
            serde_json::json!({"root": 3, "others": 4, "subscribers": 3})
        );
        assert_eq!(st["refused_total"], 4, "{st}");
        assert_eq!(
            st["refused"],
            serde_json::json!({"root": 1, "others": 1, "per_uid": 1, "subscribers": 0, "subscribers_per_uid": 1})
        );
        // Places come back when connections close.
        drop(a.remove(0));
        drop(b);
        let mut c = gate.admit(1002).unwrap();
        gate.subscribe(&mut c).unwrap();
        let mut d = gate.admit(1000).unwrap();
        gate.subscribe(&mut d).unwrap();
        let mut e = gate.admit(1003).unwrap_err();
        assert!(e.contains("other than root"), "{e}");
        drop(r);
        drop(a.pop());
        e = gate.subscribe(&mut gate.admit(1003).unwrap()).unwrap_err();
        assert_eq!(
            e,
            "too many event subscriptions from users other than root (limit 3)"
        );
        drop((a, c, d));
        let st = serde_json::to_value(gate.status()).unwrap();
        assert_eq!(
            st["open"],
            serde_json::json!({"root": 0, "others": 0, "subscribers": 0})
        );
    }
}
