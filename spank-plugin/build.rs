//! Generates the Rust view of `<slurm/spank.h>` (and `SLURM_VERSION_NUMBER` from
//! `<slurm/slurm_version.h>`) at build time, so the plugin always speaks the ABI of the Slurm
//! it is built against: Slurm refuses a SPANK plugin whose `plugin_version` does not match
//! its own major.minor, which is why the number must come from the installed headers and
//! never be written down by hand.
//!
//! `SLURM_INCLUDE_DIR` points at another header tree (the directory holding `slurm/`), e.g. to
//! build for a Slurm installed under /opt; the default is Debian's libslurm-dev in /usr/include.
//!
//! One code base serves every release: what a release adds to the SPANK API becomes a `cfg`
//! named after the feature, set here from the headers' `SLURM_VERSION_NUMBER`, so the plugin
//! only calls a function the Slurm it is built for (and loaded into) has:
//! - `slurm_prepend_task_argv`: `spank_prepend_task_argv` (Slurm 23.11+), which lets
//!   `task_init` put the image's entrypoint in front of the task's command.

use std::env;
use std::path::{Path, PathBuf};

/// Functions of the SPANK API newer than the oldest release berth supports: the cfg set when
/// the headers' release has it, and that release (`SLURM_VERSION_NUM(a,b,0)`). The plugin
/// looks such a function up when it calls it rather than linking it, so that loaded into an
/// older Slurm it still reaches Slurm's own version check ("Incompatible Slurm plugin").
const FEATURES: [(&str, u32); 1] = [("slurm_prepend_task_argv", 0x17_0b_00)];

fn main() {
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    let include =
        PathBuf::from(env::var_os("SLURM_INCLUDE_DIR").unwrap_or_else(|| "/usr/include".into()));
    // spank.h includes the errno header; a changed header (a Slurm upgrade) must rebuild.
    for header in ["spank.h", "slurm_version.h", "slurm_errno.h", "slurm.h"] {
        let path = include.join("slurm").join(header);
        if !path.is_file() {
            panic!(
                "{} not found: install Slurm's development headers (Debian: apt-get install \
                 libslurm-dev) or set SLURM_INCLUDE_DIR to the directory that holds slurm/",
                path.display()
            );
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let version = slurm_version_number(&include.join("slurm").join("slurm_version.h"));
    for (feature, since) in FEATURES {
        println!("cargo::rustc-check-cfg=cfg({feature})");
        if version >= since {
            println!("cargo::rustc-cfg={feature}");
        }
    }
    let bindings = bindgen::Builder::default()
        .header_contents(
            "berth_spank.h",
            "#include <slurm/spank.h>\n#include <slurm/slurm_version.h>\n#include <slurm/slurm.h>\n",
        )
        .clang_arg(format!("-I{}", include.display()))
        // Only what the plugin calls or exports; everything else in Slurm's headers stays out.
        .allowlist_function("spank_context")
        .allowlist_function("spank_option_register")
        .allowlist_function("spank_getenv")
        .allowlist_function("spank_job_control_setenv")
        .allowlist_function("spank_get_item")
        .allowlist_function("spank_setenv")
        .allowlist_function("spank_unsetenv")
        .allowlist_function("spank_strerror")
        .allowlist_function("slurm_error")
        .allowlist_function("slurm_debug")
        .allowlist_function("slurm_info")
        .allowlist_type("spank_t")
        .allowlist_type("spank_option")
        .allowlist_type("spank_err_t")
        .allowlist_type("spank_context_t")
        .allowlist_type("spank_item_t")
        // The layout of Slurm's parsed slurm.conf (the global `slurm_conf`), which differs
        // between releases: the plugin reads the site's TaskProlog path from it.
        .allowlist_type("slurm_conf_t")
        .allowlist_var("SLURM_VERSION_NUMBER")
        .allowlist_var("ESPANK_SUCCESS")
        // Constants in a module, not Rust enums: a value Slurm adds in a later release must
        // not be undefined behaviour on our side.
        .constified_enum_module("spank_context")
        .constified_enum_module("spank_item")
        .constified_enum_module("slurm_err_t")
        .layout_tests(false)
        .generate()
        .expect("bindgen could not translate <slurm/spank.h>; is libclang-dev installed?");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("spank_bindings.rs"))
        .expect("writing the generated SPANK bindings into OUT_DIR");
}

/// `SLURM_VERSION_NUMBER` (0xMMmmpp) from slurm_version.h, as packaging/build reads it.
fn slurm_version_number(header: &Path) -> u32 {
    let text = std::fs::read_to_string(header)
        .unwrap_or_else(|e| panic!("reading {}: {e}", header.display()));
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("#define SLURM_VERSION_NUMBER"))
        .filter_map(|value| value.trim().strip_prefix("0x"))
        .find_map(|hex| u32::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no SLURM_VERSION_NUMBER 0x... in {}", header.display()))
}
