//! gres.conf, read the way slurmd reads it, to turn the indexes Slurm hands a step
//! (`SLURM_STEP_GPUS` / `SLURM_JOB_GPUS`: positions in the node's `File=` order, not device
//! minors) into device files.
//!
//! Supported: `key=value` words (keys case-insensitive), `#` comments, `\` line joins,
//! `NodeName=` lines (host lists like `n[1-4]`) for other nodes skipped, `Name=`, `Type=`,
//! `File=` with ranges (`/dev/nvidia[0-3]`, `[0,2-3]`, zero-padded `[00-03]`) and comma
//! lists, `Cores=`, several lines per name, and `AutoDetect=` (global or per line). Keys berth
//! does not need (`Count=`, `Links=`, `Flags=`, ...) are accepted and ignored, as slurmd
//! would still apply them.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where the GPU files come from when `File=` does not name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoDetect {
    Off,
    /// From NVML (NVIDIA's management library), in NVML's order.
    Nvml,
    /// Another mechanism (rsmi, oneapi, nrt): berth has no reader for it.
    Other(String),
}

impl AutoDetect {
    fn parse(value: &str) -> AutoDetect {
        match value.to_ascii_lowercase().as_str() {
            "off" => AutoDetect::Off,
            "nvml" => AutoDetect::Nvml,
            other => AutoDetect::Other(other.to_string()),
        }
    }
}

/// One `Name=` line that applies to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GresLine {
    pub name: String,
    pub typ: Option<String>,
    /// The expanded `File=` list, in order.
    pub files: Vec<PathBuf>,
    pub cores: Option<String>,
}

/// The parts of gres.conf that apply to one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GresConf {
    pub autodetect: Option<AutoDetect>,
    pub lines: Vec<GresLine>,
}

/// One allocatable unit of a gres, at its Slurm index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GresDevice {
    pub index: usize,
    pub typ: Option<String>,
    /// Every device file the unit needs (a MIG instance needs its parent GPU and caps).
    pub files: Vec<PathBuf>,
    /// NVML's UUID, when NVML was asked.
    pub uuid: Option<String>,
}

impl GresConf {
    /// Parses gres.conf `text` (read from `path`) for node `node`.
    pub fn parse(path: &Path, text: &str, node: &str) -> Result<GresConf> {
        let mut conf = GresConf::default();
        let joined = text.replace("\\\n", " ");
        for (n, raw) in joined.lines().enumerate() {
            let bad = |message: String| Error::GresConf {
                path: path.to_path_buf(),
                line: n + 1,
                message,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut name = None;
            let mut line_conf = GresLine {
                name: String::new(),
                typ: None,
                files: Vec::new(),
                cores: None,
            };
            let mut for_us = true;
            let mut autodetect = None;
            for word in line.split_whitespace() {
                let (key, value) = word
                    .split_once('=')
                    .ok_or_else(|| bad(format!("{word:?} is not KEY=VALUE")))?;
                match key.to_ascii_lowercase().as_str() {
                    "nodename" => {
                        for_us = split_list(value)
                            .iter()
                            .map(|p| expand(p))
                            .collect::<std::result::Result<Vec<_>, _>>()
                            .map_err(bad)?
                            .iter()
                            .flatten()
                            .any(|h| h == node)
                    }
                    "name" => name = Some(value.to_string()),
                    "type" => line_conf.typ = Some(value.to_string()),
                    "file" | "multiplefiles" => {
                        for item in split_list(value) {
                            line_conf
                                .files
                                .extend(expand(&item).map_err(bad)?.into_iter().map(PathBuf::from));
                        }
                    }
                    "cores" => line_conf.cores = Some(value.to_string()),
                    "autodetect" => autodetect = Some(AutoDetect::parse(value)),
                    _ => {}
                }
            }
            if !for_us {
                continue;
            }
            if autodetect.is_some() {
                conf.autodetect = autodetect;
            }
            if let Some(name) = name {
                line_conf.name = name;
                conf.lines.push(line_conf);
            }
        }
        Ok(conf)
    }

    /// The units of gres `name` that have device files, each at its Slurm index.
    pub fn devices(&self, name: &str) -> Vec<GresDevice> {
        self.lines
            .iter()
            .filter(|l| l.name == name)
            .flat_map(|l| l.files.iter().map(move |f| (l, f)))
            .enumerate()
            .map(|(index, (l, f))| GresDevice {
                index,
                typ: l.typ.clone(),
                files: vec![f.clone()],
                uuid: None,
            })
            .collect()
    }

    /// Every gres name with device files (gpu, and others a site defines).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for l in self.lines.iter().filter(|l| !l.files.is_empty()) {
            if !names.contains(&l.name.as_str()) {
                names.push(&l.name);
            }
        }
        names
    }
}

