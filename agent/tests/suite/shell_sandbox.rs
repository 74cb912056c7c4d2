//! `run_shell_command` in the OS sandbox: writes outside the workspace fail, the network
//! is off unless the policy allows it, a fork bomb and a sleeper end at their limits, and
//! the workspace is intact afterwards.

use patchflow_agent::ToolDispatch;
use serde_json::{Value, json};

use super::support::{Setup, TestServer, fixture, sandbox};

async fn sh(fx: &super::support::Fixture, cmd: &str, timeout: u64) -> Value {
    let args = json!({"command_string": cmd, "timeout_seconds": timeout}).to_string();
    fx.tools.call("run_shell_command", &args).await.value
}

#[tokio::test]
async fn every_layer_is_in_force_on_this_kernel() {
    let scratch = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let report = sandbox(scratch.path(), false, 64)
        .probe(ws.path())
        .await
        .unwrap();
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    assert_eq!(report.walls, "namespaces");
    assert!(report.mount_namespace && report.pid_namespace && report.user_namespace);
    assert!(report.no_capabilities && report.new_session && report.network_confined);
    assert!(report.no_new_privs && report.rlimits && report.seccomp && report.pids_cgroup);
}

#[tokio::test]
async fn strict_mode_refuses_commands_where_bubblewrap_is_missing_and_best_effort_falls_back() {
    let scratch = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let mut strict = sandbox(scratch.path(), false, 64);
    strict.bwrap = None;
    let e = strict.probe(ws.path()).await.unwrap_err().to_string();
    assert!(e.contains("bubblewrap is not installed"), "{e}");
    let mut lax = sandbox(scratch.path(), false, 64);
    lax.bwrap = None;
    lax.mode = patchflow_agent::sandbox::SandboxMode::BestEffort;
    let report = lax.probe(ws.path()).await.unwrap();
    assert_eq!(report.walls, "landlock");
    assert!(
        report.landlock && report.seccomp && report.no_capabilities,
        "{report:?}"
    );
    assert!(!report.mount_namespace && !report.pid_namespace);
    assert!(
        report.missing.iter().any(|m| m.contains("bubblewrap")),
        "{report:?}"
    );
}

/// Runs `cmd` through `sandbox-exec` under the fallback walls and without the network
/// namespace, so only seccomp and Landlock's TCP rules stand between it and the network.
#[allow(clippy::unwrap_used)]
fn without_netns(cmd: &str, files: &[(&str, &str)]) -> std::process::Output {
    let (scratch, ws) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The fallback's Landlock rules let the command read only the workspace (and the
    // system), so what it runs goes there.
    for (name, text) in files {
        std::fs::write(ws.path().join(name), text).unwrap();
    }
    let mut sb = sandbox(scratch.path(), false, 64);
    sb.mode = patchflow_agent::sandbox::SandboxMode::BestEffort;
    let walls = patchflow_agent::sandbox::Walls {
        namespaces: false,
        report: Default::default(),
        refused: None,
    };
    let name = format!("skip-netns-{}-{}", std::process::id(), cmd.len());
    let out = std::process::Command::new(&sb.program)
        .args(sb.exec_args(ws.path(), &name, 10, &walls, false))
        .args(["--skip-netns", "--", "/bin/bash", "-c", cmd])
        .current_dir(ws.path())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .output()
        .unwrap();
    patchflow_agent::sandbox::remove_cgroup(&name);
    out
}

