//! `probes = ["198.18.10.5:5432/tcp", "vault.prod.internal:8200/tcp",
//! "[2001:db8::5]:53/udp"]`: what `envguard verify` tries to reach in an env.
//! Pure: a name is kept as written and resolved when verify runs.
use std::{fmt, net::IpAddr, str::FromStr};

/// TCP or UDP: the protocols a probe can attempt without raw sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeProto {
    Tcp,
    Udp,
}

impl ProbeProto {
    pub fn name(self) -> &'static str {
        match self {
            ProbeProto::Tcp => "tcp",
            ProbeProto::Udp => "udp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            ProbeProto::Tcp => libc::IPPROTO_TCP as u8,
            ProbeProto::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

/// Where a probe goes: an address, or a DNS name resolved at verify time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeHost {
    Ip(IpAddr),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    pub host: ProbeHost,
    pub port: u16,
    pub proto: ProbeProto,
}

impl fmt::Display for ProbeTarget {
    /// As written in a policy: `[v6]` in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            ProbeHost::Ip(IpAddr::V6(a)) => write!(f, "[{a}]")?,
            ProbeHost::Ip(a) => write!(f, "{a}")?,
            ProbeHost::Name(n) => f.write_str(n)?,
        }
        write!(f, ":{}/{}", self.port, self.proto.name())
    }
}

const FORM: &str = "a probe is HOST:PORT/PROTO, e.g. \"198.18.10.5:5432/tcp\", \"vault.prod.internal:8200/tcp\" or \"[2001:db8::5]:53/udp\"";

impl FromStr for ProbeTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((addr, proto)) = s.rsplit_once('/') else {
            return Err(format!("probe {s:?} names no protocol: {FORM}"));
        };
        let proto = match proto {
            "tcp" => ProbeProto::Tcp,
            "udp" => ProbeProto::Udp,
            other => {
                return Err(format!(
                    "probe {s:?}: protocol must be \"tcp\" or \"udp\", not {other:?}"
                ));
            }
        };
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            let Some((v6, port)) = rest.split_once("]:") else {
                return Err(format!(
                    "probe {s:?}: an IPv6 address needs its port after \"]:\": {FORM}"
                ));
            };
            let ip: std::net::Ipv6Addr = v6
                .parse()
                .map_err(|_| format!("probe {s:?}: {v6:?} is not an IPv6 address"))?;
            (ProbeHost::Ip(IpAddr::V6(ip)), port)
        } else {
            let Some((host, port)) = addr.rsplit_once(':') else {
                return Err(format!("probe {s:?} names no port: {FORM}"));
            };
            if host.contains(':') {
                return Err(format!(
                    "probe {s:?}: write an IPv6 address in brackets, e.g. \"[2001:db8::5]:53/udp\""
                ));
            }
            let host = match host.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => ProbeHost::Ip(IpAddr::V4(ip)),
                Err(_) => ProbeHost::Name(hostname(s, host)?),
            };
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!(
                    "probe {s:?}: port must be a number from 1 to 65535, not {port:?}"
                ));
            }
            Ok(p) => p,
        };
        Ok(ProbeTarget { host, port, proto })
    }
}

/// A DNS name as RFC 1123 allows it (lower-cased), or what is wrong with it.
fn hostname(probe: &str, host: &str) -> Result<String, String> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(ok_label) {
        return Err(format!(
            "probe {probe:?}: {host:?} is neither an IPv4 address nor a DNS name"
        ));
    }
    if name
        .split('.')
        .all(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("probe {probe:?}: {host:?} is not an IPv4 address"));
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_parse_and_print_back() {
        for (s, host, port, proto) in [
            (
                "198.18.10.5:5432/tcp",
                ProbeHost::Ip("198.18.10.5".parse().unwrap()),
                5432,
                ProbeProto::Tcp,
            ),
            (
                "vault.prod.internal:8200/tcp",
                ProbeHost::Name("vault.prod.internal".into()),
                8200,
                ProbeProto::Tcp,
            ),
            (
                "[2001:db8::5]:53/udp",
                ProbeHost::Ip("2001:db8::5".parse().unwrap()),
                53,
                ProbeProto::Udp,
            ),
        ] {
            let t: ProbeTarget = s.parse().unwrap();
            assert_eq!(t, ProbeTarget { host, port, proto }, "{s}");
            assert_eq!(t.to_string(), s);
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (s, want) in [
            ("198.18.10.5:5432", "names no protocol"),
            (
                "198.18.10.5:5432/icmp",
                "protocol must be \"tcp\" or \"udp\"",
            ),
            ("198.18.10.5/tcp", "names no port"),
            ("198.18.10.5:0/tcp", "port must be a number from 1 to 65535"),
            (
                "198.18.10.5:70000/tcp",
                "port must be a number from 1 to 65535",
            ),
            ("2001:db8::5:53/udp", "in brackets"),
            ("[2001:db8::zz]:53/udp", "is not an IPv6 address"),
            ("[2001:db8::5]53/udp", "after \"]:\""),
            ("bad_name!:53/udp", "neither an IPv4 address nor a DNS name"),
            ("198.18.10.500:53/udp", "is not an IPv4 address"),
        ] {
            let e = s.parse::<ProbeTarget>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
