//! The seccomp filter every container process runs under.
//!
//! The launcher writes the container's profile into its OCI spec as `linux.seccomp`
//! ([`Profile::for_container`]: berth's default denials, the site's `[security]
//! seccomp_deny`, the fake chown family of a `--remap-root` container, and the mount family
//! for a process holding CAP_SYS_ADMIN in the container's user namespace only), so
//! `--print-spec` shows it and every way into the container reads the same one from the
//! published spec ([`crate::holder::ContainerProcess`]). [`Filter::compile`] turns it into
//! classic BPF, written here rather than through libseccomp (a C library on every node) or a
//! crate: a deny list is a short jump table, and the [`table`] of syscall numbers is
//! generated from the kernel's headers (`sys/gen/syscalls.py`). [`Filter::install`] is the
//! last step of [`crate::process::confine`], after no_new_privs, so the filter holds from the
//! user's command's exec on and every child inherits it.
//!
//! The filter is a deny list, as Docker's, Podman's and crun's default profiles amount to for
//! an unprivileged container: everything is allowed but the calls below. Where those runtimes
//! gate a call on a capability berth's containers never hold in the host's terms
//! (CAP_SYS_MODULE, CAP_SYS_TIME, ...), berth denies it outright. The mount family is the
//! exception: Docker gates it on CAP_SYS_ADMIN, which a container's process may hold in the
//! container's own user namespace, where its mounts stay (see [`MOUNT_FAMILY`]).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod table;

/// Denied in every container, each with the reason. Those that are not namespaced act on
/// the whole node, the rest are kernel attack surface no job needs; runtimes deny them all.
pub const DEFAULT_DENY: &[(&[&str], &str)] = &[
    (
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "query_module",
            "get_kernel_syms",
        ],
        "load or unload kernel code",
    ),
    (
        &["kexec_load", "kexec_file_load", "reboot"],
        "replace or restart the running kernel",
    ),
    (&["swapon", "swapoff"], "change the node's swap"),
    (&["acct"], "switch the node's process accounting"),
    (
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
        "set the node's clock (the clock is not namespaced)",
    ),
    (
        &["syslog"],
        "read the kernel log, which leaks kernel addresses",
    ),
    (&["bpf"], "load BPF programs: a large kernel attack surface"),
    (
        &["userfaultfd"],
        "stall kernel accesses to user memory, the usual aid for exploiting kernel races",
    ),
    (
        &["keyctl", "add_key", "request_key"],
        "use the kernel keyring, which is not namespaced",
    ),
    (
        &["open_by_handle_at"],
        "open files by handle, bypassing the mount tree (the 'shocker' escape)",
    ),
    (
        &["pivot_root"],
        "swap the root: a container's processes have no use for it",
    ),
    (
        &[
            "lookup_dcookie",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "quotactl",
            "quotactl_fd",
        ],
        "obsolete or node-wide interfaces runtimes deny",
    ),
    (
        &["vm86", "vm86old", "iopl", "ioperm"],
        "reach hardware I/O ports or the vm86 mode",
    ),
];

/// Mounting and unmounting, the old calls and the new mount API (util-linux's `mount` uses
/// fsopen/fsconfig/fsmount/move_mount where the kernel has them, and falls back to mount(2)
/// only on ENOSYS). Allowed only to a process that holds CAP_SYS_ADMIN in the container's
/// user namespace (a `--remap-root` container's root, or a task of a container with a UTS
/// namespace of its own, which keeps it to set the hostname: see [`crate::caps::Kept`]), as
/// Docker's default profile allows them only to a CAP_SYS_ADMIN holder; the kernel confines such
/// mounts to the container's mount namespace, which that user namespace owns. Unmounting one
/// of berth's masks there uncovers only what the user may read on the host anyway: behind it
/// the kernel checks the host's credentials, which are the user's (masks matter to Docker,
/// whose container root is the host's root). Anyone else would only get the kernel's EPERM,
/// so they are denied outright there.
pub const MOUNT_FAMILY: &[&str] = &[
    "mount",
    "umount",
    "umount2",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
];

