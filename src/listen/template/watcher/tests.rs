//! The watcher's decisions, tested against an in-memory file system and
//! hand-fed events (a [`Fake`] of the effects); one test runs them on real
//! directories and inotify, as the driver does.

use inotify::Inotify;
use tokio::sync::mpsc;

use super::super::driver::{Handoff, Host};
use super::super::Serve;
mod fake;

use super::*;
use crate::shutdown::Shutdown;
use fake::Fake;

const PORT: u32 = 1024;
const VM: &str = "/run/vc/vm";
const FC: &str = "/run/vc/firecracker";

fn clh() -> SocketTemplate {
    format!("{VM}/{{ID}}/clh.sock").parse().unwrap()
}

fn firecracker() -> SocketTemplate {
    format!("{FC}/{{ID}}/root/kata.hvsock").parse().unwrap()
}

/// Feeds the watcher what inotify reports on the watch on `dir`.
fn event(w: &mut Watcher, fx: &mut Fake, dir: &str, change: Change<'_>) {
    let watch = fx.watch_on(dir);
    w.step(fx, Input::Event { watch, change });
}

fn mkdir_in(w: &mut Watcher, fx: &mut Fake, dir: &str, name: &str) {
    fx.mkdir(&format!("{dir}/{name}"));
    event(w, fx, dir, Change::DirAppeared(OsStr::new(name)));
}

fn rmdir_in(w: &mut Watcher, fx: &mut Fake, dir: &str, name: &str) {
    fx.remove(&format!("{dir}/{name}"));
    let change = Change::Removed {
        name: OsStr::new(name),
        is_dir: true,
    };
    event(w, fx, dir, change);
}

fn started(template: SocketTemplate, max_sandboxes: usize, fx: &mut Fake) -> Watcher {
    let mut w = Watcher::new(template, PORT, max_sandboxes);
    w.establish_root(fx).unwrap();
    w
}

fn is_retired(w: &Watcher, id: &str) -> bool {
    matches!(w.sandboxes[id].state, State::Retired)
}

#[test]
fn sandbox_ids_are_visible_utf8_names() {
    assert_eq!(sandbox_id(OsStr::new("abc-123")), Some("abc-123"));
    assert_eq!(sandbox_id(OsStr::new(".tmp")), None);
    assert_eq!(sandbox_id(OsStr::new("")), None);
    use std::os::unix::ffi::OsStrExt;
    assert_eq!(sandbox_id(OsStr::from_bytes(b"\xff")), None);
}

/// A sandbox directory appearing is served, once, however often it is
/// seen; what is not a sandbox name is ignored.
#[test]
fn an_appearing_sandbox_is_served_once() {
    let mut fx = Fake::with(&[VM, "/run/vc/vm/old"]);
    let mut w = started(clh(), 8, &mut fx);
    assert_eq!(fx.served, ["old"], "served at start");
    mkdir_in(&mut w, &mut fx, VM, "a");
    assert_eq!(fx.served, ["old", "a"]);
    assert!(fx
        .sockets
        .contains_key(Path::new("/run/vc/vm/a/clh.sock_1024")));
    assert_eq!(fx.watch_on("/run/vc/vm/a"), w.sandboxes["a"].wd.unwrap());
    assert_eq!(fx.watches[&fx.watch_on("/run/vc/vm/a")].1, WatchKind::Serve);

    event(&mut w, &mut fx, VM, Change::DirAppeared(OsStr::new("a")));
    w.step(&mut fx, Input::Overflow);
    // The VMM's own socket going is not ours.
    let vmm = Change::Removed {
        name: OsStr::new("clh.sock"),
        is_dir: false,
    };
    event(&mut w, &mut fx, "/run/vc/vm/a", vmm);
    mkdir_in(&mut w, &mut fx, VM, ".tmp");
    assert_eq!(fx.served, ["old", "a"]);
    assert!(fx.stopped.is_empty());
}

