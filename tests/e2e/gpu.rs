//! Issue 9: GPUs and fabric from the allocation, end to end on the test cluster, whose four
//! GPUs are fake: device nodes 195:0..3 named by gres.conf (`File=/dev/nvidia[0-3]`), and the
//! fake driver of `tests/cluster/fake-gpu` (libcuda/libnvidia-ml built with cc under the real
//! names, in the ld.so cache; nvidia-smi; uvm and InfiniBand nodes). No real GPU is needed.
//! Needs `tests/cluster/up`; fails (does not skip) without it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use berth_e2e::{serial, unique_name, wait_until, write_user_file, Cluster, Cmd, Run};

/// Where fake-gpu installs the fake driver and the dlopen test program.
const FAKE_DRIVER: &str = "/usr/local/lib/berth-fake-nvidia";

fn approved(cluster: &Cluster) -> String {
    format!("--container-image={}", cluster.image_tls().reference)
}

fn srun(args: &[&str]) -> Run {
    let mut all = vec!["srun"];
    all.extend_from_slice(args);
    Cmd::user(all).run()
}

#[track_caller]
fn ok(run: Run) -> String {
    assert!(run.success(), "{run}");
    run.stdout
}

#[track_caller]
fn assert_node_idle(cluster: &Cluster) {
    cluster.assert_node_healthy();
    let idle = wait_until(Duration::from_secs(20), || cluster.node_state() == "idle");
    assert!(idle, "node is {} after the test", cluster.node_state());
}

/// `KEY=VALUE` lines of a script's output.
fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

