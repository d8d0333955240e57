use super::*;

/// What the kernel would answer: the program run over one `struct seccomp_data`, by a
/// minimal classic-BPF interpreter of the instructions the compiler emits.
fn run(f: &Filter, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let word = |offset: u32| -> u32 {
        match offset {
            NR => nr,
            ARCH => arch,
            o if (ARGS..ARGS + 48).contains(&o) => {
                let a = args[((o - ARGS) / 8) as usize];
                if (o - ARGS).is_multiple_of(8) {
                    a as u32
                } else {
                    (a >> 32) as u32
                }
            }
            o => panic!("load of offset {o}"),
        }
    };
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let i = f.program[pc];
        let code = i.code as u32;
        pc += 1;
        if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
            acc = word(i.k);
        } else if code == libc::BPF_RET | libc::BPF_K {
            return i.k;
        } else if code == libc::BPF_JMP | libc::BPF_JA {
            pc += i.k as usize;
        } else if code == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K {
            pc += if acc == i.k { i.jt } else { i.jf } as usize;
        } else if code == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K {
            pc += if acc >= i.k { i.jt } else { i.jf } as usize;
        } else {
            panic!("unexpected instruction {i:?}");
        }
    }
}

fn nr(table: &[(&str, u32)], name: &str) -> u32 {
    number(table, name).unwrap_or_else(|| panic!("{name} not in the table"))
}

/// A plain container's processes, and a remapped root's (which holds every capability of
/// the container's user namespace).
const PLAIN: Privilege = Privilege {
    remap_root: false,
    sys_admin: false,
};
const ROOT: Privilege = Privilege {
    remap_root: true,
    sys_admin: true,
};

const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
const FAKED: u32 = libc::SECCOMP_RET_ERRNO;

#[test]
fn tables_are_sorted_and_agree_with_this_build_s_libc() {
    for t in [table::X86_64, table::I386, table::AARCH64] {
        assert!(
            t.windows(2).all(|w| w[0].0 < w[1].0),
            "binary search needs order"
        );
    }
    let native = ABIS[0].table;
    let known = [
        ("keyctl", libc::SYS_keyctl),
        ("kexec_load", libc::SYS_kexec_load),
        ("personality", libc::SYS_personality),
        ("fchownat", libc::SYS_fchownat),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("mount", libc::SYS_mount),
        ("execve", libc::SYS_execve),
    ];
    for (name, number) in known {
        assert_eq!(nr(native, name) as libc::c_long, number, "{name}");
    }
    // Numbers from the kernel's own tables, one per ABI.
    assert_eq!(nr(table::X86_64, "keyctl"), 250);
    assert_eq!(nr(table::I386, "keyctl"), 288);
    assert_eq!(nr(table::AARCH64, "keyctl"), 219);
    assert_eq!(
        number(table::AARCH64, "open"),
        None,
        "aarch64 has openat only"
    );
}

#[test]
fn every_default_name_is_known_and_unknown_names_are_refused() {
    for (names, why) in DEFAULT_DENY {
        assert!(!why.is_empty());
        for n in *names {
            assert!(is_known(n), "{n}");
        }
    }
    for n in DEFAULT_ENOSYS.iter().chain(FAKE_CHOWN).chain(FAKE_FSID) {
        assert!(is_known(n), "{n}");
    }
    assert!(!is_known("keyctI"));
    let err = Filter::compile(&Profile::for_container(PLAIN, &["no_such_call".into()]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown syscall \"no_such_call\""), "{err}");
}