/// Firecracker's `{ID}/root/kata.hvsock`: the sandbox waits for `root/`,
/// watching only the sandbox directory, and is served when it appears; a
/// sandbox made in one go (`mkdir -p`) is served at once.
#[test]
fn a_nested_socket_directory_is_waited_for() {
    let mut fx = Fake::with(&[FC]);
    let mut w = started(firecracker(), 8, &mut fx);
    mkdir_in(&mut w, &mut fx, FC, "fc");
    assert!(fx.served.is_empty());
    let waiting = fx.watch_on("/run/vc/firecracker/fc");
    assert_eq!(fx.watches[&waiting].1, WatchKind::Wait);
    mkdir_in(&mut w, &mut fx, "/run/vc/firecracker/fc", "other");
    assert!(fx.served.is_empty());

    mkdir_in(&mut w, &mut fx, "/run/vc/firecracker/fc", "root");
    assert_eq!(fx.served, ["fc"]);
    assert!(fx
        .sockets
        .contains_key(Path::new("/run/vc/firecracker/fc/root/kata.hvsock_1024")));
    assert_eq!(
        fx.watched(),
        [
            (FC.to_string(), WatchKind::Root),
            ("/run/vc/firecracker/fc/root".to_string(), WatchKind::Serve)
        ]
    );
    // The old watch's last events, still queued, change nothing.
    w.step(
        &mut fx,
        Input::Event {
            watch: waiting,
            change: Change::Released,
        },
    );
    assert!(fx.stopped.is_empty());

    fx.mkdir("/run/vc/firecracker/fc2/root");
    event(&mut w, &mut fx, FC, Change::DirAppeared(OsStr::new("fc2")));
    assert_eq!(fx.served, ["fc", "fc2"]);
}

/// A sandbox directory removed: the sandbox stops, once, its watch goes,
/// and its slot is free for the next one.
#[test]
fn a_removed_sandbox_stops_and_frees_its_slot() {
    let mut fx = Fake::with(&[VM]);
    let mut w = started(clh(), 1, &mut fx);
    mkdir_in(&mut w, &mut fx, VM, "a");
    rmdir_in(&mut w, &mut fx, VM, "a");
    assert_eq!(fx.stopped, ["a"]);
    assert!(w.sandboxes.is_empty());
    assert_eq!(fx.watched(), [(VM.to_string(), WatchKind::Root)]);
    mkdir_in(&mut w, &mut fx, VM, "b");
    assert_eq!(fx.served, ["a", "b"]);

    // As `rm -r` reports it: the socket, the directory itself, then the
    // entry in the root. Stopped once.
    fx.sockets.clear();
    let ours = Change::Removed {
        name: OsStr::new("clh.sock_1024"),
        is_dir: false,
    };
    event(&mut w, &mut fx, "/run/vc/vm/b", ours);
    rmdir_in(&mut w, &mut fx, VM, "b");
    assert_eq!(fx.stopped, ["a", "b"]);
    assert!(w.sandboxes.is_empty());
}

/// Our socket removed while the directory stays (a recursive delete
/// under way): retired, never bound again there, until the directory goes
/// and comes back.
#[test]
fn a_removed_socket_retires_the_sandbox_until_it_comes_back() {
    let mut fx = Fake::with(&[VM]);
    let mut w = started(clh(), 8, &mut fx);
    mkdir_in(&mut w, &mut fx, VM, "s");
    fx.sockets.clear();
    let ours = Change::Removed {
        name: OsStr::new("clh.sock_1024"),
        is_dir: false,
    };
    event(&mut w, &mut fx, "/run/vc/vm/s", ours);
    assert_eq!(fx.stopped, ["s"]);
    assert!(is_retired(&w, "s"));
    assert_eq!(fx.watched(), [(VM.to_string(), WatchKind::Root)]);
    w.step(&mut fx, Input::Overflow);
    event(&mut w, &mut fx, VM, Change::DirAppeared(OsStr::new("s")));
    assert_eq!(fx.served, ["s"]);

    rmdir_in(&mut w, &mut fx, VM, "s");
    assert_eq!(fx.stopped, ["s"], "stopped once");
    mkdir_in(&mut w, &mut fx, VM, "s");
    assert_eq!(fx.served, ["s", "s"]);

    // Its directory going (moved away) also retires it.
    event(&mut w, &mut fx, "/run/vc/vm/s", Change::Gone);
    assert_eq!(fx.stopped, ["s", "s"]);
    assert!(is_retired(&w, "s"));
}

/// At `--max-sandboxes`, sandboxes are turned away; when a slot frees,
/// the root is looked at again and the next one is served.
#[test]
fn sandboxes_beyond_the_cap_are_served_when_a_slot_frees() {
    let mut fx = Fake::with(&[VM]);
    let mut w = started(clh(), 2, &mut fx);
    for id in ["a", "b", "c", "d"] {
        mkdir_in(&mut w, &mut fx, VM, id);
    }
    assert_eq!(fx.served, ["a", "b"]);
    assert!(!w.sandboxes.contains_key("c"));
    rmdir_in(&mut w, &mut fx, VM, "a");
    assert_eq!(fx.served, ["a", "b", "c"]);
    assert!(!w.sandboxes.contains_key("d"), "still turned away");
    rmdir_in(&mut w, &mut fx, VM, "b");
    assert_eq!(fx.served, ["a", "b", "c", "d"]);
    assert_eq!(fx.stopped, ["a", "b"]);
}

