//! The running forwarder's side of a hand-over: answering successors on
//! the hand-off socket, and starting one on `SIGHUP`.
//!
//! A successor is checked by `SO_PEERCRED` before it may ask
//! ([`Server::trusts`]), never by uid alone (`nobody` is shared); anyone else
//! is refused and logged, and nothing pauses. Each step has a deadline, and
//! failed hand-overs back off: not even a trusted peer can pause the agents
//! over and over.
//!
//! `SIGHUP` starts the binary at the path we were started from
//! (`/proc/self/exe` would name the replaced file) as a bridge; once flushed,
//! we execute it ourselves ([`Reexec`]), keeping the service's PID.

use std::ffi::{CString, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sd_notify::NotifyState;
use tokio::signal::unix::Signal;
use tokio::time::Instant;

use nix::sys::socket::{getsockopt, sockopt, UnixCredentials};

use super::hub::{Hub, Piece, PieceKind};
use super::wire::{self, ListenerKind, ListenerState, State};
use super::{fds, HandOverError, HandoffListener, ACK, MAX_REASON, REFUSED, REQUEST, STATE};

const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest an upgraded binary may take to ask for the hand-over.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a trusted peer may take to ask (no other is answered meanwhile).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the agents stay paused for the successor's ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait after a failed hand-over, doubled per further one up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Starts the upgraded binary, and replaces this process by it, from the
/// thread holding a privilege to pass on (template mode's CAP_DAC_OVERRIDE).
pub(crate) trait Launcher: Send + Sync {
    fn spawn(&self, cmd: Command) -> BoxFuture<'_, io::Result<Child>>;
    /// Runs `exec` (an `execve`, returning only on failure). Blocking.
    fn exec(&self, exec: Box<dyn FnOnce() -> io::Error + Send>) -> io::Error;
}

/// Set by `SIGHUP`: take over rather than bind, even at the default path.
pub(crate) const TAKE_OVER_ENV: &str = "KATA_TRACE_FORWARDER_TAKE_OVER";
/// Set by `SIGHUP` in a bridge, which is not the service's process.
pub(crate) const BRIDGE_ENV: &str = "KATA_TRACE_FORWARDER_BRIDGE";

/// Whether we were started with `name` set and not blank (as the configuration reads any).
pub(crate) fn started_with(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

#[derive(Debug, Clone)]
pub struct Upgrade {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

pub(crate) struct Committed {
    pub successor_pid: i32,
    /// The successor is our `SIGHUP` bridge: execute the binary once flushed.
    pub reexec: Option<Reexec>,
}

pub(crate) struct Server {
    pub(crate) listener: HandoffListener,
    hub: Arc<Hub>,
    upgrade: Option<(Upgrade, Signal)>,
    launcher: Arc<dyn Launcher>,
    /// In a bridge: the parent that started it.
    parent: Option<i32>,
    /// The `SIGHUP` child, until it takes over or fails; killed on drop.
    child: Option<(Child, Instant)>,
    /// Whether an upgrade is under way, for a stop to wait on.
    upgrading: tokio::sync::watch::Sender<bool>,
    /// Failed hand-overs in a row, and until when the next is refused.
    failures: u32,
    backoff_until: Option<Instant>,
    pub(crate) status: Option<Arc<crate::status::Board>>,
}

impl Server {
    pub(crate) fn new(
        listener: HandoffListener,
        hub: Arc<Hub>,
        upgrade: Option<(Upgrade, Signal)>,
        launcher: Arc<dyn Launcher>,
        parent: Option<i32>,
    ) -> Server {
        Server {
            listener,
            hub,
            upgrade,
            launcher,
            parent,
            child: None,
            upgrading: tokio::sync::watch::Sender::new(false),
            failures: 0,
            backoff_until: None,
            status: None,
        }
    }

    pub(crate) fn upgrading(&self) -> tokio::sync::watch::Receiver<bool> {
        self.upgrading.subscribe()
    }

    /// Root, our `SIGHUP` bridge, or, in a bridge, its parent. The last two by
    /// pid: a child's is not reused until we reap it, and a parent's counts
    /// only while it is still our parent (else we were re-parented).
    fn trusts(&self, peer: UnixCredentials) -> bool {
        peer.uid() == 0
            || self.bridge() == Some(peer.pid())
            || (self.parent == Some(peer.pid()) && nix::unistd::getppid().as_raw() == peer.pid())
    }

    fn bridge(&self) -> Option<i32> {
        self.child.as_ref().map(|(c, _)| c.id() as i32)
    }

    fn set_child(&mut self, child: Option<(Child, Instant)>) {
        self.child = child;
        self.upgrading.send_replace(self.child.is_some());
    }

    /// Serves successors, and upgrades on `SIGHUP`, until a hand-over commits.
    pub(crate) async fn run(&mut self) -> Committed {
        loop {
            tokio::select! {
                accepted = self.listener.listener.accept() => {
                    let stream = match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "hand-off socket: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if let Some(done) = self.answer(stream).await {
                        self.listener.remove = false;
                        // Not waited for: the re-executed process reaps it.
                        std::mem::forget(self.child.take());
                        return done;
                    }
                    if self.child.is_some() {
                        notify(&[NotifyState::Ready]);
                    }
                }
                Some(()) = async { self.upgrade.as_mut()?.1.recv().await } => {
                    if self.child.is_some() {
                        tracing::warn!("SIGHUP: an upgrade is already under way");
                        continue;
                    }
                    let child = self.start_upgrade().await.map(|c| (c, Instant::now()));
                    self.set_child(child);
                }
                () = tokio::time::sleep(Duration::from_millis(20)), if self.child.is_some() => {
                    let Some((c, since)) = self.child.as_mut() else { continue };
                    match c.try_wait() {
                        Ok(Some(status)) => tracing::error!(%status, "upgrade failed: the new binary exited before taking over; still serving"),
                        Ok(None) if since.elapsed() > UPGRADE_TIMEOUT => {
                            tracing::error!(timeout = ?UPGRADE_TIMEOUT, "upgrade failed: the new binary did not take over in time; stopping it, still serving");
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                        Ok(None) => continue,
                        // Stopped like a late one, so that systemd hears READY after RELOADING.
                        Err(e) => {
                            tracing::error!(error = %e, "upgrade: waiting on the new binary");
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                    self.set_child(None);
                    notify(&[NotifyState::Ready]);
                }
            }
        }
    }

    async fn start_upgrade(&self) -> Option<Child> {
        let (up, _) = self.upgrade.as_ref()?;
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now().ok());
        notify(&reloading);
        tracing::info!(exe = %up.exe.display(), "SIGHUP: starting the binary to hand over to");
        let mut cmd = Command::new(&up.exe);
        cmd.args(&up.args)
            .env(TAKE_OVER_ENV, "1")
            .env(BRIDGE_ENV, "1")
            .stdin(Stdio::null());
        let started = self.launcher.spawn(cmd).await.inspect_err(|e| {
            tracing::error!(exe = %up.exe.display(), error = %e, "upgrade failed: the new binary did not start; still serving");
            notify(&[NotifyState::Ready]);
        });
        started.ok()
    }

    async fn answer(&mut self, stream: tokio::net::UnixStream) -> Option<Committed> {
        let bridge = self.bridge();
        let peer = getsockopt(&stream, sockopt::PeerCredentials)
            .inspect_err(
                |e| tracing::warn!(error = %e, "hand-off socket: reading the peer's credentials"),
            )
            .ok()?;
        let pid = peer.pid();
        if !self.trusts(peer) {
            tracing::warn!(
                uid = peer.uid(),
                pid,
                bridge,
                parent = self.parent,
                "hand-off socket: refused a takeover by a process that is neither root nor the successor we started"
            );
            return None;
        }
        let stream = stream
            .into_std()
            .and_then(|s| {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                s.set_write_timeout(Some(ACK_TIMEOUT))?;
                Ok(s)
            })
            .inspect_err(
                |e| tracing::warn!(error = %e, "hand-off socket: preparing the connection"),
            )
            .ok()?;
        // Blocking, off the runtime: short, and the agents are paused anyway.
        let read = blocking(stream, |s| {
            let mut req = [0u8; REQUEST.len()];
            s.read_exact(&mut req).map(|()| req)
        });
        let stream = match read.await {
            Ok((REQUEST, stream)) => stream,
            // Answered aside: nothing pauses, and nobody next is kept waiting.
            Ok((crate::status::REQUEST, stream)) => {
                if let Some(board) = &self.status {
                    board.answer(stream, self.listener.path.clone(), pid);
                }
                return None;
            }
            Ok(_) => {
                tracing::warn!(pid, "hand-off socket: not a forwarder's request; closed");
                return None;
            }
            // A forwarder that found this socket live closes without asking.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!(pid, "hand-off socket: closed without a request");
                return None;
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "hand-off socket: reading the request");
                return None;
            }
        };
        if let Some(until) = self.backoff_until.filter(|u| *u > Instant::now()) {
            let (wait, failures) = (until - Instant::now(), self.failures);
            tracing::warn!(pid, failures, retry_in = ?wait, "hand-off socket: refused a takeover: backing off after failed hand-overs");
            let why = format!("{failures} hand-overs failed in a row; retry in {wait:?}");
            refuse(stream, why).await;
            return None;
        }
        let _ = stream.set_read_timeout(Some(ACK_TIMEOUT));
        tracing::info!(pid, "handing over to a successor: pausing every connection");
        let started = Instant::now();
        let built = match self.hub.pause(PAUSE_TIMEOUT).await {
            Some(pieces) => self.state(pieces).map_err(|e| {
                tracing::error!(error = %e, "hand-over: building the state; resuming");
                e.to_string()
            }),
            None => Err("the connections did not pause in time".to_owned()),
        };
        let (state, owned) = match built {
            Ok(s) => s,
            Err(why) => {
                self.hub.settle(false);
                refuse(stream, why).await;
                return None;
            }
        };
        let (listeners, connections) = (state.listeners.len(), state.connections.len());
        let res = blocking(stream, move |s| {
            let msg = wire::encode(&state).map_err(io::Error::other)?;
            s.write_all(&[STATE])?;
            s.write_all(&msg)?;
            let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(AsFd::as_fd).collect();
            fds::send(s.as_fd(), &borrowed)?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack)?;
            Ok(ack[0] == ACK)
        })
        .await
        .map(|(acked, _)| acked);
        self.hub.settle(matches!(res, Ok(true)));
        if let Ok(false) | Err(_) = res {
            self.failures = self.failures.saturating_add(1);
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << self.failures.saturating_sub(1).min(6))
                .min(MAX_BACKOFF);
            self.backoff_until = Some(Instant::now() + backoff);
            let why = res.err().map(|e| e.to_string());
            tracing::error!(
                successor = pid,
                error = why.as_deref().unwrap_or("no acknowledgement"),
                "hand-over failed: the successor did not take it; resuming"
            );
            return None;
        }
        tracing::info!(
            successor = pid,
            listeners,
            connections,
            paused_for = ?started.elapsed(),
            "handed over: every listener and connection is the successor's"
        );
        // A bridge is not the service's process: we, re-executed, are.
        let up = self.upgrade.as_ref().filter(|_| bridge == Some(pid));
        let reexec = up.map(|(upgrade, _)| Reexec {
            upgrade: upgrade.clone(),
            bridge_pid: pid,
            launcher: Arc::clone(&self.launcher),
            stop: false,
        });
        if reexec.is_none() {
            notify(&[NotifyState::MainPid(pid as u32)]);
        }
        Some(Committed {
            successor_pid: pid,
            reexec,
        })
    }

    /// The state and its descriptors, in the order [`wire`] gives.
    fn state(&self, mut pieces: Vec<(u64, Piece)>) -> Result<(State, Vec<OwnedFd>), HandOverError> {
        let dup = |fd: BorrowedFd<'_>, what: &str| {
            fd.try_clone_to_owned().map_err(|e| {
                HandOverError::EncodeState(format!("duplicating the hand-off {what}: {e}"))
            })
        };
        let fd = dup(self.listener.listener.as_fd(), "socket")?;
        let pipe = self.listener.janitor.as_ref().and_then(|j| j.pipe.as_ref());
        let janitor = pipe.map(|p| dup(p.as_fd(), "janitor's pipe")).transpose()?;
        let (path, identity) = (self.listener.path.clone(), self.listener.identity);
        let kind = ListenerKind::Handoff { path, identity };
        // Id 0 is no member's: the hand-off socket goes first.
        let what = PieceKind::Listener { kind, janitor };
        pieces.insert(0, (0, Piece { what, fd }));
        let (mut listeners, mut connections, mut fds) = (Vec::new(), Vec::new(), Vec::new());
        let mut index = std::collections::HashMap::new();
        pieces.sort_by_key(|(_, p)| matches!(p.what, PieceKind::Connection(..)));
        for (id, piece) in pieces {
            fds.push(piece.fd);
            match piece.what {
                PieceKind::Listener { kind, janitor } => {
                    index.insert(id, listeners.len() as u32);
                    listeners.push(ListenerState {
                        janitor: janitor.is_some(),
                        kind,
                    });
                    fds.extend(janitor);
                }
                PieceKind::Connection(listener, mut state) => {
                    state.listener = *index.get(&listener).ok_or_else(|| {
                        HandOverError::EncodeState(
                            "a connection whose listener is not handed over".into(),
                        )
                    })?;
                    connections.push(state);
                }
            }
        }
        let state = State {
            pid: std::process::id(),
            listeners,
            connections,
        };
        Ok((state, fds))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Left on an error: the new binary has taken nothing; it must not serve alone.
        if let Some((mut c, _)) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Once the bridge serves: this process becomes the upgraded binary (same PID).
pub struct Reexec {
    pub(crate) upgrade: Upgrade,
    pub(crate) bridge_pid: i32,
    pub(crate) launcher: Arc<dyn Launcher>,
    /// A stop was asked during the upgrade: the new binary finds `SIGTERM`
    /// pending and stops once it has taken everything back.
    pub stop: bool,
}

impl Reexec {
    /// Becomes the upgraded binary (returns only on failure). Call flushed,
    /// off the runtime, with the signals held ([`crate::shutdown::SignalGate`])
    /// to stay pending: hence `execve`, not `Command::exec`, which unblocks all.
    pub fn exec(&self) -> io::Error {
        tracing::info!(exe = %self.upgrade.exe.display(), bridge = self.bridge_pid, stop = self.stop, "upgrade: becoming the new binary, which takes over from the bridge");
        if self.stop {
            // Blocked everywhere: pending until the new binary handles it.
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGTERM);
        }
        match self.execve_args() {
            Ok((path, argv, env)) => self.launcher.exec(Box::new(move || {
                nix::unistd::execve(&path, &argv, &env)
                    .map_or_else(Into::into, |never| match never {})
            })),
            Err(e) => e,
        }
    }

    /// Our path, arguments and environment, as a successor, not a bridge.
    fn execve_args(&self) -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        use std::os::unix::ffi::OsStrExt;
        let c =
            |b: &[u8]| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
        let path = c(self.upgrade.exe.as_os_str().as_bytes())?;
        let args = self.upgrade.args.iter().map(|a| c(a.as_bytes()));
        let argv = std::iter::once(Ok(path.clone())).chain(args);
        let argv = argv.collect::<io::Result<_>>()?;
        let env = std::env::vars_os()
            .filter(|(k, _)| k != BRIDGE_ENV && k != TAKE_OVER_ENV)
            .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .chain([c(format!("{TAKE_OVER_ENV}=1").as_bytes())])
            .collect::<io::Result<_>>()?;
        Ok((path, argv, env))
    }

    /// After a failed [`exec`](Self::exec): the bridge is the service's process.
    pub fn give_way(self) {
        let bridge = self.bridge_pid;
        tracing::error!(
            bridge,
            "upgrade: could not become the new binary; the bridge serves on as the service's process"
        );
        notify(&[NotifyState::MainPid(bridge as u32), NotifyState::Ready]);
    }
}

async fn blocking<T: Send + 'static>(
    mut stream: StdUnixStream,
    f: impl FnOnce(&mut StdUnixStream) -> io::Result<T> + Send + 'static,
) -> io::Result<(T, StdUnixStream)> {
    let done = tokio::task::spawn_blocking(move || f(&mut stream).map(|r| (r, stream)));
    done.await.map_err(io::Error::other)?
}

async fn refuse(stream: StdUnixStream, why: String) {
    let _ = blocking(stream, move |s| {
        let why = why.as_bytes();
        let why = why.get(..why.len().min(MAX_REASON)).unwrap_or_default();
        s.write_all(&[REFUSED])?;
        s.write_all(&(why.len() as u32).to_be_bytes())?;
        s.write_all(why)
    })
    .await;
}

/// Tells systemd, when it supervises us (`Type=notify`); a no-op otherwise.
pub(crate) fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify");
    }
}
