//! Standard VSOCK (QEMU, vhost-vsock): an AF_VSOCK listener on the host.
//! Only bind and accept; the peer's CID tells guests apart.

use tokio_vsock::VsockAddr;

use super::ListenError;
use crate::config::VsockCid;

pub struct VsockListener {
    pub(crate) listener: tokio_vsock::VsockListener,
    pub(crate) cid: VsockCid,
    pub(crate) port: u32,
}

impl VsockListener {
    pub fn bind(cid: VsockCid, port: u32) -> Result<Self, ListenError> {
        let listener = tokio_vsock::VsockListener::bind(VsockAddr::new(cid.as_raw(), port))
            .map_err(|source| ListenError::BindVsock {
                cid: cid_str(cid),
                port,
                source,
            })?;
        Ok(Self {
            listener,
            cid,
            port,
        })
    }
}

pub(super) fn cid_str(cid: VsockCid) -> String {
    match cid {
        VsockCid::Any => "any".to_owned(),
        VsockCid::Cid(c) => c.to_string(),
    }
}
