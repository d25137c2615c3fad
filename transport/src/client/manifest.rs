//! The manifest: fetched once on its own stream (re-issued across
//! reconnects like a read), checked against the Welcome, then cached; and
//! the complete manifest (every hash known) asked for at verification.

use std::sync::Arc;

use ferry_core::Manifest;
use quinn::Connection;

use super::{protocol, read_fail, remote, unexpected, write_fail, Client, Fail, SourceInfo};
use crate::codec;
use crate::error::TransportError;
use crate::wire::{Message, MAX_MANIFEST_PART};

impl Client {
    /// The source's manifest: fetched on the first call (on its own
    /// stream, re-issued across reconnects like a read), then cached. It
    /// must carry the source id of the Welcome. It may list chunks the
    /// source has not hashed yet.
    pub async fn manifest(&self) -> Result<Arc<Manifest>, TransportError> {
        let inner = &self.inner;
        inner
            .manifest
            .get_or_try_init(|| async {
                let m = inner
                    .with_retry("manifest", |conn| {
                        let info = inner.info;
                        async move { get_manifest(&conn, info, false).await }
                    })
                    .await?;
                Ok::<_, TransportError>(Arc::new(m))
            })
            .await
            .cloned()
    }

    /// The source's complete manifest: the source first hashes every
    /// chunk it has not read yet (whole-disk work at the source, so this
    /// may take as long as reading the disk). Not cached. Checked against
    /// the Welcome like [`Client::manifest`], and to be complete.
    pub async fn complete_manifest(&self) -> Result<Arc<Manifest>, TransportError> {
        let inner = &self.inner;
        let m = inner
            .with_retry("complete manifest", |conn| {
                let info = inner.info;
                async move { get_manifest(&conn, info, true).await }
            })
            .await?;
        if !m.is_complete() {
            return Err(TransportError::Protocol {
                op: "complete manifest",
                reason: format!("{} chunks still without a hash", m.unhashed()),
            });
        }
        Ok(Arc::new(m))
    }

    /// The manifest, if it has been fetched.
    pub fn manifest_if_fetched(&self) -> Option<Arc<Manifest>> {
        self.inner.manifest.get().cloned()
    }
}

/// Fetches the manifest (with `complete`, every hash known) on a new
/// stream and checks it against the Welcome.
async fn get_manifest(
    conn: &Connection,
    info: SourceInfo,
    complete: bool,
) -> Result<Manifest, Fail> {
    const OP: &str = "manifest";
    let (mut send, mut recv) = conn.open_bi().await.map_err(Fail::Lost)?;
    codec::write_msg(&mut send, &Message::GetManifest { complete })
        .await
        .map_err(|e| write_fail(OP, e))?;
    let _ = send.finish();
    let manifest_len = info.manifest_len;
    // `manifest_len` is what the manifest can grow to; it is shorter while
    // hashes are unknown.
    let mut bytes = Vec::with_capacity(manifest_len.min(64 << 20) as usize);
    loop {
        match codec::read_frame(&mut recv, MAX_MANIFEST_PART + 1)
            .await
            .map_err(|e| read_fail(OP, e))?
        {
            Some(Message::ManifestBytes(part)) => {
                if (bytes.len() + part.len()) as u64 > manifest_len {
                    return Err(protocol(OP, "more manifest bytes than announced".into()));
                }
                bytes.extend_from_slice(&part);
            }
            Some(Message::Error { code, message }) => return Err(remote(OP, code, message)),
            Some(m) => return Err(unexpected(OP, &m)),
            None => break,
        }
    }
    let m = Manifest::decode(&bytes).map_err(|e| Fail::Fatal(e.into()))?;
    if m.source_id() != info.source_id || m.geometry() != info.geometry {
        return Err(protocol(
            OP,
            "the manifest does not match the source id of the Welcome".into(),
        ));
    }
    Ok(m)
}