/// The root missing at start: the watcher waits in its nearest existing
/// ancestor, goes down as the path appears, and serves what the root holds
/// once it is there.
#[test]
fn a_missing_root_is_waited_for_in_its_nearest_ancestor() {
    let mut fx = Fake::with(&["/run"]);
    let mut w = started(clh(), 8, &mut fx);
    assert_eq!(fx.watched(), [("/run".to_string(), WatchKind::Wait)]);
    mkdir_in(&mut w, &mut fx, "/run", "other");
    assert_eq!(fx.watched(), [("/run".to_string(), WatchKind::Wait)]);
    mkdir_in(&mut w, &mut fx, "/run", "vc");
    assert_eq!(fx.watched(), [("/run/vc".to_string(), WatchKind::Wait)]);

    // `mkdir -p /run/vc/vm/a`, reported as vm appearing.
    fx.mkdir("/run/vc/vm/a");
    event(
        &mut w,
        &mut fx,
        "/run/vc",
        Change::DirAppeared(OsStr::new("vm")),
    );
    assert_eq!(
        fx.watched(),
        [
            (VM.to_string(), WatchKind::Root),
            ("/run/vc/vm/a".to_string(), WatchKind::Serve)
        ]
    );
    assert_eq!(fx.served, ["a"]);

    // The ancestor itself going: wait higher up.
    let mut fx = Fake::with(&["/run/vc"]);
    let mut w = started(clh(), 8, &mut fx);
    fx.remove("/run/vc");
    event(&mut w, &mut fx, "/run/vc", Change::Gone);
    assert_eq!(fx.watched(), [("/run".to_string(), WatchKind::Wait)]);
}

/// The root going stops every sandbox; the watcher waits for it again and
/// serves what is in it when it is back.
#[test]
fn losing_the_root_stops_every_sandbox() {
    let mut fx = Fake::with(&[VM]);
    let mut w = started(clh(), 8, &mut fx);
    mkdir_in(&mut w, &mut fx, VM, "a");
    mkdir_in(&mut w, &mut fx, VM, "b");
    fx.mkdir("/run/vc/vm/waiting");
    fx.unwatchable.insert("/run/vc/vm/waiting".into());
    event(
        &mut w,
        &mut fx,
        VM,
        Change::DirAppeared(OsStr::new("waiting")),
    );

    fx.remove(VM);
    event(&mut w, &mut fx, VM, Change::Gone);
    assert_eq!(fx.stopped_sorted(), ["a", "b"]);
    assert!(w.sandboxes.is_empty());
    assert_eq!(fx.watched(), [("/run/vc".to_string(), WatchKind::Wait)]);

    mkdir_in(&mut w, &mut fx, "/run/vc", "vm");
    fx.mkdir("/run/vc/vm/a");
    event(&mut w, &mut fx, VM, Change::DirAppeared(OsStr::new("a")));
    assert_eq!(fx.served.len(), 3);
    assert_eq!(fx.served.last().map(String::as_str), Some("a"));
}

/// A root that cannot be watched fails the start; lost later, it is
/// retried until it can be.
#[test]
fn a_root_that_cannot_be_watched_is_retried() {
    let mut fx = Fake::with(&[VM]);
    fx.unwatchable.insert(VM.into());
    let mut w = Watcher::new(clh(), PORT, 8);
    let e = w.establish_root(&mut fx).unwrap_err();
    assert!(matches!(e, ListenError::WatchSandboxes { dir, .. } if dir == Path::new(VM)));

    let mut fx = Fake::with(&[VM]);
    let mut w = started(clh(), 8, &mut fx);
    fx.unwatchable.insert(VM.into());
    event(&mut w, &mut fx, VM, Change::Released);
    assert!(w.wants_retry());
    assert!(fx.watched().is_empty());
    w.step(&mut fx, Input::Retry);
    assert!(w.wants_retry());
    fx.unwatchable.clear();
    fx.mkdir("/run/vc/vm/a");
    w.step(&mut fx, Input::Retry);
    assert!(!w.wants_retry());
    assert_eq!(fx.served, ["a"]);
}

