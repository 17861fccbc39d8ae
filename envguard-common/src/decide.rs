//! The decision, written once: the kernel's programs and userspace (`explain`,
//! later `verify`) run these same functions, each over its own lookups — the
//! kernel over its maps, userspace over the compiled policy.
//!
//! Everything here must stay friendly to the BPF verifier: `#[inline(always)]`,
//! generic over the lookup traits (no trait objects), no loops, no recursion,
//! no panics, a few words of stack.
use crate::{
    config::{EnvLoss, MODE_ENFORCE, ON_LOSS_CLOSED, ON_LOSS_FOLLOW, ON_LOSS_KEEP, ON_LOSS_OPEN},
    event::{VERDICT_ALLOWED, VERDICT_AUDITED, VERDICT_DENIED},
    flow::{DECISION_ALLOW, DECISION_VIOLATION},
    policy::{RULE_AGENT_LOSS_CLOSED, RULE_AGENT_LOSS_OPEN, RULE_NONE, RuleKey},
};

/// What the policy in force knows about env pairs, as the decision asks it.
pub trait RuleLookup {
    /// The rule id of the longest `[[deny]]` entry matching `key` (the whole
    /// key, `RULE_PREFIX_PORT` bits), if any.
    fn deny_rule(&self, key: &RuleKey) -> Option<u32>;
    /// The rule id of the longest allow entry (`[[allow]]` or a default)
    /// matching `key`, if any.
    fn allow_rule(&self, key: &RuleKey) -> Option<u32>;
    /// An env's fail mode once the agent is gone (`ENV_LOSS_A/B`), if set.
    fn env_loss(&self, env: u32) -> Option<&EnvLoss>;
    /// CLOCK_BOOTTIME of the agent's last heartbeat; 0 before the first (or
    /// for a lookup that leaves the fail modes out, as offline ones do).
    fn heartbeat_ns(&self) -> u64;
    /// CLOCK_BOOTTIME now; only asked when `heartbeat_ns` is not 0.
    fn now_ns(&self) -> u64;
}

/// The modes in force, with the kernel's encoding (`MODE_AUDIT`, `MODE_ENFORCE`).
pub trait ModeLookup {
    /// The global mode.
    fn global_mode(&self) -> u32;
    /// The pair's own mode, when the policy or an operator set one.
    fn pair_mode(&self, src: u32, dst: u32) -> Option<u32>;
}

/// The policy's decision for one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `DECISION_ALLOW` or `DECISION_VIOLATION`.
    pub decision: u32,
    /// The deciding rule id, as in events: an index into the policy's rules,
    /// a default's id, `RULE_AGENT_LOSS_*`, or `RULE_NONE` (same env allowed,
    /// or no allow rule).
    pub rule: u32,
}

impl Decision {
    #[inline(always)]
    pub fn is_violation(&self) -> bool {
        self.decision == DECISION_VIOLATION
    }
}

/// The policy's decision for a flow from `src` to `dst` on `proto`/`port`,
/// overridden by the envs' fail modes when the agent has been gone too long:
/// a matching deny wins, then same env is allowed, then a matching allow;
/// else a violation.
#[inline(always)]
pub fn decide<L: RuleLookup>(l: &L, src: u32, dst: u32, proto: u8, port: u16) -> Decision {
    if let Some(d) = agent_loss(l, src, dst) {
        return d;
    }
    let key = RuleKey::new(src, dst, proto, port);
    // Deny beats allow, and the same-env default too.
    if let Some(rule) = l.deny_rule(&key) {
        return Decision {
            decision: DECISION_VIOLATION,
            rule,
        };
    }
    if src == dst {
        return Decision {
            decision: DECISION_ALLOW,
            rule: RULE_NONE,
        };
    }
    match l.allow_rule(&key) {
        Some(rule) => Decision {
            decision: DECISION_ALLOW,
            rule,
        },
        None => Decision {
            decision: DECISION_VIOLATION,
            rule: RULE_NONE,
        },
    }
}

