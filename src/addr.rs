//! The addresses agents reach the forwarder at: a VSOCK CID and port
//! (QEMU), a hybrid-VSOCK socket (the VMM relays guest port P to the Unix
//! socket `<socket-path>_P`), a socket path template with `{ID}`. Apart
//! from `config` and `listen`, so that each can use them without the other.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Unix,
    Vsock { cid: u32 },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix => f.write_str("unix"),
            Peer::Vsock { cid } => write!(f, "vsock:{cid}"),
        }
    }
}

/// Where `kata-runtime env` puts the sandbox id.
pub(crate) const ID_PLACEHOLDER: &str = "{ID}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockCid {
    Any,
    Cid(u32),
}

impl VsockCid {
    /// The kernel's `VMADDR_CID_ANY`.
    pub(crate) const ANY: u32 = u32::MAX;

    pub fn as_raw(self) -> u32 {
        match self {
            VsockCid::Any => Self::ANY,
            VsockCid::Cid(c) => c,
        }
    }
}

impl FromStr for VsockCid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") {
            return Ok(VsockCid::Any);
        }
        s.parse::<u32>()
            .map(VsockCid::Cid)
            .map_err(|_| format!("'{s}' is not a VSOCK CID: expected a number or 'any'"))
    }
}

/// `<socket_path>_<port>`, the name the VMM dials.
pub(crate) fn hybrid_socket(socket_path: &Path, port: u32) -> PathBuf {
    let mut s = socket_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// A validated `--socket-path-template`: `<parent>/{ID}/<inner...>/<socket>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SocketTemplate {
    pub(crate) parent: PathBuf,
    /// Between the sandbox directory and the socket (Firecracker's `root`).
    pub(crate) inner: Vec<String>,
    pub(crate) socket_name: String,
}

const TEMPLATE_HINT: &str = "expected what `kata-runtime env --json | jq .Hypervisor.SocketPath` \
prints, e.g. /run/vc/vm/{ID}/clh.sock or /run/vc/firecracker/{ID}/root/kata.hvsock";

impl FromStr for SocketTemplate {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let t = raw.trim();
        // jq without -r prints the JSON string, quotes included.
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| t.strip_prefix(*q).and_then(|rest| rest.strip_suffix(*q)));
        let t = unquoted.unwrap_or(t);
        if t.is_empty() {
            return Err(format!(
                "the socket path template is empty; {TEMPLATE_HINT}"
            ));
        }
        if t.starts_with(['"', '\'']) || t.ends_with(['"', '\'']) {
            return Err(format!("'{t}' has unbalanced quotes; {TEMPLATE_HINT}"));
        }
        if !t.starts_with('/') {
            return Err(format!("'{t}' is not an absolute path; {TEMPLATE_HINT}"));
        }
        match t.matches(ID_PLACEHOLDER).count() {
            0 => return Err(format!("'{t}' has no {ID_PLACEHOLDER}; {TEMPLATE_HINT}")),
            1 => {}
            n => {
                return Err(format!(
                    "'{t}' has {ID_PLACEHOLDER} {n} times; it must appear once"
                ))
            }
        }
        if t.ends_with('/') {
            return Err(format!(
                "'{t}' ends with '/'; it must end with the socket's file name"
            ));
        }
        let parts: Vec<&str> = t.split('/').filter(|c| !c.is_empty()).collect();
        if parts.iter().any(|c| *c == "." || *c == "..") {
            return Err(format!("'{t}' must not contain '.' or '..' components"));
        }
        // The component holding {ID} (there is one, as checked) splits the path.
        let at = parts.iter().position(|c| c.contains(ID_PLACEHOLDER));
        let (before, after) = parts.split_at(at.unwrap_or(0));
        if let Some(component) = after.first().filter(|c| **c != ID_PLACEHOLDER) {
            return Err(format!(
                "in '{t}', {ID_PLACEHOLDER} must be a whole path component (as in \
                 /run/vc/vm/{ID_PLACEHOLDER}/clh.sock), not part of '{component}'"
            ));
        }
        let Some((socket_name, inner)) = after.get(1..).and_then(<[_]>::split_last) else {
            return Err(format!(
                "in '{t}', {ID_PLACEHOLDER} must be followed by the socket's file name \
                 (as in /run/vc/vm/{ID_PLACEHOLDER}/clh.sock)"
            ));
        };
        Ok(SocketTemplate {
            parent: Path::new("/").join(before.join("/")),
            inner: inner.iter().map(|s| s.to_string()).collect(),
            socket_name: socket_name.to_string(),
        })
    }
}

impl fmt::Display for SocketTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.socket_dir(ID_PLACEHOLDER).join(&self.socket_name);
        write!(f, "{}", p.display())
    }
}

impl SocketTemplate {
    pub(crate) fn socket_dir(&self, id: &str) -> PathBuf {
        let mut p = self.parent.join(id);
        p.extend(&self.inner);
        p
    }

    pub fn listen_path(&self, id: &str, port: u32) -> PathBuf {
        hybrid_socket(&self.socket_dir(id).join(&self.socket_name), port)
    }

    pub(crate) fn listen_name(&self, port: u32) -> String {
        format!("{}_{port}", self.socket_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SocketTemplate, String> {
        s.parse()
    }

    #[test]
    fn parses_kata_runtime_templates() {
        let clh = parse("/run/vc/vm/{ID}/clh.sock").unwrap();
        assert_eq!(clh.parent, Path::new("/run/vc/vm"));
        assert_eq!(clh.socket_dir("foo"), Path::new("/run/vc/vm/foo"));
        assert_eq!(
            clh.listen_path("foo", 10240),
            Path::new("/run/vc/vm/foo/clh.sock_10240")
        );
        assert_eq!(clh.to_string(), "/run/vc/vm/{ID}/clh.sock");

        let fc = parse("  \"/run/vc/firecracker/{ID}/root/kata.hvsock\"\n").unwrap();
        assert_eq!(fc.parent, Path::new("/run/vc/firecracker"));
        assert_eq!(fc.socket_dir("x"), Path::new("/run/vc/firecracker/x/root"));
        assert_eq!(
            fc.listen_path("x", 1024),
            Path::new("/run/vc/firecracker/x/root/kata.hvsock_1024")
        );
        assert_eq!(parse("'/a//{ID}/s'").unwrap().to_string(), "/a/{ID}/s");
        assert_eq!(parse("/{ID}/s").unwrap().parent, Path::new("/"));
    }

    #[test]
    fn rejects_bad_templates_clearly() {
        for (t, needle) in [
            ("", "is empty"),
            ("\"\"", "is empty"),
            ("\"/run/vc/vm/{ID}/clh.sock", "unbalanced quotes"),
            ("run/vc/vm/{ID}/clh.sock", "not an absolute path"),
            ("/run/vc/vm/foo/clh.sock", "has no {ID}"),
            ("/run/{ID}/vm/{ID}/clh.sock", "2 times"),
            ("/run/vc/vm/sandbox-{ID}/clh.sock", "whole path component"),
            ("/run/vc/vm/{ID}.d/clh.sock", "whole path component"),
            ("/run/vc/vm/{ID}", "followed by the socket's file name"),
            ("/run/vc/vm/{ID}/", "ends with '/'"),
            ("/run/vc/../{ID}/clh.sock", "'.' or '..'"),
            ("/run/vc/vm/{ID}/./clh.sock", "'.' or '..'"),
        ] {
            let e = parse(t).expect_err(t);
            assert!(e.contains(needle), "{t:?}: expected '{needle}' in: {e}");
        }
    }
}
