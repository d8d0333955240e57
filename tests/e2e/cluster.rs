//! The test cluster itself (issue 2): berth's plugin is loaded, `required`, by srun,
//! sbatch, slurmd and slurmstepd without an error, and plain jobs still run as the test
//! user. Needs `tests/cluster/up`; fails (does not skip) without it.

use berth_e2e::{as_user, plugin_errors, unique_name, write_user_file, Cluster, LogCursor};
use std::time::Duration;

/// The line Slurm's SPANK loader logs (at debug level, which the cluster's slurm.conf
/// sets) once it has loaded and initialised a plugin.
const LOADED: &str = "Loaded plugin spank_berth.so";

#[track_caller]
fn assert_no_plugin_errors(what: &str, text: &str) {
    let errors = plugin_errors(text);
    assert!(
        errors.is_empty(),
        "{what} reports plugin errors:\n{}",
        errors.join("\n")
    );
}

/// Cursors on slurmd's (and so slurmstepd's) and slurmctld's logs, taken before a test
/// acts, so it judges only the lines its own jobs caused.
struct DaemonLogs {
    slurmd: LogCursor,
    slurmctld: LogCursor,
}

impl DaemonLogs {
    fn mark(cluster: &Cluster) -> DaemonLogs {
        DaemonLogs {
            slurmd: LogCursor::at_end(cluster.slurmd_log()),
            slurmctld: LogCursor::at_end(cluster.slurmctld_log()),
        }
    }

    /// slurmd's new lines, once slurmstepd has logged loading the plugin for a step of
    /// `job` (`[JOBID.STEP]` prefix); panics if it never does.
    #[track_caller]
    fn slurmstepd_loaded_plugin(&self, job: &str) -> String {
        let prefix = format!("[{job}.");
        let (text, found) = self.slurmd.wait_for(Duration::from_secs(10), |text| {
            text.lines()
                .any(|line| line.contains(&prefix) && line.contains(LOADED))
        });
        assert!(
            found,
            "slurmstepd of job {job} never logged {LOADED:?}; new slurmd log:\n{text}"
        );
        text
    }

    #[track_caller]
    fn assert_no_plugin_errors(&self) {
        assert_no_plugin_errors("slurmd/slurmstepd log", &self.slurmd.read_new());
        assert_no_plugin_errors("slurmctld log", &self.slurmctld.read_new());
    }
}

#[test]
fn srun_help_lists_berth_options() {
    Cluster::get();
    let run = as_user(["srun", "--help"]);
    run.assert_success();
    assert!(
        run.stdout.contains("--container-image"),
        "srun --help does not list --container-image:\n{run}"
    );
    assert_no_plugin_errors("srun --help", &run.stderr);
}

#[test]
fn sbatch_help_lists_berth_options() {
    Cluster::get();
    let run = as_user(["sbatch", "--help"]);
    run.assert_success();
    assert!(
        run.stdout.contains("--container-image"),
        "sbatch --help does not list --container-image:\n{run}"
    );
    assert_no_plugin_errors("sbatch --help", &run.stderr);
}

/// slurmd loads the plugin stack itself at start-up (its own SPANK context), before any
/// job: check the part of its log up to the point `up` saw the node idle.
#[test]
fn slurmd_loaded_the_plugin_at_startup() {
    let cluster = Cluster::get();
    let ready: u64 = cluster
        .var("SLURMD_LOG_READY_OFFSET")
        .parse()
        .expect("offset is a number");
    let startup = LogCursor::at_start(cluster.slurmd_log()).read_to(ready);
    assert!(
        startup
            .lines()
            .any(|line| line.contains(LOADED) && !line.contains("] [")),
        "slurmd's start-up log has no {LOADED:?}:\n{startup}"
    );
    assert_no_plugin_errors("slurmd start-up log", &startup);
    let ready: u64 = cluster
        .var("SLURMCTLD_LOG_READY_OFFSET")
        .parse()
        .expect("offset is a number");
    assert_no_plugin_errors(
        "slurmctld start-up log",
        &LogCursor::at_start(cluster.slurmctld_log()).read_to(ready),
    );
}

#[test]
fn srun_runs_a_step_as_the_user_with_the_plugin_loaded() {
    let cluster = Cluster::get();
    let logs = DaemonLogs::mark(&cluster);

    let run = as_user(["srun", "-N1", "true"]);
    run.assert_success();
    assert_no_plugin_errors("srun", &run.stderr);

    // The task really ran as the user, in a job whose id we can follow into the log.
    let run = as_user(["srun", "-N1", "sh", "-c", "echo $SLURM_JOB_ID $(id -u)"]);
    run.assert_success();
    assert_no_plugin_errors("srun", &run.stderr);
    let fields: Vec<&str> = run.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 2, "unexpected output:\n{run}");
    assert_eq!(
        fields[1],
        cluster.uid().to_string(),
        "the task did not run as {}:\n{run}",
        cluster.user()
    );

    logs.slurmstepd_loaded_plugin(fields[0]);
    logs.assert_no_plugin_errors();
    cluster.assert_node_healthy();
}

#[test]
fn sbatch_wait_runs_a_batch_job_as_the_user_with_the_plugin_loaded() {
    let cluster = Cluster::get();
    let logs = DaemonLogs::mark(&cluster);
    let name = unique_name("e2e-sbatch");
    let script = cluster.home().join(format!("{name}.sh"));
    let result = cluster.home().join(format!("{name}.result"));
    let output = cluster.home().join(format!("{name}.out"));
    write_user_file(
        &cluster,
        &script,
        &format!(
            "#!/bin/sh\necho \"$SLURM_JOB_ID $(id -u)\" > {}\n",
            result.display()
        ),
        0o755,
    );

    let run = as_user([
        "sbatch",
        "--wait",
        "--parsable",
        "-N1",
        &format!("--output={}", output.display()),
        &script.display().to_string(),
    ]);
    run.assert_success();
    assert_no_plugin_errors("sbatch", &run.stderr);
    // --parsable prints "JOBID" (or "JOBID;CLUSTER").
    let job = run
        .stdout
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        job.parse::<u64>().is_ok(),
        "no job id from sbatch --parsable:\n{run}"
    );

    let written = std::fs::read_to_string(&result)
        .unwrap_or_else(|e| panic!("batch job left no {}: {e}\n{run}", result.display()));
    assert_eq!(
        written.trim(),
        format!("{job} {}", cluster.uid()),
        "batch job wrote the wrong job id or uid"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&result).unwrap().uid(),
        cluster.uid(),
        "result file is not owned by the user"
    );

    logs.slurmstepd_loaded_plugin(&job);
    logs.assert_no_plugin_errors();
    let job_output = std::fs::read_to_string(&output).unwrap_or_default();
    assert_no_plugin_errors("the batch job's output", &job_output);
    cluster.assert_node_healthy();

    for path in [&script, &result, &output] {
        let _ = std::fs::remove_file(path);
    }
}
