//! Standard VSOCK (QEMU, vhost-vsock): an AF_VSOCK listener on the host.
//!
//! Deliberately thin: bind and accept, with the peer's context id kept to
//! tell guests apart. Everything after `accept` is shared with hybrid VSOCK.

use std::io;

use tokio_vsock::{VsockAddr, VsockStream};

use super::ListenError;
use crate::config::VsockCid;

pub struct VsockListener {
    listener: tokio_vsock::VsockListener,
    cid: VsockCid,
    port: u32,
}

impl VsockListener {
    pub fn bind(cid: VsockCid, port: u32) -> Result<Self, ListenError> {
        let listener = tokio_vsock::VsockListener::bind(VsockAddr::new(cid.as_raw(), port))
            .map_err(|source| ListenError::BindVsock {
                cid: describe_cid(cid),
                port,
                source,
            })?;
        Ok(Self {
            listener,
            cid,
            port,
        })
    }

    /// A listener a previous forwarder bound and handed over (checked to be
    /// a listening AF_VSOCK socket by the hand-over).
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, cid: VsockCid, port: u32) -> Self {
        Self {
            listener: tokio_vsock::VsockListener::from(fd),
            cid,
            port,
        }
    }

    pub(crate) fn address(&self) -> (VsockCid, u32) {
        (self.cid, self.port)
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    pub fn describe(&self) -> String {
        format!("vsock cid {} port {}", describe_cid(self.cid), self.port)
    }

    pub(crate) async fn accept(&self) -> io::Result<(VsockStream, u32)> {
        let (stream, addr) = self.listener.accept().await?;
        Ok((stream, addr.cid()))
    }
}

fn describe_cid(cid: VsockCid) -> String {
    match cid {
        VsockCid::Any => "any".to_owned(),
        VsockCid::Cid(c) => c.to_string(),
    }
}
