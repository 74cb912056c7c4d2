//! The inside half of a setup's `allow_hosts`: the script runs in an empty network
//! namespace (only loopback), where this forwarder listens on [`FORWARD_ADDR`] and relays
//! each connection to the worker's egress proxy through a unix socket bound into the
//! sandbox. The proxy, outside, decides which hosts a connection may reach; nothing in
//! here can reach anything else, since the namespace has no other interface.
//!
//! `patchflow-sandbox-exec --forward ADDR SOCKET -- COMMAND…`: starts the command, relays
//! until it exits, and exits with its code.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Where the script's HTTP(S)_PROXY points, inside its namespace.
pub const FORWARD_ADDR: &str = "127.0.0.1:3128";

/// Parses `ADDR SOCKET -- COMMAND…` and runs the forwarder; the exit code.
pub fn main(args: &[OsString]) -> u8 {
    let (Some(addr), Some(socket), Some(dashes)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("patchflow-sandbox-exec --forward: ADDR SOCKET -- COMMAND");
        return 126;
    };
    if dashes != "--" || args.len() < 4 {
        eprintln!("patchflow-sandbox-exec --forward: ADDR SOCKET -- COMMAND");
        return 126;
    }
    match run(&addr.to_string_lossy(), Path::new(socket), &args[3..]) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("patchflow-sandbox-exec --forward: {e}");
            126
        }
    }
}

fn run(addr: &str, socket: &Path, command: &[OsString]) -> std::io::Result<u8> {
    let listener = TcpListener::bind(addr)?;
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let socket = socket.clone();
            std::thread::spawn(move || relay(tcp, &socket));
        }
    });
    let (program, rest) = command
        .split_first()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let status = std::process::Command::new(program).args(rest).status()?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => 128u8.saturating_add(u8::try_from(sig).unwrap_or(0)),
        _ => 1,
    })
}

/// Copies both ways between the script's connection and the proxy's socket.
fn relay(tcp: TcpStream, socket: &PathBuf) {
    let Ok(unix) = UnixStream::connect(socket) else {
        let _ = (&tcp).write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let (Ok(tcp2), Ok(unix2)) = (tcp.try_clone(), unix.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || copy(tcp2, unix2));
    copy_back(unix, tcp);
    let _ = up.join();
}

fn copy(mut from: TcpStream, mut to: UnixStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn copy_back(mut from: UnixStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
