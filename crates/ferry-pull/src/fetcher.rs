//! The source as the shell sees it: a chunk fetcher. The `ferry` binary
//! implements it over the QUIC client (`ferry_transport::Client`); tests
//! implement it in memory.

use std::future::Future;
use std::sync::Arc;

use ferry_core::engine::{FetchKind, Payload};
use ferry_core::Manifest;

/// A boxed error of the fetcher's own kind (transport errors, for the
/// binary), shown as is.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a fetch (or the manifest, or the source's acceptance) failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source is not the one the copy began with (its disk changed):
    /// the migration must stop.
    #[error("{0}")]
    SourceChanged(#[source] BoxError),
    /// Any other failure; a later attempt may work.
    #[error("{0}")]
    Failed(#[source] BoxError),
}

/// State of the connection to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Connected (as far as we know).
    Connected,
    /// The connection was lost and has not been re-established yet.
    Reconnecting,
}

/// Counters of the link to the source, for the status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// Connection state.
    pub state: ConnState,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Bytes received on the wire (headers and retransmissions included).
    pub wire_rx_bytes: u64,
    /// Bytes sent on the wire.
    pub wire_tx_bytes: u64,
    /// On-demand reads sent more than once.
    pub hedged_reads: u64,
    /// The source's last report of its lost packets, per million sent.
    pub source_lost_ppm: u32,
    /// Packets the source had sent on the current connection at its last
    /// report.
    pub source_sent_packets: u32,
    /// Bytes the source declared lost and sent again.
    pub source_retransmitted_bytes: u64,
}

/// A connection to the source, as the shell uses it. Cheap to clone (a
/// handle).
pub trait Fetcher: Clone + Send + Sync + 'static {
    /// Fetches `count` chunks from `first` on, at the priority of `kind`:
    /// one answer per chunk, in order.
    fn fetch(
        &self,
        first: u64,
        count: u32,
        kind: FetchKind,
    ) -> impl Future<Output = Result<Vec<Payload>, FetchError>> + Send;

    /// The source's manifest (zero chunks and hashes), as the source
    /// knew it when first asked: it may list chunks as unhashed.
    fn manifest(&self) -> impl Future<Output = Result<Arc<Manifest>, FetchError>> + Send;

    /// The source's complete manifest, every hash known (the source reads
    /// what it has not hashed yet), for verification. By default the
    /// manifest, for sources whose manifest is always complete.
    fn complete_manifest(&self) -> impl Future<Output = Result<Arc<Manifest>, FetchError>> + Send {
        self.manifest()
    }

    /// Whether the source has accepted us (see [`Fetcher::authenticated`]).
    fn is_authenticated(&self) -> bool;

    /// Waits until the source has accepted our certificate; an error if it
    /// refused us.
    fn authenticated(&self) -> impl Future<Output = Result<(), FetchError>> + Send;

    /// The link's counters.
    fn stats(&self) -> LinkStats;

    /// Lets the source go: nothing more is needed from it.
    fn close(&self);
}
