//! The QUIC client as the pull's chunk fetcher ([`ferry_pull::Fetcher`]).

use std::sync::Arc;

use ferry_core::engine::{FetchKind, Payload};
use ferry_core::Manifest;
use ferry_pull::{ConnState, FetchError, Fetcher, LinkStats};
use ferry_transport::wire::ErrorCode;
use ferry_transport::{Client, Priority, TransportError};

/// A connection to the source over QUIC.
#[derive(Clone)]
pub(crate) struct Quic(pub(crate) Client);

fn fetch_error(e: TransportError) -> FetchError {
    match e {
        e @ TransportError::SourceChanged { .. } => FetchError::SourceChanged(Box::new(e)),
        // The source's disk was written behind its back: it refuses to
        // serve it any more.
        e @ TransportError::Remote {
            code: ErrorCode::SourceChanged,
            ..
        } => FetchError::SourceChanged(Box::new(e)),
        e => FetchError::Failed(Box::new(e)),
    }
}

impl Fetcher for Quic {
    async fn fetch(
        &self,
        first: u64,
        count: u32,
        kind: FetchKind,
    ) -> Result<Vec<Payload>, FetchError> {
        let priority = match kind {
            FetchKind::OnDemand => Priority::OnDemand,
            FetchKind::Background => Priority::Background,
        };
        let chunks = self
            .0
            .read_chunks(first, count, priority)
            .await
            .map_err(fetch_error)?;
        Ok(chunks
            .into_iter()
            .map(|c| match c {
                ferry_transport::Fetched::Data { hash, bytes } => Payload::Data { hash, bytes },
                ferry_transport::Fetched::Zero => Payload::Zero,
            })
            .collect())
    }

    async fn manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        self.0.manifest().await.map_err(fetch_error)
    }

    async fn complete_manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        self.0.complete_manifest().await.map_err(fetch_error)
    }

    fn is_authenticated(&self) -> bool {
        self.0.is_authenticated()
    }

    async fn authenticated(&self) -> Result<(), FetchError> {
        self.0.authenticated().await.map_err(fetch_error)
    }

    fn stats(&self) -> LinkStats {
        let s = self.0.stats();
        LinkStats {
            state: match s.state {
                ferry_transport::ConnState::Connected => ConnState::Connected,
                ferry_transport::ConnState::Reconnecting => ConnState::Reconnecting,
            },
            reconnects: s.reconnects,
            wire_rx_bytes: s.wire_rx_bytes,
            wire_tx_bytes: s.wire_tx_bytes,
            hedged_reads: s.hedged_reads,
            source_lost_ppm: s.source_lost_ppm,
            source_sent_packets: s.source_sent_packets,
            source_retransmitted_bytes: s.source_retransmitted_bytes,
        }
    }

    fn close(&self) {
        self.0.close();
    }
}
