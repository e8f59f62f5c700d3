//! Template mode: one forwarder for every hybrid-VSOCK sandbox on a host.
//! For a template such as `/run/vc/vm/{ID}/clh.sock` (`kata-runtime env`),
//! the watcher follows each sandbox's directories down to the socket's,
//! binds `<socket>_<port>` and hands the listener to the async side here;
//! when the socket or a directory above it goes, the listener comes back to
//! the watcher to be dropped. A socket someone else removed is re-created
//! only once its sandbox directory has gone and come back.
//!
//! Sandbox directories are root's: one [`SandboxThread`] for every template
//! keeps CAP_DAC_OVERRIDE (it reads nothing from guests); glibc and musl
//! apply `setuid` to every thread, so it survives only on the one switching.

mod driver;
mod effects;
mod watcher;

use std::io;
use std::process::{Child, Command};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::hybrid::HybridListener;
use super::inherited::Inherited;
use super::{privileges, Adopted, Ended, ListenError, Listener, Serving};
use crate::addr::SocketTemplate;
use crate::handover::server::Launcher;
use crate::lifeline::{After, Lifeline, Next};
use crate::shutdown::Shutdown;
use driver::{Control, Driver, Handoff};
use watcher::Watcher;

/// A sandbox whose socket is bound, on its way to the async side.
struct Serve {
    id: String,
    listener: HybridListener,
    /// Stopped by the watcher when the sandbox goes, or with the forwarder.
    shutdown: Shutdown,
    adopted: Vec<Adopted>,
}

/// A template's watcher, as the async side sees it.
pub struct TemplateListener {
    template: SocketTemplate,
    pub(crate) describe: String,
    serve_rx: mpsc::Receiver<Serve>,
    /// Listeners go back to be dropped where their sockets can be removed.
    reap_tx: Option<mpsc::UnboundedSender<HybridListener>>,
    task: tokio::task::JoinHandle<()>,
    _thread: SandboxThread,
    control_tx: mpsc::UnboundedSender<Control>,
}

/// The one thread that makes and removes sockets in sandbox directories
/// (the templates' watchers run on its runtime); it ends with the last clone.
#[derive(Clone)]
pub struct SandboxThread {
    handle: Handle,
    _alive: mpsc::Sender<()>,
    pub(crate) inherited: Option<Arc<Inherited>>,
}

/// Its runtime's handle comes on `ready`; it runs until `alive` is dropped.
struct Launched {
    ready: oneshot::Receiver<Result<Handle, ListenError>>,
    alive: mpsc::Sender<()>,
}

const DAC_OVERRIDE: caps::Capability = caps::Capability::CAP_DAC_OVERRIDE;

/// Started before the runtime by [`SandboxThread::start_early`].
static EARLY: std::sync::Mutex<Option<Launched>> = std::sync::Mutex::new(None);

impl SandboxThread {
    /// With `become_user`, the process becomes it, this thread alone keeping CAP_DAC_OVERRIDE.
    pub(crate) async fn start(
        become_user: Option<String>,
        inherited: Option<&Arc<Inherited>>,
    ) -> Result<SandboxThread, ListenError> {
        let launched = match become_user {
            Some(user) => launch(move || privileges::drop_root(&user, Some(DAC_OVERRIDE)))?,
            None => match EARLY.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(early) => early,
                // Not root, nothing inherited: what the process has.
                None => launch(|| Ok(()))?,
            },
        };
        let handle = launched.ready.await.map_err(|_| {
            ListenError::StartWatcher("the sandbox watcher thread stopped".into())
        })??;
        Ok(SandboxThread {
            handle,
            _alive: launched.alive,
            inherited: inherited.cloned(),
        })
    }

    /// A template-mode predecessor's successor holds CAP_DAC_OVERRIDE on every
    /// thread (ambient: the only way across `exec`). Called first in `main`:
    /// the sandbox thread keeps it, this one (so every later one) drops all.
    pub fn start_early() -> Result<(), ListenError> {
        let dac = caps::has_cap(None, caps::CapSet::Permitted, DAC_OVERRIDE);
        if privileges::is_root() || !dac.unwrap_or(false) {
            return Ok(());
        }
        let launched = launch(|| {
            privileges::keep_on_this_thread("", Some(DAC_OVERRIDE))?;
            let kept = privileges::ON_THE_WATCHER;
            tracing::info!(kept, "privileges as handed over");
            Ok(())
        })?;
        *EARLY.lock().unwrap_or_else(|p| p.into_inner()) = Some(launched);
        privileges::keep_on_this_thread("", None)
    }
}

