//! The cgroup a command runs in, where the host lets us make one: `pids.max` (the
//! fork-bomb wall; RLIMIT_NPROC does not bind root) and the memory limit, under the unified
//! (v2) hierarchy or the v1 `pids` and `memory` ones. Made by `patchflow-sandbox-exec`
//! before the walls go up; killed and removed by the agent when the command ends.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The directories of cgroup `name`: one under v2, the `pids` one under v1. (Not v1's
/// `memory`: each v1 hierarchy joined is one more migration, which can wait a whole RCU
/// grace period; RLIMIT_AS bounds memory there.)
fn dirs(name: &str) -> Vec<(PathBuf, &'static str)> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![(root.join("patchflow").join(name), "unified")];
    }
    ["pids"]
        .into_iter()
        .filter(|c| root.join(c).join("cgroup.procs").exists())
        .map(|c| (root.join(c).join("patchflow").join(name), c))
        .collect()
}

/// What joining put in force.
#[derive(Debug, Default)]
pub struct Joined {
    pub pids: bool,
    pub memory: bool,
    /// Why a controller is missing, in words.
    pub missing: Vec<String>,
}

/// Makes cgroup `name` with these limits and moves this process into it.
pub fn join(name: &str, max_pids: u64, max_memory_bytes: u64) -> Joined {
    let mut joined = Joined::default();
    let dirs = dirs(name);
    if dirs.is_empty() {
        joined
            .missing
            .push("a pids cgroup to bound processes (no cgroup hierarchy is mounted)".into());
        return joined;
    }
    let me = std::process::id().to_string();
    for (dir, kind) in dirs {
        let made = (|| -> Result<(), String> {
            let parent = dir.parent().ok_or("bad cgroup path")?;
            if kind == "unified" {
                // The controllers must be enabled for the children of each level.
                let _ = std::fs::write(
                    Path::new(ROOT).join("cgroup.subtree_control"),
                    "+pids +memory",
                );
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+pids +memory");
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            Ok(())
        })();
        if let Err(e) = made {
            joined
                .missing
                .push(format!("a cgroup for the command ({e})"));
            continue;
        }
        let write = |file: &str, value: String| std::fs::write(dir.join(file), value);
        if (kind == "unified" || kind == "pids") && dir.join("pids.max").exists() {
            match write("pids.max", max_pids.to_string()) {
                Ok(()) => joined.pids = true,
                Err(e) => joined
                    .missing
                    .push(format!("a pids cgroup (pids.max: {e})")),
            }
        }
        if kind == "unified" && dir.join("memory.max").exists() {
            match write("memory.max", max_memory_bytes.to_string()) {
                Ok(()) => {
                    let _ = write("memory.swap.max", "0".into());
                    joined.memory = true;
                }
                Err(e) => joined
                    .missing
                    .push(format!("a memory cgroup (memory.max: {e})")),
            }
        }
        if let Err(e) = write("cgroup.procs", me.clone()) {
            joined.pids = false;
            joined.memory = false;
            joined
                .missing
                .push(format!("cannot join {}: {e}", dir.display()));
        }
    }
    if !joined.pids {
        joined.missing.push(
            "a pids cgroup to bound processes (RLIMIT_NPROC stands in, which does not bind root)"
                .into(),
        );
    }
    joined
}

/// Kills whatever runs in cgroup `name`: what a command left behind, including processes
/// that left its process group (`setsid`). The cgroup stays for the task's next command
/// (joining an existing one is cheaper than making one per command).
pub fn kill_members(name: &str) {
    for (dir, _) in dirs(name) {
        if dir.exists() {
            kill_in(&dir);
        }
    }
}

fn kill_in(dir: &Path) {
    {
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            // cgroup v1 has no cgroup.kill: signal every member until none is left.
            for _ in 0..50 {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

/// Kills whatever still runs in cgroup `name` and removes it.
pub fn remove(name: &str) {
    for (dir, _) in dirs(name) {
        if !dir.exists() {
            continue;
        }
        kill_in(&dir);
        let mut removed = false;
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                removed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if !removed {
            tracing::warn!(cgroup = %dir.display(), "cannot remove a shell command's cgroup");
        }
    }
}
