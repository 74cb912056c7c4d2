//! The egress proxy of a setup with `allow_hosts`: the worker's half. It listens on a unix
//! socket that is bound into the script's sandbox (where
//! [`patchflow_agent::sandbox::forward`] relays the script's `HTTP(S)_PROXY` connections to
//! it) and lets through only `CONNECT host:port` (HTTPS) and absolute-URI HTTP requests to
//! the hosts named, each resolved to public addresses only. Anything else is answered
//! `403` with the reason, which the script's output then shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Largest request head read from the script.
const MAX_HEAD: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A running proxy; stops when dropped.
pub struct EgressProxy {
    pub socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Whether `host` is one `allow` names: exactly, or under a `*.` entry (`*.example.com`
/// matches `a.example.com`, not `example.com`). Case does not matter.
pub fn allowed(allow: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    allow.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == a,
        }
    })
}

/// Starts the proxy on `dir/proxy.sock` for the hosts `allow` names.
pub fn start(dir: &Path, allow: Vec<String>) -> std::io::Result<EgressProxy> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("proxy.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    // The sandbox's uid differs from ours: it must be able to connect.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777))?;
    }
    let allow = Arc::new(allow);
    let task = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                break;
            };
            let allow = allow.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(conn, &allow).await {
                    tracing::debug!(error = %e, "egress proxy connection");
                }
            });
        }
    });
    Ok(EgressProxy { socket, task })
}

async fn refuse(conn: &mut UnixStream, why: &str) -> std::io::Result<()> {
    tracing::info!(reason = why, "egress proxy refused a connection");
    // The reason goes in the status line too: clients show that for a refused CONNECT.
    let why: String = why.chars().filter(|c| !c.is_control()).collect();
    let body = format!("patchflow egress proxy: {why}\n");
    let answer = format!(
        "HTTP/1.1 403 Forbidden by the patchflow egress proxy: {why}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(answer.as_bytes()).await
}

async fn serve(mut conn: UnixStream, allow: &[String]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        let mut chunk = [0u8; 2048];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return refuse(&mut conn, "request head too large").await;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end..].to_vec();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return refuse(&mut conn, "not an HTTP proxy request").await;
    };
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let (authority, path) = if connect {
        (target.to_string(), String::new())
    } else if let Some(after) = target.strip_prefix("http://") {
        match after.split_once('/') {
            Some((a, p)) => (a.to_string(), format!("/{p}")),
            None => (after.to_string(), "/".to_string()),
        }
    } else {
        return refuse(&mut conn, "only CONNECT and http:// requests go through").await;
    };
    if authority.starts_with('[') {
        return refuse(
            &mut conn,
            &format!("`{authority}`: hosts are allowed by name only"),
        )
        .await;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(port) => (h.to_string(), port),
            Err(_) => return refuse(&mut conn, "bad port").await,
        },
        None if connect => return refuse(&mut conn, "CONNECT needs host:port").await,
        None => (authority.clone(), 80),
    };
    if host.parse::<std::net::IpAddr>().is_ok() {
        return refuse(
            &mut conn,
            &format!("`{host}`: hosts are allowed by name only"),
        )
        .await;
    }
    if !allowed(allow, &host) {
        return refuse(&mut conn, &format!("host `{host}` is not in allow_hosts")).await;
    }
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(a) => a
            .filter(|a| patchflow_platform::git_remote::is_public(a.ip()))
            .collect(),
        Err(e) => return refuse(&mut conn, &format!("cannot resolve `{host}`: {e}")).await,
    };
    let Some(addr) = addrs.first() else {
        return refuse(
            &mut conn,
            &format!("`{host}` resolves to no public address"),
        )
        .await;
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        _ => return refuse(&mut conn, &format!("cannot connect to `{host}:{port}`")).await,
    };
    if connect {
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
    } else {
        // Origin-form to the server; the proxy's own headers stay here.
        let mut out = format!("{method} {path} {version}\r\n");
        for line in lines.filter(|l| !l.is_empty()) {
            let name = line.split(':').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("proxy-connection")
                || name.eq_ignore_ascii_case("proxy-authorization")
            {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        upstream.write_all(out.as_bytes()).await?;
    }
    if !rest.is_empty() {
        upstream.write_all(&rest).await?;
    }
    tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_hosts_and_their_wildcards_match() {
        let allow = vec!["pypi.org".to_string(), "*.pythonhosted.org".to_string()];
        assert!(allowed(&allow, "pypi.org"));
        assert!(allowed(&allow, "PyPI.org."));
        assert!(allowed(&allow, "files.pythonhosted.org"));
        assert!(!allowed(&allow, "pythonhosted.org"));
        assert!(!allowed(&allow, "evilpypi.org"));
        assert!(!allowed(&allow, "pypi.org.evil.com"));
        assert!(!allowed(&allow, "xpythonhosted.org"));
    }

    async fn ask(socket: &Path, request: &str) -> String {
        let mut s = UnixStream::connect(socket).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn hostile_requests_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(
            dir.path(),
            vec!["allowed.example".into(), "localhost".into()],
        )
        .unwrap();
        for (req, why) in [
            (
                "CONNECT evil.example:443 HTTP/1.1\r\n\r\n",
                "not in allow_hosts",
            ),
            ("CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n", "by name only"),
            ("CONNECT [::1]:22 HTTP/1.1\r\n\r\n", "by name only"),
            (
                "GET https://allowed.example/ HTTP/1.1\r\n\r\n",
                "only CONNECT",
            ),
            (
                "GET http://evil.example/x HTTP/1.1\r\n\r\n",
                "not in allow_hosts",
            ),
            // Allowed by name, but it resolves to loopback: never reached.
            (
                "CONNECT localhost:6379 HTTP/1.1\r\n\r\n",
                "no public address",
            ),
            ("garbage\r\n\r\n", "not an HTTP proxy request"),
        ] {
            let answer = ask(&proxy.socket, req).await;
            assert!(answer.starts_with("HTTP/1.1 403"), "{req}: {answer}");
            assert!(answer.contains(why), "{req}: {answer}");
        }
        let big = format!(
            "GET http://allowed.example/ HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD + 10)
        );
        assert!(ask(&proxy.socket, &big).await.contains("too large"));
    }
}