/// Starts the upgraded binary and becomes it on the sandbox thread if any, so
/// that its CAP_DAC_OVERRIDE passes on ([`SandboxThread::start_early`]).
impl Launcher for Option<SandboxThread> {
    fn spawn(&self, mut cmd: Command) -> BoxFuture<'_, io::Result<Child>> {
        let Some(thread) = self else {
            return Box::pin(std::future::ready(cmd.spawn()));
        };
        let task = thread
            .handle
            .spawn(async move { privileges::passing_dac_override(|| cmd.spawn()) });
        Box::pin(async {
            task.await
                .unwrap_or_else(|_| Err(io::Error::other(STOPPED)))
        })
    }

    fn exec(&self, exec: Box<dyn FnOnce() -> io::Error + Send>) -> io::Error {
        let Some(thread) = self else {
            return privileges::passing_dac_override(exec);
        };
        let (tx, rx) = std::sync::mpsc::channel();
        thread.handle.spawn(async move {
            let _ = tx.send(privileges::passing_dac_override(exec));
        });
        rx.recv().unwrap_or_else(|_| io::Error::other(STOPPED))
    }
}

const STOPPED: &str = "the sandbox thread stopped";

/// Starts the sandbox thread, which first settles its privileges.
fn launch(
    settle: impl FnOnce() -> Result<(), ListenError> + Send + 'static,
) -> Result<Launched, ListenError> {
    let (ready_tx, ready) = oneshot::channel();
    let (alive, mut alive_rx) = mpsc::channel::<()>(1);
    std::thread::Builder::new()
        .name("ktf-sandboxes".into())
        .spawn(move || {
            let rt = settle().and_then(|()| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                rt.map_err(|e| ListenError::StartWatcher(e.to_string()))
            });
            match rt {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async move { while alive_rx.recv().await.is_some() {} });
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| ListenError::StartWatcher(e.to_string()))?;
    Ok(Launched { ready, alive })
}

