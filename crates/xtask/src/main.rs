//! Build helpers, run by `make` rather than by every `cargo build`: the man
//! page and the shell completions, generated from the forwarder's own clap
//! definition so that they never disagree with `--help`, and the systemd
//! units rendered for an install prefix.
//!
//! ```text
//! cargo run -p xtask -- docs OUT_DIR              # OUT_DIR/man/*.1, OUT_DIR/completions/*
//! cargo run -p xtask -- units BINDIR OUT_DIR      # dist/*.service.in with @BINDIR@ filled in
//! cargo run -p xtask -- check-modules [SRC_DIR]   # no import cycle among src/'s top-level modules
//! ```

mod modules;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};
use kata_trace_forwarder::config::Cli;

const BIN: &str = "kata-trace-forwarder";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["docs", out] => docs(Path::new(out)),
        ["units", bindir, out] => units(bindir, Path::new(out)),
        ["check-modules"] => return check_modules(None),
        ["check-modules", src] => return check_modules(Some(Path::new(src))),
        _ => {
            eprintln!(
                "usage: xtask docs OUT_DIR | xtask units BINDIR OUT_DIR | xtask check-modules"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(written) => {
            for p in written {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Fails, naming the cycle, if `src/`'s top-level modules import each other
/// in a cycle; prints the module graph either way. `src`: another tree's
/// (another checkout's), to compare.
fn check_modules(src: Option<&Path>) -> ExitCode {
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../src");
    let src = src.unwrap_or(&ours);
    match modules::check(src) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(report) => {
            eprintln!("{report}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the man page and the bash, zsh and fish completions.
fn docs(out: &Path) -> io::Result<Vec<PathBuf>> {
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    fs::create_dir_all(&man_dir)?;
    fs::create_dir_all(&comp_dir)?;
    let mut written = Vec::new();

    let page = man_dir.join(format!("{BIN}.1"));
    let mut f = fs::File::create(&page)?;
    man_page(&mut f)?;
    written.push(page);

    for (shell, name) in [
        (Shell::Bash, format!("{BIN}.bash")),
        (Shell::Zsh, format!("_{BIN}")),
        (Shell::Fish, format!("{BIN}.fish")),
    ] {
        let path = comp_dir.join(name);
        let mut f = fs::File::create(&path)?;
        clap_complete::generate(shell, &mut Cli::command(), BIN, &mut f);
        written.push(path);
    }
    Ok(written)
}

/// Renders `dist/*.service.in` for binaries installed in `bindir`.
fn units(bindir: &str, out: &Path) -> io::Result<Vec<PathBuf>> {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist");
    fs::create_dir_all(out)?;
    let mut written = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&dist)?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(unit) = name.strip_suffix(".in") else {
            continue;
        };
        let text = fs::read_to_string(&path)?.replace("@BINDIR@", bindir);
        let dest = out.join(unit);
        fs::write(&dest, text)?;
        written.push(dest);
    }
    Ok(written)
}

/// A section per subcommand, from its clap definition: its synopsis, what
/// it does, and its options.
fn subcommands(cmd: &clap::Command, w: &mut dyn Write) -> io::Result<()> {
    let mut roff = Roff::default();
    for sub in cmd.get_subcommands() {
        let name = sub.get_name();
        roff.control("SH", [name.to_uppercase().as_str()]);
        let mut synopsis = vec![bold(format!("{BIN} {name}"))];
        let args: Vec<_> = sub
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "help"))
            .collect();
        for a in &args {
            let long = a.get_long().unwrap_or_default();
            synopsis.push(roman(" ["));
            synopsis.push(bold(format!("--{long}")));
            let value = a.get_action().takes_values();
            if let Some(v) = a
                .get_value_names()
                .and_then(|v| v.first())
                .filter(|_| value)
            {
                synopsis.push(roman(" "));
                synopsis.push(italic(v.to_string()));
            }
            synopsis.push(roman("]"));
        }
        roff.text(synopsis);
        roff.control("PP", []);
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            roff.text([roman(about.to_string())]);
        }
        for a in &args {
            roff.control("TP", []);
            roff.text([bold(format!("--{}", a.get_long().unwrap_or_default()))]);
            if let Some(help) = a.get_long_help().or(a.get_help()) {
                roff.text([roman(help.to_string())]);
            }
        }
    }
    roff.to_writer(w)
}

/// clap's page (name, synopsis, description, options, examples and
/// environment, version) plus what only a manual says.
fn man_page(w: &mut dyn Write) -> io::Result<()> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone()).date(env!("CARGO_PKG_VERSION"));
    // clap's page section by section: its list of subcommands would name a
    // page of their own for each; they are described on this one instead.
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    subcommands(&cmd, w)?;
    man.render_extra_section(w)?;
    man.render_version_section(w)?;
    let mut roff = Roff::default();
    roff.control("SH", ["LISTENERS"]);
    roff.text([
        roman("With no listener flag, standard VSOCK (QEMU): one listener for every VM; each "),
        roman("span's resource gets the guest's CID as "),
        bold("kata.vsock.cid"),
        roman(" (an int) and, when the QEMU process with that CID is found in /proc, "),
        bold("kata.sandbox.id"),
        roman(". With "),
        bold("--socket-path"),
        roman(", one hybrid VSOCK sandbox (Cloud Hypervisor, Firecracker). With "),
        bold("--socket-path-template"),
        roman(", every hybrid VSOCK sandbox on the host: the directory above {ID} is watched, "),
        roman("and a listener is made in each sandbox directory as it appears (and for those "),
        roman("that exist at start), and closed, its socket removed, as it goes; spans get "),
        bold("kata.sandbox.id"),
        roman(". These two attributes are the host's alone: an agent's own value for either is "),
        roman("kept under kata.guest.claimed.sandbox.id or kata.guest.claimed.vsock.cid instead. "),
        roman("Each sandbox has its own limits: "),
        bold("--sandbox-max-connections"),
        roman(", "),
        bold("--sandbox-spans-per-second"),
        roman(" and a share of the queue. "),
        roman("Several listeners can be served at once: "),
        bold("--socket-path-template"),
        roman(" may be repeated, and "),
        bold("--vsock"),
        roman(" adds standard VSOCK beside the templates. With "),
        bold("--kata-host"),
        roman(", the listeners come from the Kata configuration files the runtimes read "),
        roman("(QEMU: VSOCK; Cloud Hypervisor, Firecracker, Dragonball: their socket templates), "),
        roman("and follow them as they change; "),
        bold("--kata-host --print"),
        roman(" prints that plan as JSON."),
    ]);
    roff.control("SH", ["PRIVILEGES"]);
    roff.text([
        roman("Standard VSOCK needs none. Started as root with "),
        bold("--socket-path"),
        roman(", the forwarder binds, then becomes "),
        bold("--user"),
        roman(" with no capability; a janitor process removes the socket at exit. With "),
        bold("--socket-path-template"),
        roman(", it becomes "),
        bold("--user"),
        roman(" at start, and only its sandbox watcher thread, which reads no guest data, keeps "),
        roman("CAP_DAC_OVERRIDE, to make and remove sockets in root's sandbox directories."),
    ]);
    roff.control("SH", ["FILES"]);
    for (file, what) in [
        (
            "/etc/default/kata-trace-forwarder",
            "settings of the systemd units: OTEL_EXPORTER_OTLP_* variables, \
             KATA_SOCKET_PATH_TEMPLATE, KATA_TRACE_FORWARDER_ARGS (more flags)",
        ),
        (
            "kata-trace-forwarder.service",
            "systemd unit for a QEMU host (standard VSOCK)",
        ),
        (
            "kata-trace-forwarder-hybrid.service",
            "systemd unit for a Cloud Hypervisor or Firecracker host (--socket-path-template)",
        ),
        (
            "kata-trace-forwarder-host.service",
            "systemd unit for every hypervisor and runtime on a host, from its Kata \
             configurations (--kata-host)",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(file)]);
        roff.text([roman(what)]);
    }
    roff.control("SH", ["EXIT STATUS"]);
    roff.text([roman(
        "0 after a clean shutdown (SIGTERM, SIGINT); 1 when the forwarder cannot start or \
         fails (collector unreachable, socket unusable); 2 for an invalid command line or \
         environment. status: 0 when every forwarder asked answered, 1 otherwise.",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("kata-runtime"),
        roman("(1), "),
        bold("systemd.exec"),
        roman("(5)"),
    ]);
    roff.to_writer(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_page_and_completions_cover_the_cli() {
        let dir = std::env::temp_dir().join(format!("xtask-docs-{}", std::process::id()));
        let written = docs(&dir).unwrap();
        assert_eq!(written.len(), 4);
        let page = fs::read_to_string(dir.join("man/kata-trace-forwarder.1")).unwrap();
        for needle in [
            ".TH kata-trace-forwarder 1",
            "socket\\-path\\-template",
            "max\\-sandboxes",
            "kata.sandbox.id",
            "CAP_DAC_OVERRIDE",
            "EXIT STATUS",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            ".SH STATUS",
            "\\fBkata\\-trace\\-forwarder status\\fR [\\fB\\-\\-json\\fR]",
        ] {
            assert!(page.contains(needle), "man page lacks {needle}");
        }
        assert!(
            !page.contains("forwarder\\-status(1)"),
            "no page of its own is named"
        );
        for name in [
            "kata-trace-forwarder.bash",
            "_kata-trace-forwarder",
            "kata-trace-forwarder.fish",
        ] {
            let c = fs::read_to_string(dir.join("completions").join(name)).unwrap();
            assert!(c.contains("socket-path-template"), "{name}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn units_get_the_bindir() {
        let dir = std::env::temp_dir().join(format!("xtask-units-{}", std::process::id()));
        let written = units("/opt/ktf/bin", &dir).unwrap();
        assert_eq!(written.len(), 3, "{written:?}");
        for p in &written {
            let text = fs::read_to_string(p).unwrap();
            assert!(text.contains("ExecStart=/opt/ktf/bin/kata-trace-forwarder"));
            assert!(!text.contains('@'), "{}", p.display());
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