#[test]
fn the_default_profile_denies_its_list_and_allows_the_rest() {
    let f = Filter::compile(&Profile::for_container(PLAIN, &[])).unwrap();
    for abi in ABIS {
        let call = |name: &str, args: [u64; 6]| run(&f, abi.arch, nr(abi.table, name), args);
        assert_eq!(call("keyctl", [0; 6]), EPERM);
        assert_eq!(call("kexec_load", [0; 6]), EPERM);
        assert_eq!(call("mount", [0; 6]), EPERM);
        assert_eq!(call("fsopen", [0; 6]), EPERM);
        assert_eq!(call("bpf", [0; 6]), EPERM);
        assert_eq!(call("io_uring_setup", [0; 6]), ENOSYS);
        assert_eq!(call("read", [0; 6]), ALLOW);
        assert_eq!(call("execve", [0; 6]), ALLOW);
        assert_eq!(
            call("ptrace", [0; 6]),
            ALLOW,
            "debuggers work, as in Docker"
        );
        assert_eq!(
            call("perf_event_open", [0; 6]),
            ALLOW,
            "profilers work unless the site denies it"
        );
        // Not remapped: chown is the kernel's business (EINVAL for unmapped ids).
        assert_eq!(call("fchownat", [0; 6]), ALLOW);
        for allowed in PERSONALITY_ALLOWED {
            assert_eq!(call("personality", [allowed.into(), 0, 0, 0, 0, 0]), ALLOW);
        }
        // ADDR_NO_RANDOMIZE, and the query's value with high garbage the kernel ignores.
        assert_eq!(call("personality", [0x0040000, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(
            call("personality", [0xdead_0000_ffff_ffff, 0, 0, 0, 0, 0]),
            ALLOW
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn x32_and_unknown_architectures_are_refused_and_i386_has_its_own_numbers() {
    let f = Filter::compile(&Profile::for_container(PLAIN, &[])).unwrap();
    let read = nr(table::X86_64, "read");
    assert_eq!(
        run(&f, AUDIT_ARCH_X86_64, read | X32_SYSCALL_BIT, [0; 6]),
        ENOSYS
    );
    assert_eq!(run(&f, AUDIT_ARCH_AARCH64, read, [0; 6]), ENOSYS);
    // i386's keyctl (288) is x86_64's nothing, and x86_64's keyctl (250) is i386's madvise.
    assert_eq!(run(&f, AUDIT_ARCH_I386, 288, [0; 6]), EPERM);
    assert_eq!(run(&f, AUDIT_ARCH_I386, 250, [0; 6]), ALLOW);
}

#[test]
fn a_site_denial_is_added_and_wins_over_the_fake_chown() {
    let extra = vec!["perf_event_open".to_string(), "chown".to_string()];
    let f = Filter::compile(&Profile::for_container(ROOT, &extra)).unwrap();
    let abi = &ABIS[0];
    let call =
        |name: &str, arg0: u64| run(&f, abi.arch, nr(abi.table, name), [arg0, 0, 0, 0, 0, 0]);
    assert_eq!(call("perf_event_open", 0), EPERM);
    if number(abi.table, "chown").is_some() {
        assert_eq!(call("chown", 0), EPERM);
    }
    assert_eq!(call("fchownat", 0), FAKED);
}

#[test]
fn a_remapped_root_s_chown_and_id_changes_succeed_without_effect() {
    let f = Filter::compile(&Profile::for_container(ROOT, &[])).unwrap();
    for abi in ABIS {
        let call =
            |name: &str, arg0: u64| run(&f, abi.arch, nr(abi.table, name), [arg0, 0, 0, 0, 0, 0]);
        for name in ["fchownat", "fchown", "setresuid", "setgroups", "setgid"] {
            assert_eq!(call(name, 1234), FAKED, "{name}");
        }
        assert_eq!(call("setfsuid", 1234), FAKED);
        assert_eq!(
            call("setfsuid", u32::MAX.into()),
            ALLOW,
            "the query is answered"
        );
        assert_eq!(call("keyctl", 0), EPERM, "the denials still hold");
    }
}

#[test]
fn the_mount_family_is_allowed_only_to_a_cap_sys_admin_holder_unless_the_site_denies_it() {
    let sys_admin = Privilege {
        remap_root: false,
        sys_admin: true,
    };
    for privilege in [PLAIN, sys_admin, ROOT] {
        let f = Filter::compile(&Profile::for_container(privilege, &[])).unwrap();
        for abi in ABIS {
            let call = |name: &str| run(&f, abi.arch, nr(abi.table, name), [0; 6]);
            let expected = if privilege.sys_admin { ALLOW } else { EPERM };
            for name in MOUNT_FAMILY {
                if number(abi.table, name).is_some() {
                    assert_eq!(call(name), expected, "{name} for {privilege:?}");
                }
            }
            assert_eq!(call("pivot_root"), EPERM, "{privilege:?}");
            assert_eq!(
                call("keyctl"),
                EPERM,
                "the other denials hold: {privilege:?}"
            );
            // Only a remapped root's chown is faked.
            let chown = if privilege.remap_root { FAKED } else { ALLOW };
            assert_eq!(call("fchownat"), chown, "{privilege:?}");
        }
    }
    let f = Filter::compile(&Profile::for_container(ROOT, &["mount".into()])).unwrap();
    let abi = &ABIS[0];
    assert_eq!(run(&f, abi.arch, nr(abi.table, "mount"), [0; 6]), EPERM);
    assert_eq!(run(&f, abi.arch, nr(abi.table, "fsopen"), [0; 6]), ALLOW);
}

#[test]
fn profiles_berth_cannot_enforce_are_refused() {
    let mut p = Profile::for_container(PLAIN, &[]);
    p.default_action = Action::Errno;
    assert!(Filter::compile(&p).is_err());
    let mut p = Profile::for_container(PLAIN, &[]);
    p.flags.push("SECCOMP_FILTER_FLAG_LOG".into());
    assert!(Filter::compile(&p).is_err());
    let mut p = Profile::for_container(PLAIN, &[]);
    p.syscalls[0].args = vec![Arg {
        index: 0,
        value: 1 << 40,
        op: ArgOp::Eq,
    }];
    assert!(Filter::compile(&p).is_err());
    // What the launcher writes reads back as the same profile (through the spec's JSON).
    let p = Profile::for_container(ROOT, &["acct".into()]);
    let json = serde_json::to_string(&p).unwrap();
    assert!(
        json.contains(r#""action":"SCMP_ACT_ERRNO","errnoRet":0"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Profile>(&json).unwrap(), p);
    // Every site addition at once still fits the kernel's limit.
    let all: Vec<String> = ABIS[0].table.iter().map(|(n, _)| n.to_string()).collect();
    let f = Filter::compile(&Profile::for_container(ROOT, &all)).unwrap();
    assert!(f.program.len() <= 4096);
}

/// The filter in a real process: a forked child installs it (after no_new_privs, as
/// `confine` does) and reports what the kernel answered.
#[test]
fn installed_the_kernel_refuses_and_fakes_as_compiled() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "").unwrap();
    let c_file = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
    let f = Filter::compile(&Profile::for_container(ROOT, &[])).unwrap();
    // SAFETY: the child only makes syscalls and _exits.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| -> i32 {
                if crate::caps::set_no_new_privs().is_err() || f.install().is_err() {
                    return 10;
                }
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                if !status.lines().any(|l| l == "Seccomp:\t2") {
                    return 11;
                }
                // SAFETY: plain syscalls with valid (or null) arguments.
                unsafe {
                    if libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) != -1
                        || nix::errno::Errno::last() != nix::errno::Errno::EPERM
                    {
                        return 12;
                    }
                    if libc::personality(0x0040000) != -1 {
                        return 13;
                    }
                    if libc::personality(0xffff_ffff) == -1 {
                        return 14;
                    }
                    // Faked: succeeds, and the file still belongs to whoever made it.
                    if libc::chown(c_file.as_ptr(), 1234, 1234) != 0 {
                        return 15;
                    }
                }
                0
            })();
            // SAFETY: leave the test harness's copy without running its destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let exit = crate::process::reap(child.as_raw()).unwrap();
            assert_eq!(exit, crate::process::Exit::Code(0));
        }
    }
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
}
