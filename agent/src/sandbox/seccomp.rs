//! The seccomp filters every command runs under (compiled by seccompiler; loaded by
//! bubblewrap just before it runs the command, or applied in-process by the fallback):
//!
//! - socket families are an allow-list: AF_UNIX, plus AF_INET and AF_INET6 when the task's
//!   policy allows network; any other `socket()`/`socketpair()` fails with EACCES;
//! - the calls that reach other processes, the kernel's key store, BPF, performance
//!   counters, mounts and new namespaces, and io_uring (whose operations bypass the
//!   socket rule) fail with EPERM, and so do the terminal ioctls that inject input
//!   (TIOCSTI, TIOCLINUX);
//! - `clone3` fails with ENOSYS (its flags are behind a pointer a filter cannot read), so
//!   libc falls back to `clone`, whose namespace flags the filter does see.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

fn err(e: impl std::fmt::Display) -> String {
    format!("seccomp: {e}")
}

/// Refused outright, with EPERM.
const DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_open_by_handle_at,
];

/// `clone` flags that would make a namespace.
const NAMESPACE_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> Result<TargetArch, String> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| format!("seccomp: no filter for {}", std::env::consts::ARCH))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
) -> Result<BpfProgram, String> {
    SeccompFilter::new(rules, SeccompAction::Allow, action, arch()?)
        .and_then(TryInto::try_into)
        .map_err(err)
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, len, op, value).map_err(err)
}

/// The filters, in the order they are loaded. `network`: the task's policy allows IP.
pub fn filters(network: bool) -> Result<Vec<BpfProgram>, String> {
    // 1. EPERM: the denied calls, `clone` with a namespace flag, injecting ioctls.
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompRule::new(vec![cond(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
            .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    let ioctl_rules = [libc::TIOCSTI, libc::TIOCLINUX]
        .iter()
        .map(|&req| {
            SeccompRule::new(vec![cond(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                req,
            )?])
            .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_ioctl, ioctl_rules);
    let denied = compile(denied, SeccompAction::Errno(libc::EPERM as u32))?;

    // 2. ENOSYS for clone3, so libc uses clone.
    let clone3 = compile(
        [(libc::SYS_clone3, Vec::new())].into(),
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;

    // 3. EACCES for a socket family off the allow-list.
    let mut allowed = vec![libc::AF_UNIX];
    if network {
        allowed.extend([libc::AF_INET, libc::AF_INET6]);
    }
    let off_list = || -> Result<Vec<SeccompRule>, String> {
        let conds = allowed
            .iter()
            .map(|&f| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, f as u64))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(vec![SeccompRule::new(conds).map_err(err)?])
    };
    let sockets = compile(
        [
            (libc::SYS_socket, off_list()?),
            (libc::SYS_socketpair, off_list()?),
        ]
        .into(),
        SeccompAction::Errno(libc::EACCES as u32),
    )?;
    Ok(vec![denied, clone3, sockets])
}

/// A filter as the bytes of its `sock_filter` array (what bubblewrap reads from a fd).
pub fn to_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}

/// Loads the filters into this process (the fallback; `no_new_privs` must be set first).
pub fn apply(network: bool) -> Result<(), String> {
    for f in filters(network)? {
        seccompiler::apply_filter(&f).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_this_machine_with_and_without_network() {
        let without = filters(false).unwrap();
        let with = filters(true).unwrap();
        assert_eq!(without.len(), 3);
        // The socket filter compares against more allowed families with network.
        assert!(with[2].len() > without[2].len());
        assert_eq!(to_bytes(&without[0]).len(), without[0].len() * 8);
    }
}
