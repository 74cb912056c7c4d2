//! Which git remotes a worker may reach. A `git_url` is a request the worker makes on a
//! user's behalf, so before any packet leaves, its host is resolved and refused when an
//! address is not public (loopback, private, link-local, CGNAT, unique-local, multicast,
//! unspecified: every spelling, since the URL is parsed as WHATWG does, which folds
//! `2130706433`, `0x7f.1` and `127.1` into `127.0.0.1`), unless the operator names the host
//! in `git_allowed_hosts`. The checked address is handed to git (`http.curloptResolve`), so
//! a second DNS answer cannot switch the connection to another address (DNS rebinding).
//!
//! Local sources (`file://`, paths) are not remotes: `allow_local_sources` governs them.
//! Credentials in a URL are refused where every source is checked, `TaskSource::validate`
//! (at submit, and again by the worker before it asks this module).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Why a remote is refused, in words for the task's message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RemoteRefused {
    #[error("`{0}` is not a git URL this worker can parse")]
    Unparsable(String),
    #[error(
        "git_url uses {scheme}, which this worker does not allow (git_allowed_protocols = {allowed})"
    )]
    Protocol { scheme: String, allowed: String },
    #[error(
        "git host {host} resolves to {addr}, which is not a public address; \
         an operator may allow the host with git_allowed_hosts"
    )]
    NotPublic { host: String, addr: IpAddr },
    #[error("cannot resolve git host {host}: {reason}")]
    Unresolvable { host: String, reason: String },
}

/// What the operator allows (`git_allowed_protocols`, `git_allowed_hosts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePolicy {
    /// Lower-case schemes: `https`, `http`, `ssh`, `git`.
    pub protocols: Vec<String>,
    /// `host` or `host:port` entries whose addresses are not checked.
    pub allowed_hosts: Vec<String>,
}

impl RemotePolicy {
    /// From the comma-separated settings.
    pub fn from_settings(protocols: &str, allowed_hosts: &str) -> Self {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(|p| p.trim().to_ascii_lowercase())
                .filter(|p| !p.is_empty())
                .collect()
        };
        Self {
            protocols: list(protocols),
            allowed_hosts: list(allowed_hosts),
        }
    }

    fn host_allowed(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        self.allowed_hosts.iter().any(|entry| {
            let entry = entry.trim_matches(['[', ']']);
            entry == host || entry == format!("{host}:{port}")
        })
    }
}

/// A remote git URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRemote {
    /// `https`, `http`, `ssh` or `git` (scp-like `user@host:path` is `ssh`).
    pub scheme: String,
    /// The host as the URL spells it after WHATWG parsing (IPv4 literals normalised).
    pub host: String,
    pub port: u16,
    /// A literal address in the URL, if it is one.
    literal: Option<IpAddr>,
}

/// A remote that passed the checks, with the address git must connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRemote {
    pub remote: GitRemote,
    /// `None` when the host is on the allow-list (git resolves it itself).
    pub pinned: Option<SocketAddr>,
}

impl CheckedRemote {
    /// The `git -c` settings that make git connect only to the checked address.
    pub fn git_config(&self) -> Vec<String> {
        match (&self.pinned, self.remote.literal) {
            // A literal address needs no resolving; only names can be rebound.
            (Some(addr), None) if matches!(self.remote.scheme.as_str(), "http" | "https") => {
                vec![format!(
                    "http.curloptResolve={}:{}:{}",
                    self.remote.host,
                    self.remote.port,
                    match addr.ip() {
                        IpAddr::V6(v6) => format!("[{v6}]"),
                        IpAddr::V4(v4) => v4.to_string(),
                    }
                )]
            }
            _ => Vec::new(),
        }
    }
}

impl GitRemote {
    /// Parses a remote URL (`scheme://…` or scp-like `user@host:path`).
    pub fn parse(url: &str) -> Result<Self, RemoteRefused> {
        let unparsable = || RemoteRefused::Unparsable(url.to_string());
        if !url.contains("://") {
            // scp-like: `user@host:path`. The user is a login name, not a secret.
            let (user_host, _path) = url.split_once(':').ok_or_else(unparsable)?;
            let host = user_host.rsplit_once('@').map_or(user_host, |(_, h)| h);
            return Self::parse(&format!("ssh://{host}/"));
        }
        let parsed = url::Url::parse(url).map_err(|_| unparsable())?;
        let scheme = parsed.scheme().to_ascii_lowercase();
        let port = parsed
            .port_or_known_default()
            .unwrap_or(match scheme.as_str() {
                "ssh" => 22,
                "git" => 9418,
                _ => 443,
            });
        let (host, literal) = match parsed.host().ok_or_else(unparsable)? {
            url::Host::Domain(d) => (d.to_ascii_lowercase(), None),
            url::Host::Ipv4(v4) => (v4.to_string(), Some(IpAddr::V4(v4))),
            url::Host::Ipv6(v6) => (format!("[{v6}]"), Some(IpAddr::V6(v6))),
        };
        Ok(Self {
            scheme,
            host,
            port,
            literal,
        })
    }