/// The watchdog: once the agent's heartbeat is older than an env's timeout,
/// that env's fail mode applies, and for a pair of envs the stricter side
/// wins (`closed` > `keep` > `open`): closed if either side is closed; open
/// only if both sides are open, or one is open and the other is `host` or
/// `world` whose `[defaults]` allow flows (`ON_LOSS_FOLLOW`); a same-env flow
/// takes its env's mode. `host` and `world` never trigger anything on their
/// own. `None` while the agent is alive, or before any agent wrote a heartbeat.
#[inline(always)]
pub fn agent_loss<L: RuleLookup>(l: &L, src: u32, dst: u32) -> Option<Decision> {
    let heartbeat = l.heartbeat_ns();
    if heartbeat == 0 {
        return None;
    }
    // Each env's fail mode and timeout as plain scalars (no mode: keep): the
    // BPF verifier refuses code that reads an absent value's fields, which
    // an `Option` of the whole record lets the compiler emit.
    let (src_mode, src_timeout) = match l.env_loss(src) {
        Some(x) => (x.mode, x.timeout_ns),
        None => (ON_LOSS_KEEP, 0),
    };
    let (dst_mode, dst_timeout) = if src == dst {
        (src_mode, src_timeout)
    } else {
        match l.env_loss(dst) {
            Some(x) => (x.mode, x.timeout_ns),
            None => (ON_LOSS_KEEP, 0),
        }
    };
    // Only `open` and `closed` ever trigger anything, and only they depend
    // on the heartbeat's age: without them, no clock read (most flows).
    let timed = |mode: u32| mode == ON_LOSS_OPEN || mode == ON_LOSS_CLOSED;
    if !timed(src_mode) && !timed(dst_mode) {
        return None;
    }
    let age = l.now_ns().saturating_sub(heartbeat);
    // The fail mode an env is in at this age: keep until its own timeout
    // passed; a follower (host/world) is one at any age.
    let state = |mode: u32, timeout: u64| -> u32 {
        if mode == ON_LOSS_FOLLOW {
            ON_LOSS_FOLLOW
        } else if timed(mode) && age > timeout {
            mode
        } else {
            ON_LOSS_KEEP
        }
    };
    let a = state(src_mode, src_timeout);
    let b = if src == dst {
        a
    } else {
        state(dst_mode, dst_timeout)
    };
    let open = if src == dst {
        a == ON_LOSS_OPEN
    } else {
        (a == ON_LOSS_OPEN && (b == ON_LOSS_OPEN || b == ON_LOSS_FOLLOW))
            || (b == ON_LOSS_OPEN && a == ON_LOSS_FOLLOW)
    };
    if a == ON_LOSS_CLOSED || b == ON_LOSS_CLOSED {
        Some(Decision {
            decision: DECISION_VIOLATION,
            rule: RULE_AGENT_LOSS_CLOSED,
        })
    } else if open {
        Some(Decision {
            decision: DECISION_ALLOW,
            rule: RULE_AGENT_LOSS_OPEN,
        })
    } else {
        None
    }
}

/// The mode a violation between two envs is handled in: the pair's own mode
/// when the policy or an operator set one, else the global mode.
#[inline(always)]
pub fn mode_of<M: ModeLookup>(m: &M, src: u32, dst: u32) -> u32 {
    match m.pair_mode(src, dst) {
        Some(mode) => mode,
        None => m.global_mode(),
    }
}

/// The verdict byte of a decision in a mode (`VERDICT_*`, as in events).
#[inline(always)]
pub fn verdict_of(decision: u32, mode: u32) -> u8 {
    if decision == DECISION_ALLOW {
        VERDICT_ALLOWED
    } else if mode == MODE_ENFORCE {
        VERDICT_DENIED
    } else {
        VERDICT_AUDITED
    }
}

/// Everything about one flow's fate: the decision, the mode it is handled
/// in, and the verdict that makes of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    /// `MODE_AUDIT` or `MODE_ENFORCE`.
    pub mode: u32,
    /// `VERDICT_*`.
    pub verdict: u8,
}

