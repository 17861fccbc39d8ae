//! `[envs.X] interfaces = ["tap-prod*", "br-prod"]`: network interfaces whose
//! traffic belongs to an env (packets entering the host through one come from
//! it; packets leaving through one go to it). A name, or a name prefix ending
//! in `*` (the only wildcard). Pure: matching names, checking overlaps.
use std::fmt;

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;

/// One entry of `interfaces`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IfacePattern {
    /// Exactly this name.
    Name(String),
    /// Every name starting with this prefix (written `prefix*`).
    Prefix(String),
}

impl fmt::Display for IfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IfacePattern::Name(n) => f.write_str(n),
            IfacePattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl IfacePattern {
    /// Parses an entry, with the message a policy file gets otherwise.
    pub fn parse(s: &str) -> Result<IfacePattern, String> {
        let (body, glob) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!(
                "interface {s:?}: `*` is only allowed at the end of a name (a prefix match)"
            ));
        }
        if body.is_empty() {
            return Err(if glob {
                "interface \"*\" would claim every interface of the host (its uplinks and `lo` too); list names or prefixes such as \"tap-prod*\"".to_owned()
            } else {
                "an interface name must not be empty".to_owned()
            });
        }
        if body.len() > MAX_IFNAME {
            return Err(format!(
                "interface {s:?} is longer than {MAX_IFNAME} bytes, which Linux never accepts"
            ));
        }
        if body == "." || body == ".." {
            return Err(format!("interface {s:?} is not a valid interface name"));
        }
        if let Some(c) = body
            .chars()
            .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "interface {s:?} contains {c:?}, which an interface name cannot"
            ));
        }
        Ok(if glob {
            IfacePattern::Prefix(body.to_owned())
        } else {
            IfacePattern::Name(body.to_owned())
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            IfacePattern::Name(n) => n == name,
            IfacePattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }

    /// Whether some interface name could match both.
    pub fn overlaps(&self, other: &IfacePattern) -> bool {
        use IfacePattern::{Name, Prefix};
        match (self, other) {
            (Name(a), Name(b)) => a == b,
            (Name(n), Prefix(p)) | (Prefix(p), Name(n)) => n.starts_with(p.as_str()),
            (Prefix(a), Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_prefixes() {
        assert_eq!(
            IfacePattern::parse("br-prod"),
            Ok(IfacePattern::Name("br-prod".into()))
        );
        assert_eq!(
            IfacePattern::parse("tap-prod*"),
            Ok(IfacePattern::Prefix("tap-prod".into()))
        );
        assert_eq!(
            IfacePattern::parse("tap-prod*").unwrap().to_string(),
            "tap-prod*"
        );
    }

    #[test]
    fn refuses_bad_names() {
        for (bad, says) in [
            ("", "empty"),
            ("*", "every interface"),
            ("ta*p", "only allowed at the end"),
            ("tap**", "only allowed at the end"),
            ("a-very-long-interface", "longer than 15"),
            ("eth0/1", "'/'"),
            ("eth 0", "' '"),
            ("eth0:1", "':'"),
            ("..", "not a valid"),
        ] {
            let e = IfacePattern::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        // 15 bytes is the limit, and a prefix of 15 is fine too.
        assert!(IfacePattern::parse("abcdefghijklmno").is_ok());
        assert!(IfacePattern::parse("abcdefghijklmno*").is_ok());
    }

    #[test]
    fn matching_and_overlaps() {
        let p = IfacePattern::parse("tap-prod*").unwrap();
        assert!(p.matches("tap-prod"));
        assert!(p.matches("tap-prod7"));
        assert!(!p.matches("tap-pro"));
        assert!(!p.matches("xtap-prod1"));
        let n = IfacePattern::parse("br-prod").unwrap();
        assert!(n.matches("br-prod"));
        assert!(!n.matches("br-prod1"));
        let ov = |a: &str, b: &str| {
            IfacePattern::parse(a)
                .unwrap()
                .overlaps(&IfacePattern::parse(b).unwrap())
        };
        assert!(ov("tap-*", "tap-prod*"));
        assert!(ov("tap-prod*", "tap-*"));
        assert!(ov("tap-prod*", "tap-prod1"));
        assert!(ov("tap-prod1", "tap-prod*"));
        assert!(ov("br0", "br0"));
        assert!(!ov("br0", "br1"));
        assert!(!ov("tap-dev*", "tap-prod*"));
        assert!(!ov("tap-dev", "tap-dev1*"));
    }
}
