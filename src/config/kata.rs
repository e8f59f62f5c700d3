//! `--kata-host`: the host's Kata configuration files, read into a listen
//! plan. A host (a kata-deploy node in particular) runs several runtime
//! classes, each with its file and hypervisor: QEMU's agents come over
//! AF_VSOCK, the others' over hybrid VSOCK. [`plan`] reads the files the
//! runtimes would into a deduplicated [`Plan`], a [`ConfigReport`] per file.
//! Every path is under `--kata-root` (`/` on a host), so that a fixture tree
//! works unprivileged and a container sees the host's files mounted elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Env;
use crate::addr::SocketTemplate;

/// Both runtimes read it (Go: `loadRuntimeConfig` in containerd-shim-v2's
/// `create.go`, as a fallback; runtime-rs: `load_config` in
/// `runtimes/src/manager.rs`, first).
pub(crate) const CONF_FILE_ENV: &str = "KATA_CONF_FILE";

/// First existing wins (`GetDefaultConfigFilePaths`, katautils/config.go).
const GO_DEFAULTS: [&str; 2] = [
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
];

/// First existing wins (`DEFAULT_RUNTIME_CONFIGURATIONS`, kata-types).
const RS_DEFAULTS: [&str; 3] = [
    "/etc/kata-containers/runtime-rs/configuration.toml",
    "/usr/share/defaults/kata-containers/runtime-rs/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/runtime-rs/configuration.toml",
];

/// kata-deploy's `configuration-<shim>.toml`, one per runtime class.
const DEPLOY_DIRS: [&str; 2] = [
    "/opt/kata/share/defaults/kata-containers",
    "/opt/kata/share/defaults/kata-containers/runtime-rs",
];

/// kata-deploy ships about 25.
pub(crate) const MAX_CONFIG_FILES: usize = 128;
/// The shipped ones are 20-40 KiB.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;
pub(crate) const MAX_LISTENERS: usize = 64;

/// Go's `fs.RunVMStoragePath()`.
const GO_VM_STORE: &str = "/run/vc/vm";
/// Go's Firecracker chroot base.
const GO_FC_CHROOT: &str = "/run/vc";
/// runtime-rs' `KATA_PATH`.
const RS_SANDBOXES: &str = "/run/kata";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Go,
    RuntimeRs,
}