    /// Applies the policy: the scheme, then the addresses the host resolves to.
    pub async fn check(self, policy: &RemotePolicy) -> Result<CheckedRemote, RemoteRefused> {
        if !policy.protocols.contains(&self.scheme) {
            return Err(RemoteRefused::Protocol {
                scheme: self.scheme.clone(),
                allowed: policy.protocols.join(","),
            });
        }
        if policy.host_allowed(&self.host, self.port) {
            return Ok(CheckedRemote {
                remote: self,
                pinned: None,
            });
        }
        let addrs: Vec<SocketAddr> = match self.literal {
            Some(ip) => vec![SocketAddr::new(ip, self.port)],
            None => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| RemoteRefused::Unresolvable {
                    host: self.host.clone(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        // Every address must be public: a name that answers with one private address
        // among public ones would otherwise be a way in.
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(RemoteRefused::NotPublic {
                host: self.host.clone(),
                addr: bad.ip(),
            });
        }
        let pinned = addrs
            .first()
            .copied()
            .ok_or_else(|| RemoteRefused::Unresolvable {
                host: self.host.clone(),
                reason: "no address".into(),
            })?;
        Ok(CheckedRemote {
            remote: self,
            pinned: Some(pinned),
        })
    }
}

/// Whether an address is one a worker may reach on a user's behalf.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let cgnat = a == 100 && (64..128).contains(&b);
    let this_network = a == 0;
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || cgnat
        || this_network)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // IPv4-compatible (::a.b.c.d, deprecated) addresses could smuggle a private IPv4.
    let v4_compatible = ip.segments()[..6].iter().all(|s| *s == 0);
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || v4_compatible)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &str) -> RemotePolicy {
        RemotePolicy::from_settings("https,http", hosts)
    }

    #[tokio::test]
    async fn every_spelling_of_a_private_address_is_refused() {
        for url in [
            "http://127.0.0.1:9/r.git",
            "http://localhost:9/r.git",
            "http://2130706433:9/r.git",
            "http://0x7f000001:9/r.git",
            "http://0x7f.1:9/r.git",
            "http://127.1:9/r.git",
            "http://017700000001:9/r.git",
            "http://[::1]:9/r.git",
            "http://[::ffff:127.0.0.1]:9/r.git",
            "http://[::ffff:7f00:1]:9/r.git",
            "http://[::127.0.0.1]:9/r.git",
            "http://0.0.0.0:9/r.git",
            "http://10.1.2.3/r.git",
            "http://172.16.0.1/r.git",
            "http://192.168.1.1/r.git",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/r.git",
            "http://[fd00::1]/r.git",
            "http://[fe80::1]/r.git",
            "http://224.0.0.1/r.git",
        ] {
            let e = GitRemote::parse(url)
                .unwrap()
                .check(&policy(""))
                .await
                .unwrap_err();
            assert!(matches!(e, RemoteRefused::NotPublic { .. }), "{url}: {e}");
            assert!(e.to_string().contains("git_allowed_hosts"), "{e}");
        }
    }

    #[tokio::test]
    async fn an_allowed_host_and_a_public_address_pass_and_names_are_pinned() {
        let ok = GitRemote::parse("http://127.0.0.1:8080/r.git")
            .unwrap()
            .check(&policy("127.0.0.1:8080"))
            .await
            .unwrap();
        assert_eq!(ok.pinned, None);
        assert!(ok.git_config().is_empty());
        // The port is part of an entry that names one.
        assert!(
            GitRemote::parse("http://127.0.0.1:8081/r.git")
                .unwrap()
                .check(&policy("127.0.0.1:8080"))
                .await
                .is_err()
        );
        let public = GitRemote::parse("https://203.0.113.7/o/r.git")
            .unwrap()
            .check(&policy(""))
            .await
            .unwrap();
        assert_eq!(public.pinned, Some("203.0.113.7:443".parse().unwrap()));
        // A literal address cannot be rebound; nothing to pin.
        assert!(public.git_config().is_empty());
        let named = CheckedRemote {
            remote: GitRemote::parse("https://git.example/o/r.git").unwrap(),
            pinned: Some("203.0.113.7:443".parse().unwrap()),
        };
        assert_eq!(
            named.git_config(),
            vec!["http.curloptResolve=git.example:443:203.0.113.7"]
        );
    }

    #[tokio::test]
    async fn protocols_are_refused_before_any_lookup() {
        let ssh = GitRemote::parse("git@github.com:o/r.git").unwrap();
        assert_eq!((ssh.scheme.as_str(), ssh.port), ("ssh", 22));
        let e = ssh.check(&policy("")).await.unwrap_err();
        assert!(
            e.to_string().contains("ssh") && e.to_string().contains("git_allowed_protocols"),
            "{e}"
        );
        assert!(GitRemote::parse("not a url").is_err());
    }
}