impl TemplateListener {
    /// Returns once the watcher watches; `shutdown` stops this template.
    pub async fn start_on(
        thread: &SandboxThread,
        template: SocketTemplate,
        port: u32,
        max_sandboxes: usize,
        shutdown: &Shutdown,
    ) -> Result<TemplateListener, ListenError> {
        // Bounded: when behind, the watcher drops a sandbox (with a warning).
        let (serve_tx, serve_rx) = mpsc::channel(max_sandboxes.clamp(16, 4096));
        let (reap_tx, reap_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let watcher = Watcher::new(template.clone(), port, max_sandboxes);
        let handoff = Handoff {
            main: Handle::current(),
            serve_tx,
            shutdown: shutdown.clone(),
            inherited: thread.inherited.clone(),
        };
        // On the sandbox thread: its runtime reads the events.
        let handle = &thread.handle;
        let driver = handle.spawn(async { Driver::start(watcher, handoff) });
        let stopped = |_| ListenError::StartWatcher("the sandbox watcher stopped".into());
        let driver = driver.await.map_err(stopped)??;
        let task = handle.spawn(driver.run(reap_rx, control_rx));
        Ok(TemplateListener {
            describe: format!(
                "hybrid vsock template unix:{template}_{port} (sandboxes in {}, at most {})",
                template.parent.display(),
                max_sandboxes
            ),
            template,
            serve_rx,
            reap_tx: Some(reap_tx),
            task,
            _thread: thread.clone(),
            control_tx,
        })
    }

    /// Serves what the watcher binds until shutdown, then gives it all back.
    pub(crate) async fn serve(mut self, serving: Serving, mut life: Lifeline) {
        let sandboxes = TaskTracker::new();
        let Some(reap) = self.reap_tx.clone() else {
            return;
        };
        let spawn = |serve: Serve, life: &Lifeline| {
            // Taken before the task runs: a pause from now on waits for it.
            let life = life.under(serve.shutdown.clone());
            let (serving, reap) = (serving.clone(), reap.clone());
            sandboxes.spawn(serve_sandbox(serve, serving, reap, life));
        };
        // A stopped watcher sends nothing: the lifeline is answered still.
        let mut watching = true;
        let handed_over = loop {
            let next = tokio::select! {
                biased;
                next = life.next() => match next {
                    Next::Drain => break false,
                    Next::Pause => match self.pause(&mut life, &spawn).await {
                        After::Resume => continue,
                        after => break after == After::Leave,
                    },
                },
                n = self.serve_rx.recv(), if watching => n,
            };
            match next {
                Some(serve) => spawn(serve, &life),
                None => {
                    tracing::error!("the sandbox watcher stopped; no new sandbox will be served");
                    watching = false;
                }
            }
        };
        drop(reap);
        self.return_unserved();
        sandboxes.close();
        sandboxes.wait().await;
        // With every listener back, the watcher removes them and exits.
        let _ = (&mut self.task).await;
        if handed_over {
            tracing::info!(template = %self.template, "handed over: the successor serves these sandboxes");
        } else {
            tracing::info!(template = %self.template, "stopped serving sandboxes");
        }
    }

    /// The watcher freezes (events wait in the kernel's queue), every sandbox
    /// it bound is served (so handed over too); it then follows the outcome.
    async fn pause(&mut self, life: &mut Lifeline, spawn: &impl Fn(Serve, &Lifeline)) -> After {
        let (frozen_tx, frozen_rx) = oneshot::channel();
        if self.control_tx.send(Control::Freeze(frozen_tx)).is_ok() {
            // Gone: the watcher has stopped, and binds nothing more.
            let _ = frozen_rx.await;
        }
        while let Ok(serve) = self.serve_rx.try_recv() {
            spawn(serve, life);
        }
        let after = life.pause_quiet().await;
        let _ = self.control_tx.send(match after {
            After::Leave => Control::Leave,
            After::Resume | After::Drain => Control::Thaw,
        });
        after
    }

    /// Gives back what was bound, not served; the watcher ends once all is.
    fn return_unserved(&mut self) {
        self.serve_rx.close();
        let reap = self.reap_tx.take();
        while let Ok(s) = self.serve_rx.try_recv() {
            if let Some(reap) = &reap {
                let _ = reap.send(s.listener);
            }
        }
    }
}

impl Drop for TemplateListener {
    fn drop(&mut self) {
        // Never served (startup failed): the watcher still removes its sockets.
        self.return_unserved();
    }
}

async fn serve_sandbox(
    serve: Serve,
    serving: Serving,
    reap: mpsc::UnboundedSender<HybridListener>,
    mut life: Lifeline,
) {
    let listener = Listener::Hybrid(serve.listener);
    let span = tracing::info_span!("sandbox", id = %serve.id);
    let run = serving.accept(&listener, &mut life, serve.adopted, Some(&serve.id));
    let ended = tracing::Instrument::instrument(run, span).await;
    if let Listener::Hybrid(l) = listener {
        match ended {
            Ended::HandedOver => l.release(),
            // If the watcher is gone, so is the process: nothing to return to.
            Ended::Stopped => {
                let _ = reap.send(l);
            }
        }
    }
}