/// [`decide`], [`mode_of`] and [`verdict_of`] in one: env lookup results in,
/// verdict, rule and mode out.
#[inline(always)]
pub fn outcome<L: RuleLookup, M: ModeLookup>(
    l: &L,
    m: &M,
    src: u32,
    dst: u32,
    proto: u8,
    port: u16,
) -> Outcome {
    let decision = decide(l, src, dst, proto, port);
    let mode = mode_of(m, src, dst);
    Outcome {
        decision,
        mode,
        verdict: verdict_of(decision.decision, mode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::MODE_AUDIT,
        policy::{ENV_HOST, ENV_WORLD},
    };

    /// A policy with no rules and chosen fail modes; envs 2, 3 declared.
    struct Fixed {
        loss: [Option<EnvLoss>; 4],
        heartbeat: u64,
        now: u64,
    }

    impl RuleLookup for Fixed {
        fn deny_rule(&self, _: &RuleKey) -> Option<u32> {
            None
        }
        fn allow_rule(&self, key: &RuleKey) -> Option<u32> {
            // host/world allowed by default (a default's id: 7).
            let involves =
                |e: u32| key.src_env == e.to_be_bytes() || key.dst_env == e.to_be_bytes();
            (involves(ENV_HOST) || involves(ENV_WORLD)).then_some(7)
        }
        fn env_loss(&self, env: u32) -> Option<&EnvLoss> {
            self.loss.get(env as usize)?.as_ref()
        }
        fn heartbeat_ns(&self) -> u64 {
            self.heartbeat
        }
        fn now_ns(&self) -> u64 {
            self.now
        }
    }

    struct Modes;
    impl ModeLookup for Modes {
        fn global_mode(&self) -> u32 {
            MODE_ENFORCE
        }
        fn pair_mode(&self, src: u32, dst: u32) -> Option<u32> {
            (src == 2 && dst == 3).then_some(MODE_AUDIT)
        }
    }

    const FOLLOW: Option<EnvLoss> = Some(EnvLoss::new(ON_LOSS_FOLLOW, 0));
    const fn loss(mode: u32) -> Option<EnvLoss> {
        Some(EnvLoss::new(mode, 10))
    }

    #[test]
    fn policy_while_the_agent_lives() {
        let f = Fixed {
            loss: [FOLLOW, FOLLOW, loss(ON_LOSS_OPEN), loss(ON_LOSS_CLOSED)],
            heartbeat: 100,
            now: 105,
        };
        assert_eq!(decide(&f, 2, 2, 6, 1).rule, RULE_NONE);
        assert!(!decide(&f, 2, 2, 6, 1).is_violation());
        assert!(decide(&f, 2, 3, 6, 1).is_violation());
        assert_eq!(decide(&f, 2, ENV_WORLD, 6, 1).rule, 7);
        let o = outcome(&f, &Modes, 2, 3, 6, 1);
        assert_eq!((o.mode, o.verdict), (MODE_AUDIT, VERDICT_AUDITED));
        let o = outcome(&f, &Modes, 3, 2, 6, 1);
        assert_eq!((o.mode, o.verdict), (MODE_ENFORCE, VERDICT_DENIED));
        // No heartbeat yet: never a fail mode.
        let f = Fixed {
            heartbeat: 0,
            now: 1_000,
            ..f
        };
        assert!(agent_loss(&f, 3, 3).is_none());
    }

    #[test]
    fn stricter_side_wins_once_the_agent_is_gone() {
        use ON_LOSS_CLOSED as C;
        use ON_LOSS_KEEP as K;
        use ON_LOSS_OPEN as O;
        // (src mode, dst mode) → Some(open?) or None (policy decides).
        let cases = [
            ((O, O), Some(true)),
            ((O, K), None),
            ((K, O), None),
            ((O, C), Some(false)),
            ((C, O), Some(false)),
            ((K, C), Some(false)),
            ((K, K), None),
        ];
        for ((a, b), want) in cases {
            let f = Fixed {
                loss: [FOLLOW, FOLLOW, loss(a), loss(b)],
                heartbeat: 100,
                now: 200,
            };
            let got = agent_loss(&f, 2, 3).map(|d| !d.is_violation());
            assert_eq!(got, want, "{a} -> {b}");
            // Before the timeout: nothing.
            let early = Fixed { now: 105, ..f };
            assert!(agent_loss(&early, 2, 3).is_none());
        }
        // Same env: its own mode.
        let f = Fixed {
            loss: [FOLLOW, FOLLOW, loss(O), loss(C)],
            heartbeat: 100,
            now: 200,
        };
        assert_eq!(
            agent_loss(&f, 2, 2).map(|d| d.rule),
            Some(RULE_AGENT_LOSS_OPEN)
        );
        assert_eq!(
            agent_loss(&f, 3, 3).map(|d| d.rule),
            Some(RULE_AGENT_LOSS_CLOSED)
        );
        // host/world that follow open a pair with an open env, never alone.
        assert_eq!(
            agent_loss(&f, ENV_HOST, 2).map(|d| d.rule),
            Some(RULE_AGENT_LOSS_OPEN)
        );
        assert_eq!(
            agent_loss(&f, 2, ENV_WORLD).map(|d| d.rule),
            Some(RULE_AGENT_LOSS_OPEN)
        );
        assert!(agent_loss(&f, ENV_HOST, ENV_WORLD).is_none());
        assert_eq!(
            agent_loss(&f, ENV_HOST, 3).map(|d| d.rule),
            Some(RULE_AGENT_LOSS_CLOSED)
        );
        // host/world without FOLLOW (their defaults deny): keep.
        let f = Fixed {
            loss: [None, None, loss(O), loss(C)],
            ..f
        };
        assert!(agent_loss(&f, ENV_HOST, 2).is_none());
    }
}
