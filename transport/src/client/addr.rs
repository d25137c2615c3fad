//! A source's address as the operator gives it: an IP address and port, or
//! a host name and port, looked up again at every connection attempt (so a
//! reconnect follows a name that moved to another address).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

/// `IP:PORT`, `[IPV6]:PORT` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// An IP address: used as it is.
    Ip(SocketAddr),
    /// A host name, resolved at each connection attempt.
    Name {
        /// The name.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

/// Why a string is not a [`ServerAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not an address: {why} (give HOST:PORT, IPV4:PORT or [IPV6]:PORT)")]
pub struct ServerAddrParseError {
    /// The string.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl FromStr for ServerAddr {
    type Err = ServerAddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::Ip(a));
        }
        let err = |why| ServerAddrParseError {
            input: s.to_string(),
            why,
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(|| err("no port"))?;
        if host.is_empty() {
            return Err(err("no host"));
        }
        if host.contains(':') || host.starts_with('[') {
            return Err(err("an IPv6 address needs brackets: [ADDR]:PORT"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return Err(err("the host name has characters no host name has"));
        }
        let port = port.parse::<u16>().map_err(|_| err("bad port"))?;
        Ok(Self::Name {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(a) => write!(f, "{a}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(a: SocketAddr) -> Self {
        Self::Ip(a)
    }
}

impl ServerAddr {
    /// Every address it stands for, in the resolver's order of preference
    /// (an IP address: itself). A name without addresses is an error.
    pub async fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match self {
            Self::Ip(a) => Ok(vec![*a]),
            Self::Name { host, port } => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .collect();
                if found.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name has no address",
                    ));
                }
                Ok(found)
            }
        }
    }

    /// [`ServerAddr::resolve`], blocking (for a listening address, resolved
    /// once at start).
    pub fn resolve_blocking(&self) -> io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        match self {
            Self::Ip(a) => Ok(vec![*a]),
            Self::Name { host, port } => {
                let found: Vec<SocketAddr> = (host.as_str(), *port).to_socket_addrs()?.collect();
                if found.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name has no address",
                    ));
                }
                Ok(found)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "127.0.0.1:7700".parse::<ServerAddr>(),
            Ok(ServerAddr::Ip("127.0.0.1:7700".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:7700".parse::<ServerAddr>(),
            Ok(ServerAddr::Ip("[::1]:7700".parse().unwrap()))
        );
        let name: ServerAddr = "src.example:7777".parse().unwrap();
        assert_eq!(
            name,
            ServerAddr::Name {
                host: "src.example".into(),
                port: 7777
            }
        );
        assert_eq!(name.to_string(), "src.example:7777");
        for (bad, why) in [
            ("src.example", "no port"),
            (":7700", "no host"),
            ("::1:7700", "brackets"),
            ("src.example:99999", "bad port"),
            ("a b:1", "characters"),
        ] {
            let e = bad.parse::<ServerAddr>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn localhost_resolves_to_a_loopback_address() {
        let a: ServerAddr = "localhost:7700".parse().unwrap();
        let found = a.resolve().await.unwrap();
        assert!(
            found
                .iter()
                .all(|s| s.ip().is_loopback() && s.port() == 7700),
            "{found:?}"
        );
        assert_eq!(a.resolve_blocking().unwrap()[0].port(), 7700);
    }
}
