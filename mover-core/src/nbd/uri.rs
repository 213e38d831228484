//! NBD URIs, in the subset of the NBD URI specification this client serves:
//!
//! - `nbd://host[:port][/export]`: TCP, port 10809 by default, IPv6 hosts in brackets
//!   (`nbd://[::1]:10809/disk`);
//! - `nbd+unix:///[export]?socket=PATH`: a Unix domain socket.
//!
//! The export name is the path without its leading `/`, percent-decoded, and may be empty. TLS
//! (`nbds://`) and query parameters other than `socket` are refused rather than ignored, so a
//! URI never means something other than what it says.

use std::fmt;
use std::path::PathBuf;

use crate::error::{MoverError, Result};

/// The port NBD servers listen on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A host name or an IP address (IPv6 without brackets), and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix {
        path: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

impl NbdUri {
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid = |reason: String| MoverError::InvalidEndpoint {
            spec: spec.to_owned(),
            reason,
        };
        let (scheme, rest) = spec
            .split_once("://")
            .ok_or_else(|| invalid("not a URI (no \"://\")".into()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(invalid("fragments (#) are not allowed".into()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).map_err(invalid)?;
        match scheme {
            "nbd" => {
                if query.is_some() {
                    return Err(invalid("nbd:// URIs take no query parameters".into()));
                }
                let (host, port) = parse_authority(authority).map_err(invalid)?;
                Ok(Self {
                    address: Address::Tcp { host, port },
                    export,
                })
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(invalid(format!(
                        "nbd+unix:// takes no host (found {authority:?}); write \
                         nbd+unix:///export?socket=PATH"
                    )));
                }
                let path = parse_socket_query(query).map_err(invalid)?;
                Ok(Self {
                    address: Address::Unix { path },
                    export,
                })
            }
            "nbds" | "nbds+unix" => Err(invalid("NBD over TLS is not supported".into())),
            other => Err(invalid(format!(
                "unknown scheme {other:?}: use nbd:// or nbd+unix://"
            ))),
        }
    }
}

fn parse_authority(authority: &str) -> std::result::Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user names are not supported".into());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("IPv6 address without closing \"]\"")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{host:?} is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after \"]\"")?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 && p.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    Ok((host.to_owned(), port))
}

fn parse_socket_query(query: Option<&str>) -> std::result::Result<PathBuf, String> {
    let mut socket = None;
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match param.split_once('=') {
            Some(("socket", value)) if socket.is_none() => socket = Some(percent_decode(value)?),
            Some(("socket", _)) => return Err("socket given twice".into()),
            _ => return Err(format!("unknown query parameter {param:?}")),
        }
    }
    match socket {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err("nbd+unix:// needs ?socket=PATH".into()),
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(
            NbdUri::parse("nbd://example.com/disk").unwrap(),
            tcp("example.com", DEFAULT_PORT, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://10.0.0.1:10900/a/b").unwrap(),
            tcp("10.0.0.1", 10900, "a/b")
        );
        assert_eq!(
            NbdUri::parse("nbd://localhost").unwrap(),
            tcp("localhost", DEFAULT_PORT, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://localhost:1/").unwrap(),
            tcp("localhost", 1, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:2000/x%20y").unwrap(),
            tcp("::1", 2000, "x y")
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]/").unwrap(),
            tcp("fe80::1", DEFAULT_PORT, "")
        );
    }

    #[test]
    fn unix_uris() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap(),
            NbdUri {
                address: Address::Unix {
                    path: "/run/nbd.sock".into()
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd+unix://?socket=/tmp/a%20b").unwrap(),
            NbdUri {
                address: Address::Unix {
                    path: "/tmp/a b".into()
                },
                export: String::new()
            }
        );
    }

    #[test]
    fn malformed_uris_are_invalid_endpoints() {
        for (spec, reason) in [
            ("/var/disk.raw", "not a URI"),
            ("http://h/x", "unknown scheme"),
            ("nbds://h/x", "TLS"),
            ("nbd:///x", "no host"),
            ("nbd://h:/x", "bad port"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:65536/x", "bad port"),
            ("nbd://h:+80/x", "bad port"),
            ("nbd://h:x/", "bad port"),
            ("nbd://[::1/x", "closing"),
            ("nbd://[nothost]/x", "not an IPv6"),
            ("nbd://[::1]x/", "junk"),
            ("nbd://u@h/x", "user"),
            ("nbd://h/x?tls=on", "no query"),
            ("nbd://h/x#f", "fragment"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix:///x?socket=", "socket=PATH"),
            ("nbd+unix:///x?sock=/s", "unknown query"),
            ("nbd+unix:///x?socket=/a&socket=/b", "twice"),
            ("nbd+unix://host/x?socket=/s", "no host"),
        ] {
            match NbdUri::parse(spec) {
                Err(MoverError::InvalidEndpoint { spec: s, reason: r }) => {
                    assert_eq!(s, spec);
                    assert!(r.contains(reason), "{spec}: {r:?} lacks {reason:?}");
                }
                other => panic!("{spec}: {other:?}"),
            }
        }
    }

    #[test]
    fn addresses_display() {
        let show = |s: &str| NbdUri::parse(s).unwrap().address.to_string();
        assert_eq!(show("nbd://[::1]:5/"), "[::1]:5");
        assert_eq!(show("nbd://h/"), "h:10809");
        assert_eq!(show("nbd+unix:///?socket=/s"), "/s");
    }
}