/// Answered with ENOSYS, as Docker does since 25.0, so that programs fall back to the calls
/// they use on kernels without them: io_uring performs I/O on the process's behalf out of
/// any seccomp filter's sight, and has had a long run of kernel CVEs.
pub const DEFAULT_ENOSYS: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// personality(2) arguments allowed, Docker's list: the Linux persona, the 32-bit one,
/// UNAME26 with either, and the query. Anything else (ADDR_NO_RANDOMIZE above all, which
/// turns ASLR off for what is exec'd next) is refused.
pub const PERSONALITY_ALLOWED: [u32; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// In a `--remap-root` container, calls that would change file ownership or switch ids
/// succeed without effect, as enroot's `--root` and pyxis's `container_remap_root` do: the
/// user namespace maps one id, so package managers (apt's `_apt` sandbox, dpkg's chown of
/// every file) would fail on ids that do not exist.
pub const FAKE_CHOWN: &[&str] = &[
    "chown",
    "lchown",
    "fchown",
    "fchownat",
    "chown32",
    "lchown32",
    "fchown32",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "setuid32",
    "setgid32",
    "setreuid32",
    "setregid32",
    "setresuid32",
    "setresgid32",
    "setgroups32",
];
/// Faked too, except for the query `-1`, whose answer (the current id) callers rely on.
const FAKE_FSID: &[&str] = &["setfsuid", "setfsgid", "setfsuid32", "setfsgid32"];

/// Who a container's processes are in its user namespace, which decides the filter's
/// exceptions to the deny list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Privilege {
    /// uid 0 of a one-id user namespace (`--remap-root`): the chown family is faked.
    pub remap_root: bool,
    /// Holds CAP_SYS_ADMIN in the container's user namespace: the [`MOUNT_FAMILY`] is
    /// allowed.
    pub sys_admin: bool,
}

/// OCI's `linux.seccomp`, the part berth writes and enforces. Rules are matched in order,
/// the first whose arguments match decides; a call no rule names is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub default_action: Action,
    /// Only `SECCOMP_FILTER_FLAG_SPEC_ALLOW` is understood.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    #[serde(default)]
    pub syscalls: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub names: Vec<String>,
    pub action: Action,
    /// The errno of [`Action::Errno`]; OCI's default is EPERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    /// All must hold for the rule to apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Arg>,
}

/// `args[index] == value`, compared on the argument's low 32 bits: the calls berth
/// conditions (personality, setfsuid, setfsgid) take 32-bit ints, which is all the kernel
/// reads of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arg {
    pub index: u32,
    pub value: u64,
    pub op: ArgOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    #[serde(rename = "SCMP_ACT_ALLOW")]
    Allow,
    #[serde(rename = "SCMP_ACT_ERRNO")]
    Errno,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArgOp {
    #[serde(rename = "SCMP_CMP_EQ")]
    Eq,
}

const SPEC_ALLOW: &str = "SECCOMP_FILTER_FLAG_SPEC_ALLOW";

fn rule(names: &[&str], action: Action, errno: Option<i32>) -> Rule {
    Rule {
        names: names.iter().map(|n| n.to_string()).collect(),
        action,
        errno_ret: errno.map(|e| e as u32),
        args: Vec::new(),
    }
}

fn when_arg0(mut r: Rule, value: u32) -> Rule {
    r.args = vec![Arg {
        index: 0,
        value: value.into(),
        op: ArgOp::Eq,
    }];
    r
}

impl Profile {
    /// The profile of a container whose processes hold `privilege`: berth's denials (the
    /// [`MOUNT_FAMILY`] among them unless they hold CAP_SYS_ADMIN), then the site's
    /// (`extra_deny`, names checked with [`is_known`]), then for a remapped root the fake
    /// chown family. Denials come first so that a site's denial of, say, `chown` (or
    /// `mount`) wins over faking (or allowing) it.
    pub fn for_container(privilege: Privilege, extra_deny: &[String]) -> Profile {
        let eperm = Some(libc::EPERM);
        let mut syscalls: Vec<Rule> = DEFAULT_DENY
            .iter()
            .map(|(names, _why)| rule(names, Action::Errno, eperm))
            .collect();
        if !privilege.sys_admin {
            syscalls.push(rule(MOUNT_FAMILY, Action::Errno, eperm));
        }
        syscalls.push(rule(DEFAULT_ENOSYS, Action::Errno, Some(libc::ENOSYS)));
        for value in PERSONALITY_ALLOWED {
            syscalls.push(when_arg0(
                rule(&["personality"], Action::Allow, None),
                value,
            ));
        }
        syscalls.push(rule(&["personality"], Action::Errno, eperm));
        if !extra_deny.is_empty() {
            let names: Vec<&str> = extra_deny.iter().map(String::as_str).collect();
            syscalls.push(rule(&names, Action::Errno, eperm));
        }
        if privilege.remap_root {
            syscalls.push(rule(FAKE_CHOWN, Action::Errno, Some(0)));
            syscalls.push(when_arg0(rule(FAKE_FSID, Action::Allow, None), u32::MAX));
            syscalls.push(rule(FAKE_FSID, Action::Errno, Some(0)));
        }
        Profile {
            default_action: Action::Allow,
            // Without it, kernels before 5.16 turn on the speculative store bypass
            // mitigation for every filtered process, a measurable cost to HPC codes; pyxis
            // and enroot ask for the same.
            flags: vec![SPEC_ALLOW.into()],
            syscalls,
        }
    }
}

