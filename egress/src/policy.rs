//! The address policy: [`blocked_range`] (the default refusal) and [`AddressPolicy`] (plus the
//! explicit allow-list).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::cidr::{Cidr, CidrError};

/// Which addresses outbound HTTP may reach: any public address, and the blocked ranges
/// ([`blocked_range`]) only where [`AddressPolicy::allow`] lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Networks allowed even though they are in a blocked range (`BATON_HTTP_ALLOW_CIDRS`).
    pub allow: Vec<Cidr>,
}

/// A connection the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refused {
    /// The host name that resolved to `ip` (`None` for an IP literal).
    pub host: Option<String>,
    pub ip: IpAddr,
    /// The blocked range `ip` is in (`loopback`, `private`, `link-local`…).
    pub range: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "`{host}` resolves to {}", self.ip)?,
            None => write!(f, "{}", self.ip)?,
        }
        write!(
            f,
            ", a {} address: outbound HTTP to internal addresses is refused (allow a network with {})",
            self.range,
            crate::ALLOW_CIDRS_ENV
        )
    }
}

impl AddressPolicy {
    /// The default policy plus `allow`.
    pub fn allowing(allow: Vec<Cidr>) -> Self {
        AddressPolicy { allow }
    }

    /// Refuses `ip` if it is in a blocked range that the allow-list does not cover. `host` is
    /// the name it was resolved from, for the message.
    pub fn check(&self, host: Option<&str>, ip: IpAddr) -> Result<(), Refused> {
        let Some(range) = blocked_range(ip) else {
            return Ok(());
        };
        let canonical = canonical(ip);
        if self
            .allow
            .iter()
            .any(|net| net.contains(ip) || net.contains(canonical))
        {
            return Ok(());
        }
        Err(Refused {
            host: host.map(str::to_owned),
            ip,
            range,
        })
    }

    /// Refuses a URL whose host is a blocked IP literal (a client connects to a literal
    /// without resolving it, so the resolver never sees it). Host names pass: the resolver
    /// checks what they resolve to.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().unwrap_or_default();
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match literal.parse::<IpAddr>() {
            Ok(ip) => self.check(None, ip),
            Err(_) => Ok(()),
        }
    }
}

impl FromStr for AddressPolicy {
    type Err = CidrError;

    /// The allow-list as `BATON_HTTP_ALLOW_CIDRS` gives it: comma-separated CIDRs.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Cidr::parse_list(text).map(AddressPolicy::allowing)
    }
}

/// The blocked range `ip` belongs to, if any: loopback, unspecified / "this network",
/// private (RFC 1918, IPv6 unique local), shared address space (CGNAT, 100.64.0.0/10),
/// link-local (169.254.0.0/16 with cloud metadata services, fe80::/10), multicast, broadcast
/// and reserved. IPv6 addresses that embed an IPv4 address (IPv4-mapped, IPv4-compatible,
/// NAT64 64:ff9b::/96, 6to4 2002::/16) are judged by that IPv4 address.
pub fn blocked_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => blocked_v4(v4),
            None => blocked_v6(v6),
        },
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, _, _] = ip.octets();
    Some(match (a, b) {
        (127, _) => "loopback",
        (0, _) => "unspecified",
        (10, _) | (172, 16..=31) | (192, 168) => "private",
        (100, 64..=127) => "shared (CGNAT)",
        (169, 254) => "link-local",
        (192, 0) if ip.octets()[2] == 0 => "reserved",
        (198, 18..=19) => "reserved",
        (224..=239, _) => "multicast",
        (240..=255, _) => "reserved",
        _ => return None,
    })
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if first & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private")
    } else if first & 0xff00 == 0xff00 {
        Some("multicast")
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address stands for, if it embeds one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated), except :: and ::1 themselves.
    if s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback() {
        return Some(tail);
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    // 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The IPv4 address of an IPv6 address that embeds one, else the address itself (so that an
/// allow-list of IPv4 networks covers their IPv6 spellings too).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_blocked_by_default() {
        for (addr, range) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.3.4.5", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.254", "shared (CGNAT)"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
        ] {
            assert_eq!(blocked_range(ip(addr)), Some(range), "{addr}");
            assert!(
                AddressPolicy::default().check(None, ip(addr)).is_err(),
                "{addr}"
            );
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "169.253.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(blocked_range(ip(addr)), None, "{addr}");
            AddressPolicy::default().check(None, ip(addr)).unwrap();
        }
    }

    #[test]
    fn the_allow_list_opens_exactly_its_networks() {
        let policy: AddressPolicy = "127.0.0.0/8, 10.1.0.0/16".parse().unwrap();
        policy.check(None, ip("127.0.0.1")).unwrap();
        policy.check(None, ip("::ffff:127.0.0.1")).unwrap();
        policy.check(None, ip("10.1.2.3")).unwrap();
        assert!(policy.check(None, ip("10.2.0.1")).is_err());
        assert!(policy.check(None, ip("169.254.169.254")).is_err());
        assert!(policy.check(None, ip("::1")).is_err());
        assert!("10.0.0.0/8,bogus".parse::<AddressPolicy>().is_err());
    }

    #[test]
    fn refusals_say_what_and_how_to_allow() {
        let e = AddressPolicy::default()
            .check(Some("localhost"), ip("127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`localhost` resolves to 127.0.0.1"), "{e}");
        assert!(
            e.contains("loopback") && e.contains("BATON_HTTP_ALLOW_CIDRS"),
            "{e}"
        );
        let url = reqwest::Url::parse("http://[::1]:8080/x").unwrap();
        assert!(AddressPolicy::default().check_url(&url).is_err());
        let url = reqwest::Url::parse("http://example.com/x").unwrap();
        AddressPolicy::default().check_url(&url).unwrap();
    }
}