/// Splits a comma list at commas outside brackets: `a[0,1],b` is `a[0,1]` and `b`.
fn split_list(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut depth = 0usize;
    for c in value.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().expect("never empty").push(c);
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Expands the bracket ranges of one name: `nvidia[0-1,3]` is nvidia0, nvidia1, nvidia3;
/// `[00-02]` keeps the width; several brackets multiply.
pub fn expand(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('[') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find(']')
        .map(|i| open + i)
        .ok_or_else(|| format!("{pattern:?}: '[' without ']'"))?;
    let (prefix, ranges, rest) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let tails = expand(rest)?;
    let mut out = Vec::new();
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let bad = || format!("{pattern:?}: {range:?} is not a number or a range N-M");
        let (a, b): (u64, u64) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        if a > b || b - a > 4096 {
            return Err(format!(
                "{pattern:?}: range {range:?} is empty or too large"
            ));
        }
        let width = if lo.starts_with('0') { lo.len() } else { 0 };
        for i in a..=b {
            for tail in &tails {
                out.push(format!("{prefix}{i:0width$}{tail}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> GresConf {
        GresConf::parse(Path::new("/etc/slurm/gres.conf"), text, "n2").unwrap()
    }

    fn files(devices: &[GresDevice]) -> Vec<String> {
        devices
            .iter()
            .map(|d| d.files[0].display().to_string())
            .collect()
    }

    #[test]
    fn ranges_expand_in_order() {
        assert_eq!(
            expand("/dev/nvidia[0-2]").unwrap(),
            ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2"]
        );
        assert_eq!(
            expand("/dev/nvidia[0,2-3]").unwrap(),
            ["/dev/nvidia0", "/dev/nvidia2", "/dev/nvidia3"]
        );
        assert_eq!(expand("x[08-10]").unwrap(), ["x08", "x09", "x10"]);
        assert_eq!(
            expand("a[1-2]b[0-1]").unwrap(),
            ["a1b0", "a1b1", "a2b0", "a2b1"]
        );
        assert_eq!(expand("/dev/kfd").unwrap(), ["/dev/kfd"]);
        assert!(expand("x[3-1]").is_err());
        assert!(expand("x[a]").is_err());
        assert!(expand("x[1").is_err());
    }

    #[test]
    fn indexes_follow_file_order_across_lines_and_types() {
        let conf = parse(
            "# two kinds of GPU\n\
             AutoDetect=off\n\
             Name=gpu Type=a100 File=/dev/nvidia[0-1] Cores=0-7\n\
             name=gpu type=h100 file=/dev/nvidia3,/dev/nvidia2   # comment\n\
             Name=mps Count=100\n",
        );
        assert_eq!(conf.autodetect, Some(AutoDetect::Off));
        let gpus = conf.devices("gpu");
        assert_eq!(
            files(&gpus),
            [
                "/dev/nvidia0",
                "/dev/nvidia1",
                "/dev/nvidia3",
                "/dev/nvidia2"
            ]
        );
        assert_eq!(
            gpus.iter().map(|d| d.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(gpus[2].typ.as_deref(), Some("h100"));
        assert_eq!(conf.lines[0].cores.as_deref(), Some("0-7"));
        assert!(conf.devices("mps").is_empty());
        assert_eq!(conf.names(), ["gpu"]);
    }

    #[test]
    fn other_nodes_lines_are_skipped_and_line_joins_work() {
        let conf = parse(
            "NodeName=n[1,3-4] Name=gpu File=/dev/nvidia[0-7]\n\
             NodeName=n[2] Name=gpu \\\n  File=/dev/nvidia[0-1]\n\
             NodeName=n2 Name=amd File=/dev/dri/renderD[128-129]\n",
        );
        assert_eq!(
            files(&conf.devices("gpu")),
            ["/dev/nvidia0", "/dev/nvidia1"]
        );
        assert_eq!(conf.names(), ["gpu", "amd"]);
    }

    #[test]
    fn autodetect_nvml_is_recorded_and_errors_name_the_line() {
        let conf = parse("AutoDetect=nvml\nName=gpu Type=a100\n");
        assert_eq!(conf.autodetect, Some(AutoDetect::Nvml));
        assert!(conf.devices("gpu").is_empty());
        let e = GresConf::parse(Path::new("/g"), "Name=gpu\nName=gpu File=/dev/x[1-\n", "n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/g: line 2"), "{e}");
        let e = GresConf::parse(Path::new("/g"), "Name=gpu junk\n", "n").unwrap_err();
        assert!(e.to_string().contains("junk"), "{e}");
    }
}