/// Whether `name` is a syscall of an architecture the filter knows (x86_64 with its i386
/// ABI, aarch64): a site's configuration, shared by nodes of both, may name calls one of
/// them lacks, which are then skipped there, as Docker's profile does.
pub fn is_known(name: &str) -> bool {
    [table::X86_64, table::I386, table::AARCH64]
        .iter()
        .any(|t| number(t, name).is_some())
}

fn number(table: &[(&str, u32)], name: &str) -> Option<u32> {
    table
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table[i].1)
}

// The audit architecture of each ABI (include/uapi/linux/audit.h). A build uses its own
// architecture's; the tests of an x86_64 build use aarch64's as a foreign one.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
/// x32 calls arrive as x86_64 ones with this bit set in the number; the filter's table does
/// not cover their numbers, so they are refused.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// One ABI the filter checks: its audit architecture, its syscall table, and whether x32
/// calls arrive under it.
struct Abi {
    arch: u32,
    table: &'static [(&'static str, u32)],
    x32: bool,
}

#[cfg(target_arch = "x86_64")]
const ABIS: &[Abi] = &[
    Abi {
        arch: AUDIT_ARCH_X86_64,
        table: table::X86_64,
        x32: true,
    },
    Abi {
        arch: AUDIT_ARCH_I386,
        table: table::I386,
        x32: false,
    },
];
#[cfg(target_arch = "aarch64")]
const ABIS: &[Abi] = &[Abi {
    arch: AUDIT_ARCH_AARCH64,
    table: table::AARCH64,
    x32: false,
}];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ABIS: &[Abi] = &[];

/// One classic BPF instruction, `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARGS: u32 = 16;

fn insn(code: u32, jf: u8, k: u32) -> Insn {
    Insn {
        code: code as u16,
        jt: 0,
        jf,
        k,
    }
}

fn load(offset: u32) -> Insn {
    insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, offset)
}

/// If the accumulator equals `k`, go on; else skip `skip` instructions.
fn jeq(k: u32, skip: u8) -> Insn {
    insn(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, skip, k)
}

/// If the accumulator is at least `k`, go on; else skip `skip` instructions.
fn jge(k: u32, skip: u8) -> Insn {
    insn(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, skip, k)
}

fn jump(k: u32) -> Insn {
    insn(libc::BPF_JMP | libc::BPF_JA, 0, k)
}

fn ret(k: u32) -> Insn {
    insn(libc::BPF_RET | libc::BPF_K, 0, k)
}

fn errno(e: u32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e & libc::SECCOMP_RET_DATA)
}

const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

/// A compiled filter, ready for [`Filter::install`]. Compiled before a fork, so the child
/// only hands it to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    program: Vec<Insn>,
    spec_allow: bool,
}

fn invalid(message: String) -> Error {
    Error::Invalid {
        what: "the container's seccomp profile",
        message,
    }
}

/// The instructions that decide one syscall, entered with its number in the accumulator
/// and ending in a return.
fn decide(rules: &[&Rule]) -> Result<Vec<Insn>> {
    let mut out = Vec::new();
    for r in rules {
        let action = match r.action {
            Action::Allow => ALLOW,
            Action::Errno => errno(r.errno_ret.unwrap_or(libc::EPERM as u32)),
        };
        // Each condition loads its argument and skips the rest of this rule if unequal.
        let mut rule = Vec::new();
        for (i, a) in r.args.iter().enumerate() {
            let value = u32::try_from(a.value).map_err(|_| {
                invalid(format!(
                    "{:?}: argument values above 32 bits are not supported",
                    r.names
                ))
            })?;
            if a.index > 5 {
                return Err(invalid(format!(
                    "{:?}: argument index {} (syscalls have 6)",
                    r.names, a.index
                )));
            }
            let left = 2 * (r.args.len() - i - 1) + 1;
            rule.push(load(ARGS + 8 * a.index));
            rule.push(jeq(value, left as u8));
        }
        rule.push(ret(action));
        out.extend(rule);
        if r.args.is_empty() {
            // Unconditional: later rules of this call can never apply.
            return Ok(out);
        }
    }
    out.push(ret(ALLOW));
    Ok(out)
}