/// One listener of a plan. Ordered, so that a plan reads the same every time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    Vsock,
    /// The VMM's socket path template, under the root.
    Template {
        template: String,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Vsock => f.write_str("vsock"),
            Target::Template { template } => write!(f, "template {template}"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Serves,
    /// Nothing to serve for it (or shadowed): `skipped` says why.
    #[default]
    Skipped,
    /// Not readable or not TOML: `skipped` says why.
    Error,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigReport {
    /// As the runtime names it (without the root).
    pub file: PathBuf,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hypervisors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub serves: Vec<Target>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub root: PathBuf,
    /// `--vsock-port`
    pub port: u32,
    /// Deduplicated and ordered.
    pub listeners: Vec<Target>,
    pub configs: Vec<ConfigReport>,
}

impl Plan {
    pub fn errors(&self) -> impl Iterator<Item = &ConfigReport> {
        self.configs.iter().filter(|c| c.status == Status::Error)
    }

    pub fn log(&self) {
        for c in &self.configs {
            let serves: Vec<String> = c.serves.iter().map(ToString::to_string).collect();
            let file = c.file.display();
            let serving = c.status == Status::Serves;
            match c.status {
                // `serves` only where it serves (a `None` field is left out).
                Status::Serves | Status::Skipped => tracing::info!(
                    config = %file,
                    runtime = ?c.runtime,
                    hypervisors = ?c.hypervisors,
                    serves = serving.then_some(tracing::field::debug(&serves)),
                    skipped = ?c.skipped,
                    "kata configuration: {}",
                    if serving { "serving" } else { "skipped" }
                ),
                Status::Error => tracing::error!(
                    config = %file,
                    error = %c.skipped.join("; "),
                    "kata configuration: unusable"
                ),
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub root: PathBuf,
    /// `KATA_CONF_FILE` (a path as the runtime sees it).
    pub env_file: Option<PathBuf>,
}

impl Sources {
    pub fn from_env(root: PathBuf, env: &Env) -> Sources {
        // Absolute: the templates served under it must be.
        let root = std::path::absolute(&root).unwrap_or(root);
        Sources {
            root,
            env_file: env(CONF_FILE_ENV).map(PathBuf::from),
        }
    }

    pub(crate) fn under_root(&self, path: &Path) -> PathBuf {
        under(&self.root, path)
    }

    /// Those whose changes can change the plan (as the runtime names them).
    pub(crate) fn watched_dirs(&self) -> BTreeSet<PathBuf> {
        let files = GO_DEFAULTS.iter().chain(&RS_DEFAULTS).map(Path::new);
        let parents = files
            .chain(self.env_file.as_deref())
            .filter_map(Path::parent);
        let deploy = DEPLOY_DIRS.iter().map(Path::new);
        parents.chain(deploy).map(Path::to_path_buf).collect()
    }

    /// In precedence order, each with what shadows it (a default file
    /// behind another that exists is never read by the runtime either).
    fn candidates(&self) -> Vec<(PathBuf, Option<PathBuf>)> {
        let mut out: Vec<_> = self.env_file.iter().map(|f| (f.clone(), None)).collect();
        for defaults in [&GO_DEFAULTS[..], &RS_DEFAULTS[..]] {
            let mut winner: Option<PathBuf> = None;
            let existing = defaults.iter().map(PathBuf::from);
            for f in existing.filter(|f| self.under_root(f).is_file()) {
                out.push((f.clone(), winner.clone()));
                winner.get_or_insert(f);
            }
        }
        for dir in DEPLOY_DIRS {
            let Ok(entries) = std::fs::read_dir(self.under_root(Path::new(dir))) else {
                continue;
            };
            let names: BTreeSet<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with("configuration-") && n.ends_with(".toml"))
                .collect();
            out.extend(names.into_iter().map(|n| (Path::new(dir).join(n), None)));
        }
        out
    }
}

/// `path` under `root`, dropping its root and any `..` (a configuration
/// must not lead out of the root).
fn under(root: &Path, path: &Path) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(
        path.components()
            .filter(|c| matches!(c, Component::Normal(_))),
    );
    p
}

/// Never fails: a file that cannot be used is a report with [`Status::Error`].
pub fn plan(sources: &Sources, port: u32) -> Plan {
    let mut configs = Vec::new();
    let mut seen_files: BTreeSet<PathBuf> = BTreeSet::new();
    let mut listeners: BTreeSet<Target> = BTreeSet::new();
    for (file, shadowed_by) in sources.candidates() {
        if !seen_files.insert(file.clone()) {
            continue;
        }
        if configs.len() >= MAX_CONFIG_FILES {
            tracing::warn!(
                max = MAX_CONFIG_FILES,
                config = %file.display(),
                "too many Kata configurations; the rest are not read"
            );
            break;
        }
        let report = match shadowed_by {
            Some(by) => ConfigReport {
                file: file.clone(),
                skipped: vec![format!(
                    "shadowed by {}, which the runtime reads instead",
                    by.display()
                )],
                ..Default::default()
            },
            None => match read(&sources.under_root(&file)).and_then(|text| {
                let doc = parse(&text);
                doc.map_err(|e| format!("parsing Kata configuration {}: {e}", file.display()))
            }) {
                Ok(doc) => derive(&file, &doc, &sources.root),
                Err(e) => ConfigReport {
                    file: file.clone(),
                    status: Status::Error,
                    skipped: vec![e],
                    ..Default::default()
                },
            },
        };
        for t in &report.serves {
            if listeners.len() >= MAX_LISTENERS && !listeners.contains(t) {
                tracing::warn!(max = MAX_LISTENERS, listener = %t, "too many listeners; not serving this one");
                continue;
            }
            listeners.insert(t.clone());
        }
        configs.push(report);
    }
    Plan {
        root: sources.root.clone(),
        port,
        listeners: listeners.into_iter().collect(),
        configs,
    }
}

/// Kata's configuration directories are root's: a symlink there is an admin's
/// choice (to a shipped file), followed; not one in a directory others can
/// write. Regular files only: a FIFO would stop `--print`, the start, the watcher.
fn read(path: &Path) -> Result<String, String> {
    use crate::untrusted::{read_file, Link, UntrustedError};
    let shown = path.display();
    let data = read_file(path, Link::IfRootPlaced, MAX_CONFIG_BYTES).map_err(|e| match e {
        UntrustedError::TooLarge { .. } => {
            format!("Kata configuration {shown} is larger than {MAX_CONFIG_BYTES} bytes; not read")
        }
        e => format!("Kata configuration refused: {e}"),
    })?;
    String::from_utf8(data).map_err(|e| format!("reading Kata configuration {shown}: {e}"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KataToml {
    hypervisor: BTreeMap<String, HypervisorSection>,
    agent: BTreeMap<String, AgentSection>,
    runtime: RuntimeSection,
}

#[derive(Debug, Default, Deserialize)]
struct HypervisorSection {
    /// The VMM binary: Go's Firecracker names its chroot after it.
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AgentSection {
    #[serde(default)]
    enable_tracing: bool,
}

/// runtime-rs names its runtime, hypervisor and agent here; the Go
/// runtime's `[runtime]` has none of these keys.
#[derive(Debug, Default, Deserialize)]
struct RuntimeSection {
    name: Option<String>,
    hypervisor_name: Option<String>,
    agent_name: Option<String>,
}

fn parse(text: &str) -> Result<KataToml, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
}

/// runtime-rs' files: under a `runtime-rs` directory or named after it (older
/// kata-deploy's `configuration-*-runtime-rs.toml`), naming their hypervisor in
/// `[runtime]`, or using Dragonball, which only runtime-rs has.
fn runtime_of(file: &Path, doc: &KataToml) -> Runtime {
    let named = file.to_string_lossy().contains("runtime-rs");
    let rs_keys = doc.runtime.name.is_some() || doc.runtime.hypervisor_name.is_some();
    if named || rs_keys || doc.hypervisor.contains_key("dragonball") {
        Runtime::RuntimeRs
    } else {
        Runtime::Go
    }
}

/// A template is checked as `--socket-path-template` would be.
fn target_of(
    runtime: Runtime,
    name: &str,
    section: &HypervisorSection,
    root: &Path,
) -> Result<Target, String> {
    let template = |t: String| {
        let template = under(root, Path::new(&t)).display().to_string();
        template.parse::<SocketTemplate>()?;
        Ok(Target::Template { template })
    };
    match (runtime, name) {
        // QEMU uses vhost-vsock in both runtimes: the host's AF_VSOCK.
        (_, "qemu") => Ok(Target::Vsock),
        // Go: `GetHypervisorSocketTemplate` -> clh's `vsockSocketPath`.
        (Runtime::Go, "clh") => template(format!("{GO_VM_STORE}/{{ID}}/clh.sock")),
        // Go: `GenerateSocket` -> `setPaths` (fc.go): the chroot is named
        // after the VMM binary.
        (Runtime::Go, "firecracker") => {
            let binary = section
                .path
                .as_deref()
                .and_then(|p| Path::new(p).file_name())
                .and_then(|n| n.to_str())
                .filter(|n| !n.is_empty())
                .unwrap_or("firecracker");
            template(format!("{GO_FC_CHROOT}/{binary}/{{ID}}/root/kata.hvsock"))
        }
        // runtime-rs: `get_hvsock_path` (Dragonball), Firecracker's
        // `get_vsock_path`.
        (Runtime::RuntimeRs, "dragonball" | "firecracker") => {
            template(format!("{RS_SANDBOXES}/{{ID}}/root/kata.hvsock"))
        }
        // runtime-rs: `ch/utils.rs`'s `get_vsock_path`, not `get_hvsock_path`.
        (Runtime::RuntimeRs, "clh" | "cloud-hypervisor") => {
            template(format!("{RS_SANDBOXES}/{{ID}}/ch-vm.sock"))
        }
        (Runtime::Go, "dragonball") => Err("hypervisor 'dragonball' is runtime-rs only".into()),
        (_, "remote") => {
            Err("hypervisor 'remote': the agent runs in a VM elsewhere, not on this host".into())
        }
        (_, other) => Err(format!(
            "unknown hypervisor section [hypervisor.{other}]: not served (known: qemu, clh, \
             cloud-hypervisor, firecracker, dragonball)"
        )),
    }
}

fn derive(file: &Path, doc: &KataToml, root: &Path) -> ConfigReport {
    let runtime = runtime_of(file, doc);
    let agent_name = doc.runtime.agent_name.as_deref().unwrap_or("kata");
    let mut report = ConfigReport {
        runtime: Some(runtime),
        hypervisors: doc.hypervisor.keys().cloned().collect(),
        file: file.to_path_buf(),
        ..Default::default()
    };
    if report.hypervisors.is_empty() {
        report.skipped = vec!["no [hypervisor.<name>] section".to_owned()];
        return report;
    }
    if !doc.agent.get(agent_name).is_some_and(|a| a.enable_tracing) {
        report.skipped = vec![format!(
            "agent tracing is off ([agent.{agent_name}] enable_tracing is not true): its agents send no spans"
        )];
        return report;
    }
    // runtime-rs uses the section `[runtime] hypervisor_name` names; the Go
    // runtime has one section per file (with several, each is served).
    let chosen: Vec<_> = match (runtime, doc.runtime.hypervisor_name.as_ref()) {
        (Runtime::RuntimeRs, Some(h)) if doc.hypervisor.contains_key(h) => {
            for other in doc.hypervisor.keys().filter(|o| *o != h) {
                report.skipped.push(format!(
                    "[hypervisor.{other}]: not the one [runtime] hypervisor_name names"
                ));
            }
            doc.hypervisor.get_key_value(h).into_iter().collect()
        }
        _ => doc.hypervisor.iter().collect(),
    };
    for (name, section) in chosen {
        match target_of(runtime, name, section, root) {
            Ok(t) if !report.serves.contains(&t) => report.serves.push(t),
            Ok(_) => {}
            Err(reason) => report.skipped.push(reason),
        }
    }
    if !report.serves.is_empty() {
        report.status = Status::Serves;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(file: &str, toml: &str) -> ConfigReport {
        derive(Path::new(file), &parse(toml).unwrap(), Path::new("/"))
    }

    fn templates(r: &ConfigReport) -> Vec<String> {
        r.serves
            .iter()
            .map(|t| match t {
                Target::Vsock => "vsock".to_owned(),
                Target::Template { template } => template.clone(),
            })
            .collect()
    }

    const TRACING: &str = "[agent.kata]\nenable_tracing = true\n";

    #[test]
    fn qemu_is_vsock_in_both_runtimes() {
        let r = report(
            "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml",
            &format!("[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\nrootless = false\n{TRACING}"),
        );
        assert_eq!(
            (r.status.clone(), r.runtime),
            (Status::Serves, Some(Runtime::Go))
        );
        assert_eq!(templates(&r), ["vsock"]);
        let r = report(
            "/opt/kata/share/defaults/kata-containers/runtime-rs/configuration-qemu-runtime-rs.toml",
            &format!("[hypervisor.qemu]\n{TRACING}"),
        );
        assert_eq!(r.runtime, Some(Runtime::RuntimeRs));
        assert_eq!(templates(&r), ["vsock"]);
    }

    #[test]
    fn go_clh_and_firecracker_templates() {
        let r = report(
            "/etc/x/configuration-clh.toml",
            &format!("[hypervisor.clh]\n{TRACING}"),
        );
        assert_eq!(templates(&r), ["/run/vc/vm/{ID}/clh.sock"]);
        let r = report(
            "/etc/x/configuration-fc.toml",
            &format!("[hypervisor.firecracker]\npath = \"/opt/kata/bin/firecracker\"\n{TRACING}"),
        );
        assert_eq!(templates(&r), ["/run/vc/firecracker/{ID}/root/kata.hvsock"]);
        // The chroot is named after the VMM binary.
        let r = report(
            "/etc/x/configuration-fc.toml",
            &format!("[hypervisor.firecracker]\npath = \"/usr/bin/fc-1.7\"\n{TRACING}"),
        );
        assert_eq!(templates(&r), ["/run/vc/fc-1.7/{ID}/root/kata.hvsock"]);
    }

    #[test]
    fn runtime_rs_templates() {
        let dir = "/opt/kata/share/defaults/kata-containers/runtime-rs";
        for (section, want) in [
            ("dragonball", "/run/kata/{ID}/root/kata.hvsock"),
            ("firecracker", "/run/kata/{ID}/root/kata.hvsock"),
            ("clh", "/run/kata/{ID}/ch-vm.sock"),
            ("cloud-hypervisor", "/run/kata/{ID}/ch-vm.sock"),
        ] {
            let r = report(
                &format!("{dir}/configuration-{section}.toml"),
                &format!("[hypervisor.{section}]\n{TRACING}"),
            );
            assert_eq!(r.runtime, Some(Runtime::RuntimeRs), "{section}");
            assert_eq!(templates(&r), [want], "{section}");
        }
        // Told apart by its [runtime] keys wherever the file is.
        let r = report(
            "/etc/kata-containers/configuration.toml",
            &format!("[runtime]\nname = \"virt_container\"\nhypervisor_name = \"clh\"\nagent_name = \"kata\"\n[hypervisor.clh]\n[hypervisor.qemu]\n{TRACING}"),
        );
        assert_eq!(templates(&r), ["/run/kata/{ID}/ch-vm.sock"]);
        assert!(
            r.skipped[0].contains("[hypervisor.qemu]"),
            "{:?}",
            r.skipped
        );
        // Dragonball alone says runtime-rs.
        let r = report(
            "/etc/kata-containers/configuration.toml",
            &format!("[hypervisor.dragonball]\n{TRACING}"),
        );
        assert_eq!(r.runtime, Some(Runtime::RuntimeRs));
    }

    #[test]
    fn tracing_off_or_absent_is_skipped_with_the_reason() {
        for agent in [
            "",
            "[agent.kata]\n",
            "[agent.kata]\nenable_tracing = false\n",
        ] {
            let r = report("/etc/c.toml", &format!("[hypervisor.clh]\n{agent}"));
            assert_eq!(r.status, Status::Skipped);
            assert!(r.serves.is_empty());
            assert!(r.skipped[0].contains("enable_tracing"), "{:?}", r.skipped);
        }
    }

    #[test]
    fn unknown_and_remote_hypervisors_are_skipped_clearly() {
        let r = report("/etc/c.toml", &format!("[hypervisor.acrn]\n{TRACING}"));
        assert_eq!(r.status, Status::Skipped);
        assert!(r.skipped[0].contains("unknown hypervisor section [hypervisor.acrn]"));
        let r = report("/etc/c.toml", &format!("[hypervisor.remote]\n{TRACING}"));
        assert!(r.skipped[0].contains("elsewhere"));
        let r = report("/etc/c.toml", TRACING);
        assert!(r.skipped[0].contains("no [hypervisor"));
    }

    #[test]
    fn garbage_and_wrong_types_are_errors_naming_the_file() {
        assert!(parse("[hypervisor.qemu\npath = ").is_err());
        assert!(parse("[agent.kata]\nenable_tracing = \"yes\"\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc/kata-containers");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("configuration.toml"), "not [toml").unwrap();
        let p = plan(
            &Sources {
                root: dir.path().to_path_buf(),
                env_file: None,
            },
            10240,
        );
        let errors: Vec<_> = p.errors().collect();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].skipped[0]
                .contains("parsing Kata configuration /etc/kata-containers/configuration.toml"),
            "{:?}",
            errors[0]
        );
    }

    /// Precedence, shadowing, the environment's file, kata-deploy's files,
    /// deduplication, the root prefix, and missing directories.
    #[test]
    fn plan_reads_what_the_runtimes_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |p: &str, text: &str| {
            let p = under(root, Path::new(p));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        let clh = format!("[hypervisor.clh]\n{TRACING}");
        write("/etc/kata-containers/configuration.toml", &clh);
        write(
            "/usr/share/defaults/kata-containers/configuration.toml",
            &format!("[hypervisor.qemu]\n{TRACING}"),
        );
        write(
            "/opt/kata/share/defaults/kata-containers/configuration-clh.toml",
            &clh,
        );
        write(
            "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml",
            &format!("[hypervisor.qemu]\n{TRACING}"),
        );
        write(
            "/opt/kata/share/defaults/kata-containers/README.md",
            "not a configuration",
        );
        write(
            "/srv/mine.toml",
            &format!("[hypervisor.firecracker]\n{TRACING}"),
        );
        let sources = Sources {
            root: root.to_path_buf(),
            env_file: Some("/srv/mine.toml".into()),
        };
        let p = plan(&sources, 10240);
        let files: Vec<_> = p
            .configs
            .iter()
            .map(|c| c.file.display().to_string())
            .collect();
        assert_eq!(
            files,
            [
                "/srv/mine.toml",
                "/etc/kata-containers/configuration.toml",
                "/usr/share/defaults/kata-containers/configuration.toml",
                "/opt/kata/share/defaults/kata-containers/configuration-clh.toml",
                "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml",
            ]
        );
        assert_eq!(p.configs[2].status, Status::Skipped);
        assert!(
            p.configs[2].skipped[0].contains("shadowed by /etc/kata-containers/configuration.toml")
        );
        let r = root.display();
        assert_eq!(
            p.listeners,
            [
                Target::Vsock,
                Target::Template {
                    template: format!("{r}/run/vc/firecracker/{{ID}}/root/kata.hvsock")
                },
                Target::Template {
                    template: format!("{r}/run/vc/vm/{{ID}}/clh.sock")
                },
            ],
            "deduplicated, under the root"
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["listeners"][0]["kind"], "vsock");
        assert_eq!(json["configs"][1]["runtime"], "go");
        assert_eq!(json["configs"][1]["status"], "serves");

        // Nothing there at all: an empty plan, not an error.
        let empty = tempfile::tempdir().unwrap();
        let p = plan(
            &Sources {
                root: empty.path().to_path_buf(),
                env_file: None,
            },
            10240,
        );
        assert!(p.configs.is_empty() && p.listeners.is_empty());
        assert_eq!(
            under(Path::new("/r"), Path::new("/a/../b")),
            Path::new("/r/a/b")
        );
    }

    /// A FIFO named like kata-deploy's files is an error at once (never
    /// waited on); a symlink root placed in root's directory is followed.
    #[test]
    fn a_fifo_is_an_error_at_once_and_roots_symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let deploy = under(dir.path(), Path::new(DEPLOY_DIRS[0]));
        std::fs::create_dir_all(&deploy).unwrap();
        let fifo = deploy.join("configuration-fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let etc = under(dir.path(), Path::new(GO_DEFAULTS[0]));
        std::fs::create_dir_all(etc.parent().unwrap()).unwrap();
        std::fs::write(
            deploy.join("shipped.conf"),
            format!("[hypervisor.clh]\n{TRACING}"),
        )
        .unwrap();
        std::os::unix::fs::symlink(deploy.join("shipped.conf"), &etc).unwrap();
        let sources = Sources {
            root: dir.path().to_path_buf(),
            env_file: None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(plan(&sources, 10240));
        });
        let p = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the plan is stuck on a FIFO");
        let root = nix::unistd::getuid().is_root();
        let errors: Vec<_> = p.errors().collect();
        assert_eq!(errors.len(), if root { 1 } else { 2 }, "{p:?}");
        assert!(
            errors.iter().any(|e| e.skipped[0].contains("a FIFO")),
            "{errors:?}"
        );
        let etc_report = &p.configs[0];
        assert_eq!(etc_report.file, Path::new(GO_DEFAULTS[0]));
        // Unprivileged, the temporary tree is not root's: not followed.
        assert_eq!(etc_report.status == Status::Serves, root, "{etc_report:?}");
    }

    #[test]
    fn oversized_files_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big.toml");
        std::fs::write(&f, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).unwrap();
        let e = read(&f).unwrap_err();
        assert!(e.contains("is larger than 1048576 bytes; not read"), "{e}");
    }
}