#[tokio::test]
async fn seccomp_refuses_ip_sockets_even_without_a_network_namespace() {
    // UDP: Landlock has no rule for it, so only the seccomp filter can refuse this.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let port = udp.local_addr().unwrap().port();
    let out = without_netns(&format!("echo leak > /dev/udp/127.0.0.1/{port}"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut buf = [0u8; 16];
    assert!(udp.recv(&mut buf).is_err(), "a datagram left the sandbox");

    // TCP and IPv6 fail at socket(), before any connect; a Unix socket pair still works.
    let server = TestServer::start().await;
    let port = server.addr.port();
    let script = "import socket\n\
         for fam in (socket.AF_INET, socket.AF_INET6):\n\
         \ttry:\n\
         \t\tsocket.socket(fam, socket.SOCK_STREAM)\n\
         \t\tprint('open', fam)\n\
         \texcept PermissionError:\n\
         \t\tprint('refused', int(fam))\n\
         a, b = socket.socketpair()\n\
         a.send(b'unix ok')\n\
         print(b.recv(16).decode())\n";
    let out = without_netns(
        &format!("python3 sockets.py; exec 3<>/dev/tcp/127.0.0.1/{port}"),
        &[("sockets.py", script)],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "refused 2\nrefused 10\nunix ok\n", "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn shell_writes_only_inside_the_workspace_and_temp_dir() {
    let fx = fixture(Setup::default());
    // A directory of the host the command does not see at all (under /tmp, which is a
    // private tmpfs inside), and one it sees read-only (a toolchain home, /usr).
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped");
    let out = sh(&fx, &format!("touch {}", target.display()), 10).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(!target.exists());
    let out = sh(&fx, "touch /usr/escaped", 10).await;
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            .contains("Read-only file system"),
        "{out}"
    );
    let out = sh(
        &fx,
        "touch inside.txt && echo hi > \"$TMPDIR/t\" && cat \"$TMPDIR/t\" && echo private > /tmp/own && cat /tmp/own",
        10,
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "hi\nprivate\n");
    assert!(fx.ws().join("inside.txt").exists());
    assert!(fx.scratch.path().join("t").exists());
    assert!(!std::path::Path::new("/tmp/own").exists());
}

#[tokio::test]
async fn a_command_sees_a_minimal_root_its_own_processes_and_no_privilege() {
    let fx = fixture(Setup::default());
    // The host's home, data and run directories are not there; /etc is, with what only
    // root may read hidden.
    let out = sh(
        &fx,
        "ls -a /; ls /run /var /sys /root/.ssh /home 2>&1; cat /etc/shadow 2>&1 | head -c 40; echo",
        10,
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    for gone in ["/run", "/var", "/sys", "/root/.ssh", "/home"] {
        assert!(
            stdout.contains(&format!("cannot access '{gone}'")),
            "{gone} is visible: {out}"
        );
    }
    assert!(!stdout.contains("root:"), "/etc/shadow was read: {out}");
    // Only its own processes: `kill -9 -1` ends nothing outside, and the test (the agent's
    // stand-in) lives on to check.
    let out = sh(
        &fx,
        "sleep 30 & ls /proc | grep -c '^[0-9]'; kill -9 -1; echo after",
        10,
    )
    .await;
    let lines: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    let seen: u32 = lines[0].parse().unwrap();
    assert!(seen <= 5, "the command sees {seen} processes: {out}");
    // Capabilities, privileges, terminal, ptrace and friends.
    let out = sh(
        &fx,
        "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; id -u; \
         python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); print(\"ptrace\", l.ptrace(16, 1, 0, 0), os.strerror(ctypes.get_errno()))'; \
         python3 -c 'import fcntl,termios,os; fd=os.open(\"/dev/ptmx\", os.O_RDWR); fcntl.ioctl(fd, termios.TIOCSTI, b\"x\")' 2>&1 | tail -1; \
         unshare -U true 2>&1; tty",
        10,
    )
    .await;
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(stdout.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(
        stdout.contains("NoNewPrivs:\t1") && stdout.contains("Seccomp:\t2"),
        "{out}"
    );
    if nix::unistd::Uid::effective().is_root() {
        assert!(
            stdout.contains("\n1000\n"),
            "a root worker's command is not uid 1000: {out}"
        );
    }
    assert!(
        stdout.contains("ptrace -1 Operation not permitted"),
        "{out}"
    );
    assert!(
        stdout.contains("PermissionError") || stdout.contains("Operation not permitted"),
        "TIOCSTI: {out}"
    );
    assert!(
        stdout.contains("unshare failed") || stdout.contains("Operation not permitted"),
        "{out}"
    );
    assert!(stdout.contains("not a tty"), "{out}");
}

#[tokio::test]
async fn shell_reports_exit_and_sees_only_the_minimal_environment() {
    let fx = fixture(Setup::default());
    let out = sh(&fx, "echo hi; echo oops >&2; exit 3", 10).await;
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["stderr"], "oops\n");
    let out = sh(&fx, "env", 10).await;
    assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
    let allowed = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "TERM",
        "PAGER",
        "GIT_PAGER",
        "PYTHONDONTWRITEBYTECODE",
        "CI",
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    ];
    for line in out["stdout"].as_str().unwrap().lines() {
        let key = line.split('=').next().unwrap_or_default();
        assert!(
            allowed.contains(&key),
            "`{key}` leaked into the shell environment"
        );
    }
}

const CONNECT: &str =
    "exec 3<>/dev/tcp/127.0.0.1/PORT && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 12 <&3";

#[tokio::test]
async fn shell_network_is_off_unless_the_policy_allows_it() {
    let server = TestServer::start().await;
    let cmd = CONNECT.replace("PORT", &server.addr.port().to_string());
    let off = fixture(Setup::default());
    let out = sh(&off, &cmd, 10).await;
    assert_ne!(out["exit_code"], 0, "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            // The seccomp filter refuses the socket before the empty namespace is reached.
            .contains("Permission denied"),
        "{out}"
    );
    assert_eq!(server.connections(), 0);
    let on = fixture(Setup {
        network: true,
        ..Setup::default()
    });
    let out = sh(&on, &cmd, 10).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["stdout"], "HTTP/1.1 200");
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn fork_bomb_and_sleeper_end_at_their_limits_and_the_workspace_survives() {
    let fx = fixture(Setup {
        max_processes: 32,
        ..Setup::default()
    });
    let before = std::fs::read_to_string(fx.ws().join("a.py")).unwrap();
    let out = sh(&fx, "bomb() { bomb | bomb; }; bomb", 3).await;
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("Resource temporarily unavailable"),
        "the process limit did not bind: {out}"
    );
    let out = sh(&fx, "sleep 1000", 1).await;
    assert_eq!(out["timed_out"], true, "{out}");
    assert_eq!(out["error"], "command timed out after 1 s and was killed");
    // The next command works, and neither left a cgroup (with processes) behind.
    let out = sh(&fx, "echo still-here", 10).await;
    assert_eq!(out["stdout"], "still-here\n", "{out}");
    assert_eq!(
        std::fs::read_to_string(fx.ws().join("a.py")).unwrap(),
        before
    );
    // Nothing is left running in the run's cgroup, and it goes with the sandbox.
    let dir = ["/sys/fs/cgroup/patchflow", "/sys/fs/cgroup/pids/patchflow"]
        .iter()
        .map(|d| std::path::Path::new(d).join(fx.tools.sandbox().cgroup_name()))
        .find(|d| d.exists())
        .expect("the run's cgroup");
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(procs.trim().is_empty(), "left running: {procs}");
    drop(fx);
    assert!(!dir.exists(), "the run's cgroup outlived it");
}