/// Prints what a GPU test looks at: Slurm's allocation, the CUDA variables, and every GPU
/// node inside as `NODE name major:minor` (hex, as busybox stat gives them).
const LOOK: &str = r#"
echo "STEP=$SLURM_STEP_GPUS"
echo "JOB=$SLURM_JOB_GPUS"
echo "CUDA=$CUDA_VISIBLE_DEVICES"
echo "NVIDIA=$NVIDIA_VISIBLE_DEVICES"
for d in /dev/nvidia* /dev/infiniband/*; do [ -e "$d" ] && stat -c "NODE %n %t:%T" "$d"; done
[ -e /usr/local/nvidia/lib64/libcuda.so.1 ] && echo LIBCUDA=yes || echo LIBCUDA=no
true
"#;

/// The minors of the /dev/nvidiaN nodes listed by [`LOOK`].
fn gpu_minors(out: &str) -> Vec<u32> {
    let mut minors: Vec<u32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("NODE /dev/nvidia"))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            let (_, num) = l.split_once(' ').unwrap();
            let (major, minor) = num.split_once(':').unwrap();
            assert_eq!(major, "c3", "GPU nodes have major 195: {l}");
            u32::from_str_radix(minor, 16).unwrap()
        })
        .collect();
    minors.sort();
    minors
}

fn indexes(list: &str) -> Vec<u32> {
    let mut v: Vec<u32> = list.split(',').map(|i| i.parse().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn a_step_sees_exactly_its_gpus_with_the_driver() {
    let _s = serial();
    let cluster = Cluster::get();
    let out = ok(srun(&[
        "--gres=gpu:2",
        &approved(&cluster),
        "sh",
        "-c",
        LOOK,
    ]));
    // gres.conf lists /dev/nvidia[0-3] in order, so index N is minor N.
    let step = indexes(value(&out, "STEP"));
    assert_eq!(step.len(), 2, "{out}");
    assert_eq!(gpu_minors(&out), step, "{out}");
    assert_eq!(value(&out, "CUDA"), "0,1", "{out}");
    assert_eq!(indexes(value(&out, "NVIDIA")), step, "{out}");
    for node in ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] {
        assert!(out.contains(&format!("NODE {node} ")), "{node}: {out}");
    }
    // The test image sets no NVIDIA_* variable: the driver comes anyway.
    assert_eq!(value(&out, "LIBCUDA"), "yes", "{out}");
    assert_node_idle(&cluster);
}

#[test]
fn the_loader_finds_the_driver_and_nvidia_smi_runs() {
    let _s = serial();
    let cluster = Cluster::get();
    // The host's ldconfig is static: bound in, it prints the container's cache.
    let out = ok(srun(&[
        "--gres=gpu:1",
        &approved(&cluster),
        "--container-mounts=/sbin/ldconfig:/sbin/ldconfig:ro",
        "sh",
        "-c",
        "/sbin/ldconfig -p; nvidia-smi",
    ]));
    assert!(
        out.lines().any(|l| l.contains("libcuda.so.1 ")
            && l.ends_with("=> /usr/local/nvidia/lib64/libcuda.so.1")),
        "{out}"
    );
    assert!(out.contains("libnvidia-ml.so.1 "), "{out}");
    assert!(out.contains("NVIDIA-SMI") && out.contains("GPU "), "{out}");
    assert_node_idle(&cluster);
}

#[test]
fn a_step_without_gpus_sees_no_gpu_but_the_fabric() {
    let _s = serial();
    let cluster = Cluster::get();
    let out = ok(srun(&[&approved(&cluster), "sh", "-c", LOOK]));
    assert!(gpu_minors(&out).is_empty(), "{out}");
    assert!(!out.contains("NODE /dev/nvidiactl"), "{out}");
    assert_eq!(value(&out, "LIBCUDA"), "no", "{out}");
    assert_eq!(value(&out, "CUDA"), "", "{out}");
    // Fabric devices every container gets ([gpu] fabric's default classes).
    for node in ["/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm"] {
        assert!(out.contains(&format!("NODE {node} ")), "{node}: {out}");
    }
    assert_node_idle(&cluster);
}

#[test]
fn the_batch_step_gets_the_jobs_gpus() {
    let _s = serial();
    let cluster = Cluster::get();
    let name = unique_name("e2e-gpu");
    let script = cluster.home().join(format!("{name}.sh"));
    let output = cluster.home().join(format!("{name}.out"));
    write_user_file(&cluster, &script, &format!("#!/bin/sh\n{LOOK}"), 0o755);
    let run = Cmd::user([
        "sbatch",
        "--wait",
        "--gres=gpu:3",
        &approved(&cluster),
        &format!("--output={}", output.display()),
        &script.display().to_string(),
    ])
    .run();
    let out = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&output);
    assert!(run.success(), "{run}\n{out}");
    let job = indexes(value(&out, "JOB"));
    assert_eq!(job.len(), 3, "{out}");
    assert_eq!(gpu_minors(&out), job, "{out}");
    assert_eq!(value(&out, "CUDA"), "0,1,2", "{out}");
    assert_node_idle(&cluster);
}

/// A glibc image for `berth exec`: busybox, the host's loader and libc, the dlopen test
/// program; as a SIF in a world-readable directory.
fn glibc_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = PathBuf::from("/tmp/berth-e2e-gpu");
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("rootfs");
        for d in ["bin", "etc", "lib64", "lib/x86_64-linux-gnu"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (from, to) in [
            ("/bin/busybox", "bin/busybox"),
            ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
            (
                "/lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libc.so.6",
            ),
            (&format!("{FAKE_DRIVER}/dlopen-test"), "bin/dlopen-test"),
        ] {
            std::fs::copy(from, root.join(to)).unwrap_or_else(|e| panic!("{from}: {e}"));
        }
        for applet in ["sh", "cat", "ls", "echo", "grep", "stat"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let sif = dir.join("glibc.sif");
        ok(Cmd::root([
            Cluster::get().berth_bin().as_os_str(),
            "sif".as_ref(),
            "create".as_ref(),
            root.as_os_str(),
            sif.as_os_str(),
        ])
        .run());
        ok(Cmd::root(["chmod", "-R", "a+rX", dir.to_str().unwrap()]).run());
        sif
    })
}

fn berth_exec(user: bool, args: &[&str]) -> Run {
    let berth = Cluster::get().berth_bin().display().to_string();
    let mut all = vec![berth.as_str()];
    all.extend_from_slice(args);
    if user {
        Cmd::user(all).run()
    } else {
        Cmd::root(all).run()
    }
}

#[test]
fn dlopen_of_libcuda_works_inside() {
    let _s = serial();
    let img = glibc_image().to_str().unwrap();
    let out = ok(berth_exec(
        true,
        &[
            "exec",
            "--gpus=0",
            img,
            "dlopen-test",
            "libcuda.so.1",
            "cuDriverGetVersion",
        ],
    ));
    assert_eq!(out, "loaded libcuda.so.1: cuDriverGetVersion -> 0, 12040\n");
    // Without GPUs the library is not there.
    let run = berth_exec(
        true,
        &[
            "exec",
            img,
            "dlopen-test",
            "libcuda.so.1",
            "cuDriverGetVersion",
        ],
    );
    assert!(!run.success() && run.stderr.contains("dlopen"), "{run}");
}

#[test]
fn exec_gpus_all_and_bad_lists() {
    let _s = serial();
    let img = glibc_image().to_str().unwrap();
    let out = ok(berth_exec(
        true,
        &["exec", "--gpus=all", img, "sh", "-c", LOOK],
    ));
    assert_eq!(gpu_minors(&out), [0, 1, 2, 3], "{out}");
    assert_eq!(value(&out, "CUDA"), "0,1,2,3");
    let run = berth_exec(true, &["exec", "--gpus=5", img, "true"]);
    assert!(!run.success(), "{run}");
    assert!(
        run.stderr.contains("GPU index 5") && run.stderr.contains("gres.conf"),
        "{run}"
    );
    let run = berth_exec(true, &["exec", "--gpus=one", img, "true"]);
    assert!(
        !run.success() && run.stderr.contains("invalid GPU list"),
        "{run}"
    );
}

/// A site config with `[gpu] cdi_dirs` at `dir` (root's `--config`).
fn cdi_config(dir: &Path) -> PathBuf {
    let base = std::fs::read_to_string(Cluster::get().berth_config()).unwrap();
    let config = dir.join("berth.toml");
    std::fs::write(
        &config,
        format!("{base}\n[gpu]\ncdi_dirs = [\"{}\"]\n", dir.display()),
    )
    .unwrap();
    config
}

#[test]
fn a_cdi_spec_is_honoured_and_a_broken_one_refused() {
    let _s = serial();
    let img = glibc_image().to_str().unwrap();
    let dir = PathBuf::from(format!("/tmp/{}", unique_name("berth-e2e-cdi")));
    std::fs::create_dir_all(&dir).unwrap();
    let config = cdi_config(&dir);
    let spec = r#"cdiVersion: 0.6.0
kind: example.com/gpu
devices:
- name: second
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
containerEdits:
  env: [FROM_CDI=yes]
  mounts:
  - hostPath: /etc/hostname
    containerPath: /cdi/hostname
    options: [ro, bind]
"#;
    std::fs::write(dir.join("test.yaml"), spec).unwrap();
    let config_arg = format!("--config={}", config.display());
    let out = ok(berth_exec(
        false,
        &[
            &config_arg,
            "exec",
            "--gpus=1",
            img,
            "sh",
            "-c",
            "echo FROM_CDI=$FROM_CDI; cat /cdi/hostname; ls /dev",
        ],
    ));
    assert!(out.contains("FROM_CDI=yes"), "{out}");
    assert!(
        out.contains("nvidia1") && !out.contains("nvidia0") && !out.contains("nvidiactl"),
        "{out}"
    );
    let spec = ok(berth_exec(
        false,
        &[&config_arg, "exec", "--print-spec", "--gpus=1", img, "true"],
    ));
    assert!(spec.contains("CDI example.com/gpu=second"), "{spec}");
    // Index 0 has no CDI device: berth's own discovery (control nodes, driver).
    let spec = ok(berth_exec(
        false,
        &[&config_arg, "exec", "--print-spec", "--gpus=0", img, "true"],
    ));
    assert!(
        spec.contains("discovery") && spec.contains("nvidiactl"),
        "{spec}"
    );

    std::fs::write(dir.join("broken.json"), "{\"cdiVersion\": ").unwrap();
    let run = berth_exec(false, &[&config_arg, "exec", "--gpus=1", img, "true"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!run.success(), "{run}");
    assert!(
        run.stderr.contains("broken.json") && run.stderr.contains("nvidia-ctk cdi generate"),
        "{run}"
    );
}

/// Removes a file when the test ends, passed or not.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_gpu_failure_reaches_the_user_from_task_init_and_the_node_stays_up() {
    let _s = serial();
    let cluster = Cluster::get();
    // A broken CDI spec in a default CDI directory, for this test only (e2e runs hold the
    // cluster lock, so no other run sees it).
    std::fs::create_dir_all("/var/run/cdi").unwrap();
    let spec = Remove(PathBuf::from(format!(
        "/var/run/cdi/{}.yaml",
        unique_name("berth-e2e-broken")
    )));
    std::fs::write(&spec.0, "cdiVersion: [\n").unwrap();
    let run = srun(&["--gres=gpu:1", &approved(&cluster), "true"]);
    assert!(!run.success(), "{run}");
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains(&spec.0.display().to_string()) && text.contains("nvidia-ctk cdi generate"),
        "{run}"
    );
    // A step without GPUs is not affected.
    ok(srun(&[&approved(&cluster), "true"]));
    drop(spec);
    assert_node_idle(&cluster);
}
