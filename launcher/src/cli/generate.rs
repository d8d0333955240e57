//! `berth generate man|completions DIR` (hidden): writes the berth(1) man page and the shell
//! completions, generated from this very command line, so the package's documentation can
//! never describe options the binary does not have. `packaging/build` runs it.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, Globals};
use crate::{Error, Result};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write berth.1 into DIR: one section per subcommand.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write completions for bash (berth), zsh (_berth) and fish (berth.fish) into DIR.
    Completions {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

pub fn run(command: Command, _globals: &Globals) -> Result<i32> {
    match command {
        Command::Man { dir } => {
            let path = dir.join("berth.1");
            std::fs::write(&path, man_page()?)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        Command::Completions { dir } => completions(&dir)?,
    }
    Ok(0)
}

/// The roff of berth(1): the top-level page, then a section per visible subcommand (nested
/// ones like `berth sif create` following their parent) with its description, synopsis and
/// options.
pub fn man_page() -> Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    let render_err = |e: std::io::Error| Error::io("rendering the man page", e);
    let mut out = Vec::new();
    // Not Man::render: its SUBCOMMANDS section points at berth-exec(1) and the like, pages
    // that do not exist because each subcommand is a section of this one.
    let top = clap_mangen::Man::new(cmd.clone());
    top.render_title(&mut out)
        .and_then(|()| top.render_name_section(&mut out))
        .and_then(|()| top.render_synopsis_section(&mut out))
        .and_then(|()| top.render_description_section(&mut out))
        .and_then(|()| top.render_options_section(&mut out))
        .map_err(render_err)?;
    let mut stack: Vec<clap::Command> = visible_subcommands(&cmd);
    stack.reverse();
    while let Some(sub) = stack.pop() {
        let name = sub
            .get_bin_name()
            .map(str::to_owned)
            .unwrap_or_else(|| sub.get_name().to_owned());
        writeln!(out, ".SH \"{}\"", name.to_uppercase()).map_err(render_err)?;
        let man = clap_mangen::Man::new(sub.clone());
        let mut section = Vec::new();
        man.render_description_section(&mut section)
            .and_then(|()| man.render_synopsis_section(&mut section))
            .and_then(|()| man.render_options_section(&mut section))
            .map_err(render_err)?;
        // The subcommand's own headings become subsections of its section.
        for line in String::from_utf8_lossy(&section).lines() {
            match line.strip_prefix(".SH ") {
                Some(heading) => writeln!(out, ".SS {heading}"),
                None => writeln!(out, "{line}"),
            }
            .map_err(render_err)?;
        }
        let mut children = visible_subcommands(&sub);
        children.reverse();
        stack.extend(children);
    }
    top.render_version_section(&mut out).map_err(render_err)?;
    Ok(out)
}

fn visible_subcommands(cmd: &clap::Command) -> Vec<clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .cloned()
        .collect()
}

fn completions(dir: &Path) -> Result<()> {
    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "berth", dir).map_err(|e| {
            Error::io(
                format!("writing {shell} completions to {}", dir.display()),
                e,
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_page_has_a_section_per_subcommand_and_hides_generate() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        for heading in [
            ".SH \"BERTH EXEC\"",
            ".SH \"BERTH POLICY CHECK\"",
            ".SH \"BERTH SIF CREATE\"",
            ".SH \"BERTH CONFIG CHECK\"",
        ] {
            assert!(page.contains(heading), "no {heading} in\n{page}");
        }
        assert!(!page.contains("BERTH GENERATE"), "{page}");
    }
}
