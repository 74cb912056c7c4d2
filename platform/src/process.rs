//! Child-process hygiene shared by everything that spawns long-lived children (the agent,
//! the Temporal dev server): own process group, death with the parent, group-wide kill.

use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Makes the child get SIGKILL if the process that spawned it dies (even by SIGKILL), so a
/// crashed worker leaves no orphan agent or server behind. Linux only.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec. It only calls prctl(2),
    // which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to a whole process group; a group that is already gone is not an error.
pub fn signal_group(pgid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

/// Stops a child that leads its own process group: SIGTERM to the group, then SIGKILL after
/// `grace` if it has not exited. Waits for the child so nothing is left as a zombie.
pub async fn stop_group(child: &mut tokio::process::Child, grace: Duration) {
    let Some(pid) = child.id() else {
        let _ = child.wait().await;
        return;
    };
    signal_group(pid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    // Anything the leader left behind in its group.
    signal_group(pid, Signal::SIGKILL);
}

/// This process as Temporal knows it, `patchflow@<host>:<pid>`: the identity of its worker
/// and client, and the `worker` a task's attempt names.
pub fn worker_identity() -> &'static str {
    static IDENTITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(|| {
        format!(
            "patchflow@{}:{}",
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "host".into()),
            std::process::id()
        )
    })
}
