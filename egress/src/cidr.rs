//! An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or one address).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network: the address and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a text is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address or network (expected e.g. 10.0.0.0/8 or fd00::/8)")]
    Address(String),
    #[error("`{0}` has an invalid prefix length (0–32 for IPv4, 0–128 for IPv6)")]
    Prefix(String),
}

impl Cidr {
    /// The network of `address` with `prefix` bits (host bits are ignored).
    pub fn new(address: IpAddr, prefix: u8) -> Option<Self> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr {
            network: address,
            prefix,
        })
    }

    /// Whether `ip` is in this network (an IPv4 network never contains an IPv6 address and
    /// the other way round; callers unwrap IPv4-mapped IPv6 addresses first).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_matches(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }

    /// Parses a comma-separated list (`10.0.0.0/8, 127.0.0.1`); empty entries are skipped.
    pub fn parse_list(text: &str) -> Result<Vec<Cidr>, CidrError> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(str::parse)
            .collect()
    }
}

fn prefix_matches(net: u128, ip: u128, prefix: u8, width: u32) -> bool {
    let prefix = u32::from(prefix);
    if prefix == 0 {
        return true;
    }
    let shift = width - prefix;
    (net >> shift) == (ip >> shift)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| CidrError::Address(text.to_owned()))?;
        let prefix = match prefix {
            None => {
                if address.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| CidrError::Prefix(text.to_owned()))?,
        };
        Cidr::new(address, prefix).ok_or_else(|| CidrError::Prefix(text.to_owned()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert_eq!(Cidr::parse_list(" 127.0.0.0/8, ,::1 ").unwrap().len(), 2);
    }

    #[test]
    fn errors_name_the_entry() {
        let e = Cidr::parse_list("10.0.0.0/8,nope").unwrap_err();
        assert!(e.to_string().contains("`nope`"), "{e}");
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("prefix"), "{e}");
        assert!("::1/129".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }
}