impl Filter {
    /// Compiles `profile` for the architectures of this build. A name no architecture
    /// knows, an action or flag berth does not enforce, is an error rather than a rule
    /// silently dropped.
    pub fn compile(profile: &Profile) -> Result<Filter> {
        if profile.default_action != Action::Allow {
            return Err(invalid(
                "only SCMP_ACT_ALLOW is supported as the default action".into(),
            ));
        }
        let mut spec_allow = false;
        for flag in &profile.flags {
            if flag != SPEC_ALLOW {
                return Err(invalid(format!("unsupported flag {flag:?}")));
            }
            spec_allow = true;
        }
        for name in profile.syscalls.iter().flat_map(|r| &r.names) {
            if !is_known(name) {
                return Err(invalid(format!("unknown syscall {name:?}")));
            }
        }
        if ABIS.is_empty() {
            return Err(invalid(
                "berth has no syscall table for this architecture".into(),
            ));
        }
        let mut sections = Vec::new();
        for abi in ABIS {
            sections.push(Self::section(abi, &profile.syscalls)?);
        }
        // Dispatch on the architecture; one that no section covers gets ENOSYS, so its
        // numbers are never read against another ABI's table.
        // Layout: load, (jeq arch, jump to its section) per ABI, ENOSYS, the sections.
        let mut program = vec![load(ARCH)];
        let sections_start = 2 * sections.len() + 2;
        let mut offset = 0;
        for (i, (abi, section)) in ABIS.iter().zip(&sections).enumerate() {
            program.push(jeq(abi.arch, 1));
            // A jump lands `k` instructions past the one after it (at 2i + 3).
            program.push(jump((sections_start + offset - (2 * i + 3)) as u32));
            offset += section.len();
        }
        program.push(ret(errno(libc::ENOSYS as u32)));
        for section in sections {
            program.extend(section);
        }
        if program.len() > 4096 {
            return Err(invalid(format!(
                "{} instructions, more than the kernel's 4096",
                program.len()
            )));
        }
        Ok(Filter {
            program,
            spec_allow,
        })
    }

    /// The checks for one ABI: the x32 refusal, then one block per syscall named.
    fn section(abi: &Abi, rules: &[Rule]) -> Result<Vec<Insn>> {
        let mut out = vec![load(NR)];
        if abi.x32 {
            out.push(jge(X32_SYSCALL_BIT, 1));
            out.push(ret(errno(libc::ENOSYS as u32)));
        }
        let mut by_number: std::collections::BTreeMap<u32, Vec<&Rule>> = Default::default();
        for r in rules {
            for name in &r.names {
                if let Some(nr) = number(abi.table, name) {
                    let entry = by_number.entry(nr).or_default();
                    if !entry.iter().any(|seen| std::ptr::eq(*seen, r)) {
                        entry.push(r);
                    }
                }
            }
        }
        for (nr, rules) in by_number {
            let block = decide(&rules)?;
            let skip = u8::try_from(block.len()).map_err(|_| {
                invalid(format!("too many rules for syscall {nr} ({})", block.len()))
            })?;
            out.push(jeq(nr, skip));
            out.extend(block);
        }
        out.push(ret(ALLOW));
        Ok(out)
    }

    /// Installs the filter on the calling thread; no_new_privs must already be set (berth
    /// holds no privilege that would let it skip that). It holds across exec and for every
    /// child from here on.
    pub fn install(&self) -> Result<()> {
        let mut insns: Vec<libc::sock_filter> = self
            .program
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        let prog = libc::sock_fprog {
            len: insns.len() as u16,
            filter: insns.as_mut_ptr(),
        };
        let set = |flags: libc::c_ulong| {
            // SAFETY: `prog` points at `insns`, alive for the call; the kernel copies the
            // program and keeps no pointer to it.
            unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    flags,
                    &prog as *const libc::sock_fprog,
                )
            }
        };
        let mut r = if self.spec_allow {
            set(libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW)
        } else {
            -1
        };
        // Kernels before 4.17 know no SPEC_ALLOW (EINVAL): go without.
        if r != 0 {
            r = set(0);
        }
        if r != 0 {
            return Err(Error::os("seccomp(SECCOMP_SET_MODE_FILTER)")(
                nix::errno::Errno::last(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
