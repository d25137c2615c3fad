//! `ferry pull --precopy`: while the source VM runs, the source's change
//! rounds are applied (the chunks it wrote made absent, durably, then
//! acknowledged) and nothing is served; `ferry switchover` asks the source
//! for its last changes, applies them, and the frontends start
//! (docs/decisions/precopy-switchover.md).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_store::Precopy;
use ferry_transport::{Changes, Client, ErrorCode, TransportError};

use super::control_socket::{PrecopyView, Verbs};
use super::Shell;

/// The connection to the source, once reached (a resumed pull reaches it
/// in the background).
pub(super) async fn client(shared: &Shell) -> Client {
    loop {
        if let Some(q) = shared.client_now() {
            return q.0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn set_view(verbs: &Verbs, phase: &str, generation: u64, switchover_ms: Option<f64>) {
    *verbs.precopy.lock().expect("precopy lock") = Some(PrecopyView {
        phase: phase.into(),
        generation,
        switchover_ms,
    });
}

/// Applies one generation durably; returns how many chunks go stale.
async fn apply(shared: &Shell, c: &Changes, switched: bool) -> Result<u64> {
    let n = shared
        .apply_changes(
            &c.chunks,
            c.everything,
            Precopy {
                generation: c.generation,
                switched,
            },
        )
        .await
        .with_context(|| {
            format!(
                "cannot apply generation {} of the source's changes",
                c.generation
            )
        })?;
    Ok(n)
}

/// Whether the source said its disk was changed behind its back.
fn source_changed(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::SourceChanged { .. }
            | TransportError::Remote {
                code: ErrorCode::SourceChanged,
                ..
            }
    )
}

/// A source changed behind its back stops the migration.
fn stop(shared: &Shell, e: TransportError) {
    tracing::error!(error = %e, "the source's disk was changed behind its back");
    shared.fail(ferry_core::Failure::SourceChanged(e.to_string()));
}

/// Follows the source's change rounds from generation `from` on, until
/// aborted: each applied durably, then acknowledged. A lost connection
/// subscribes again from the last generation applied.
pub(super) async fn follow_rounds(shared: Arc<Shell>, verbs: Arc<Verbs>, from: u64) {
    let mut applied = from;
    set_view(&verbs, "copying", applied, None);
    loop {
        let client = client(&shared).await;
        let mut feed = match client.precopy(applied).await {
            Ok(f) => f,
            Err(e) if source_changed(&e) => return stop(&shared, e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the source's changes; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let c = match feed.next().await {
                Ok(c) => c,
                Err(e) if source_changed(&e) => return stop(&shared, e),
                Err(e) => {
                    tracing::warn!(error = %e, "the source's change stream ended; following it again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            };
            match apply(&shared, &c, false).await {
                Ok(stale) => {
                    applied = c.generation;
                    set_view(&verbs, "copying", applied, None);
                    tracing::info!(
                        generation = c.generation,
                        everything = c.everything,
                        stale_chunks = stale,
                        "pre-copy: the source's changes applied"
                    );
                    if let Err(e) = feed.applied(applied).await {
                        tracing::debug!(error = %e, "cannot acknowledge the changes");
                    }
                }
                Err(e) => {
                    // Not acknowledged: asked for again from `applied`.
                    tracing::error!(error = %crate::logging::error_chain(&e), "pre-copy");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

/// The switchover: the source freezes and answers with what changed
/// after the last generation applied here; applied and recorded as
/// switched. The caller starts the frontends next.
pub(super) async fn switch(shared: &Shell, verbs: &Verbs) -> Result<Changes> {
    let from = applied(verbs);
    let client = client(shared).await;
    let t0 = std::time::Instant::now();
    let last = client
        .switchover(from)
        .await
        .context("the source did not switch over")?;
    let asked_ms = t0.elapsed().as_secs_f64() * 1e3;
    let stale = apply(shared, &last, true).await?;
    tracing::info!(
        since = from,
        generation = last.generation,
        stale_chunks = stale,
        asked_ms,
        applied_ms = t0.elapsed().as_secs_f64() * 1e3 - asked_ms,
        "switchover: the source's last changes applied"
    );
    set_view(verbs, "switched", last.generation, None);
    Ok(last)
}

/// The last generation applied (for rounds started again).
pub(super) fn applied(verbs: &Verbs) -> u64 {
    verbs
        .precopy
        .lock()
        .expect("precopy lock")
        .as_ref()
        .map_or(0, |p| p.generation)
}

/// Records the freeze-to-serving time once the frontends serve.
pub(super) fn switched(verbs: &Verbs, generation: u64, ms: f64) {
    set_view(verbs, "switched", generation, Some(ms));
}
