//! Which address a process listens on and which one it tells other nodes: the one choice every
//! listener of a run makes the same way (the coordinator's gRPC service, each worker's gRPC
//! service, the TCP collective groups, and NCCL's bootstrap through `NCCL_SOCKET_IFNAME`).
//!
//! - An interface named (`launcher.interface`, as `NCCL_SOCKET_IFNAME` names one): listen on
//!   that interface's address and advertise it (IPv4 preferred, else a global IPv6 address).
//! - Otherwise listen on `launcher.bind`; a specific address is advertised as it is, and the
//!   unspecified address (`0.0.0.0`, `::`) advertises this host's name, which other nodes
//!   resolve with their own resolver.
//!
//! Addresses on the wire are `host:port` with IPv6 literals in brackets ([`host_port`]); host
//! names are fine everywhere an address is read ([`resolve`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Where to listen and what to tell others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// The address the listener binds.
    pub bind: IpAddr,
    /// The host other nodes connect to: an IP literal (IPv6 without brackets) or a host name.
    pub host: String,
}

impl Listen {
    /// `host:port` for the wire, with an IPv6 literal in brackets.
    pub fn advertise(&self, port: u16) -> String {
        host_port(&self.host, port)
    }
}

/// Why no address could be chosen or resolved. Messages name the host, interface or address.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface `{name}` does not exist on host {host} (interfaces here: {known}); set launcher.interface to one of them")]
    NoSuchInterface {
        name: String,
        host: String,
        known: String,
    },
    #[error("interface `{name}` on host {host} has no usable IPv4 or global IPv6 address")]
    NoAddress { name: String, host: String },
    #[error("listing the network interfaces of host {host}: {source}")]
    Interfaces {
        host: String,
        source: std::io::Error,
    },
    #[error("address `{address}` is not host:port (an IPv6 literal goes in brackets: [::1]:7000)")]
    NotHostPort { address: String },
    #[error("`{address}` does not resolve from host {from} ({why}); check DNS or /etc/hosts there, or set launcher.interface so addresses are advertised as IPs")]
    Unresolved {
        address: String,
        from: String,
        why: String,
    },
}

/// This host's name (the kernel's, as `hostname` prints it; per UTS namespace).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `host:port`, bracketing an IPv6 literal.
pub fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// Chooses the listen and advertised addresses from `launcher.bind` and `launcher.interface`.
pub fn choose(bind: IpAddr, interface: Option<&str>) -> Result<Listen, NetError> {
    if let Some(name) = interface {
        let ip = interface_address(name)?;
        // Listening on every interface stays so; otherwise listen where we advertise.
        let bind = if bind.is_unspecified() { bind } else { ip };
        return Ok(Listen {
            bind,
            host: ip.to_string(),
        });
    }
    let host = if bind.is_unspecified() {
        host_name()
    } else {
        bind.to_string()
    };
    Ok(Listen { bind, host })
}

/// The address of interface `name`: its first IPv4 address, else its first global IPv6 one.
pub fn interface_address(name: &str) -> Result<IpAddr, NetError> {
    let all = if_addrs::get_if_addrs().map_err(|source| NetError::Interfaces {
        host: host_name(),
        source,
    })?;
    let mine: Vec<IpAddr> = all
        .iter()
        .filter(|i| i.name == name)
        .map(|i| i.ip())
        .collect();
    if mine.is_empty() {
        let mut known: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        known.sort_unstable();
        known.dedup();
        return Err(NetError::NoSuchInterface {
            name: name.into(),
            host: host_name(),
            known: known.join(", "),
        });
    }
    let v4 = mine.iter().find(|ip| ip.is_ipv4());
    // Link-local IPv6 (fe80::/10) needs a scope id no other host could use.
    let v6 = mine
        .iter()
        .find(|ip| matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80));
    v4.or(v6).copied().ok_or_else(|| NetError::NoAddress {
        name: name.into(),
        host: host_name(),
    })
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals).
pub fn split_host_port(address: &str) -> Result<(&str, u16), NetError> {
    let bad = || NetError::NotHostPort {
        address: address.into(),
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').ok_or_else(bad)?,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port.parse().map_err(|_| bad())?))
}

/// Resolves `host:port` (a name or an IP literal) to a socket address within `timeout`; an
/// error names the address and this host.
pub async fn resolve(address: &str, timeout: Duration) -> Result<SocketAddr, NetError> {
    let (host, port) = split_host_port(address)?;
    let unresolved = |why: String| NetError::Unresolved {
        address: address.into(),
        from: host_name(),
        why,
    };
    let found = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| unresolved(format!("no answer within {timeout:?}")))?
        .map_err(|e| unresolved(e.to_string()))?
        .next();
    found.ok_or_else(|| unresolved("no address".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn host_port_brackets_ipv6_only() {
        assert_eq!(host_port("10.0.0.1", 7), "10.0.0.1:7");
        assert_eq!(host_port("node-3", 7), "node-3:7");
        assert_eq!(host_port("::1", 7), "[::1]:7");
        assert_eq!(host_port("fd00::2", 80), "[fd00::2]:80");
    }

    #[test]
    fn split_reads_names_v4_and_bracketed_v6() {
        assert_eq!(split_host_port("vm:40691").unwrap(), ("vm", 40691));
        assert_eq!(split_host_port("10.1.2.3:1").unwrap(), ("10.1.2.3", 1));
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1", 9));
        for bad in ["vm", "::1:9", "[::1:9", ":9", "vm:x", "vm:70000"] {
            let e = split_host_port(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn unspecified_bind_advertises_the_host_name_and_specific_binds_themselves() {
        let any = choose(IpAddr::V4(Ipv4Addr::UNSPECIFIED), None).unwrap();
        assert_eq!(any.host, host_name());
        assert_eq!(any.bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let v6 = choose(IpAddr::V6(Ipv6Addr::LOCALHOST), None).unwrap();
        assert_eq!(v6.advertise(5), "[::1]:5");
        let lo = choose(IpAddr::V4(Ipv4Addr::LOCALHOST), None).unwrap();
        assert_eq!(lo.advertise(5), "127.0.0.1:5");
    }

    #[test]
    fn an_interface_gives_its_own_address() {
        let lo = choose(IpAddr::V4(Ipv4Addr::LOCALHOST), Some("lo")).unwrap();
        assert_eq!(lo.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(lo.host, "127.0.0.1");
        // Listening everywhere stays so; the interface only picks what is advertised.
        let any = choose(IpAddr::V4(Ipv4Addr::UNSPECIFIED), Some("lo")).unwrap();
        assert_eq!(any.bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(any.host, "127.0.0.1");
        let e = choose(IpAddr::V4(Ipv4Addr::UNSPECIFIED), Some("nope0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nope0`") && e.contains("lo"), "{e}");
    }

    #[tokio::test]
    async fn resolution_names_the_address_it_could_not_resolve() {
        let a = resolve("localhost:80", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a.port(), 80);
        assert!(a.ip().is_loopback());
        let e = resolve("no-such-host.invalid:80", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-host.invalid:80") && e.contains(&host_name()),
            "{e}"
        );
    }
}