/// A sandbox that cannot be watched, bound or handed over is left alone
/// (no retry loop) until its directory goes and comes back.
#[test]
fn a_sandbox_that_cannot_be_served_is_retired() {
    let mut fx = Fake::with(&[VM]);
    let mut w = started(clh(), 8, &mut fx);
    fx.unwatchable.insert("/run/vc/vm/a".into());
    fx.unbindable.insert("/run/vc/vm/b/clh.sock_1024".into());
    fx.refusing = true;
    for id in ["a", "b", "c"] {
        mkdir_in(&mut w, &mut fx, VM, id);
        assert!(is_retired(&w, id), "{id}");
    }
    assert!(fx.served.is_empty());
    assert_eq!(fx.watched(), [(VM.to_string(), WatchKind::Root)]);
    w.step(&mut fx, Input::Overflow);
    assert!(fx.served.is_empty());

    fx.refusing = false;
    rmdir_in(&mut w, &mut fx, VM, "c");
    mkdir_in(&mut w, &mut fx, VM, "c");
    assert_eq!(fx.served, ["c"]);
    assert!(fx.stopped.is_empty(), "nothing served was stopped");
}

/// With events lost, the watcher checks every sandbox against the disk:
/// gone ones are stopped, waiting ones go down, a socket replaced by
/// someone else's retires its sandbox, new ones are served.
#[test]
fn an_overflow_reconciles_with_the_disk() {
    let mut fx = Fake::with(&["/run/vc/firecracker/a/root", "/run/vc/firecracker/b"]);
    fx.mkdir("/run/vc/firecracker/r/root");
    let mut w = started(firecracker(), 8, &mut fx);
    let mut served = fx.served.clone();
    served.sort();
    assert_eq!(served, ["a", "r"]);

    fx.remove("/run/vc/firecracker/a");
    fx.mkdir("/run/vc/firecracker/b/root");
    fx.mkdir("/run/vc/firecracker/c/root");
    fx.sockets
        .insert("/run/vc/firecracker/r/root/kata.hvsock_1024".into(), (9, 9));
    w.step(&mut fx, Input::Overflow);
    assert_eq!(fx.stopped_sorted(), ["a", "r"]);
    assert!(!w.sandboxes.contains_key("a"));
    assert!(is_retired(&w, "r"));
    let mut new = fx.served.get(2..).unwrap().to_vec();
    new.sort();
    assert_eq!(new, ["b", "c"]);
}

/// With events lost (queue overflow), looking again finds what
/// changed: a sandbox gone, a socket directory that appeared, a new
/// sandbox.
#[tokio::test]
async fn reconcile_catches_up_after_lost_events() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm");
    std::fs::create_dir_all(vm.join("a/root")).unwrap();
    std::fs::create_dir_all(vm.join("b")).unwrap();
    let template: SocketTemplate = format!("{}/{{ID}}/root/s.sock", vm.display())
        .parse()
        .unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    // Events are never read here: every change below is "lost".
    let inotify = Inotify::init().unwrap();
    let handoff = Handoff {
        main: tokio::runtime::Handle::current(),
        serve_tx: tx,
        shutdown: Shutdown::new(),
        inherited: None,
    };
    let mut host = Host::new(inotify.watches(), handoff);
    let mut w = Watcher::new(template, 7, 8);
    w.establish_root(&mut host).unwrap();
    let a: Serve = rx.try_recv().expect("a is served at start");
    assert_eq!(a.id, "a");
    assert!(matches!(
        w.sandboxes["b"].state,
        State::Waiting { depth: 0 }
    ));

    std::fs::remove_dir_all(vm.join("a")).unwrap();
    std::fs::create_dir(vm.join("b/root")).unwrap();
    std::fs::create_dir_all(vm.join("c/root")).unwrap();
    w.reconcile(&mut host);

    assert!(a.shutdown.is_stopping(), "a's listener is stopped");
    assert!(!w.sandboxes.contains_key("a"));
    let served: Vec<Serve> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    let mut ids: Vec<&str> = served.iter().map(|s| s.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["b", "c"]);
    assert!(vm.join("b/root/s.sock_7").exists());
    drop(served);
    assert!(
        !vm.join("b/root/s.sock_7").exists(),
        "removed with its listener"
    );
    assert!(w
        .sandboxes
        .values()
        .all(|s| matches!(s.state, State::Serving { .. })));
}
