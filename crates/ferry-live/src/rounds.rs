//! [`ChangeTracker`]: pre-copy rounds from dirty-bitmap generations.
//!
//! QEMU refuses to clear, disable or merge into a bitmap while it is
//! exported, and a clear after a read would lose the writes between the
//! two, so a round never clears: generation `g(n)` records; a round runs
//! one QMP `transaction` {add `g(n+1)`, disable `g(n)`} (every later write
//! lands in `g(n+1)`), exports the frozen `g(n)` read-only on an export
//! of its own (an export's bitmaps are fixed when it is added), reads its
//! `qemu:dirty-bitmap` context, and unexports it. `g(n)` is kept until the
//! caller has sent the round's chunks ([`ChangeTracker::complete`]: removed)
//! or failed to ([`ChangeTracker::abandon`]: merged back into the
//! recording generation, so the next round reports its chunks again).

use std::time::{Duration, Instant};

use ferry_nbd_client::{NbdAddr, NbdUri};
use serde_json::{json, Value};

use crate::chunks::ChunkSet;
use crate::error::LiveError;
use crate::qmp::Qmp;
use crate::source::{dirty_chunks, LiveSource};
use crate::watch::WriteWatch;
use crate::DEFAULT_CHUNK_SIZE;

/// Smallest and largest granularity QEMU accepts for a dirty bitmap.
const MIN_GRANULARITY: u32 = 512;
const MAX_GRANULARITY: u32 = 1 << 31;
/// Pause between two looks at whether an export is gone.
const UNEXPORT_POLL: Duration = Duration::from_millis(50);

/// What the tracker works on and its limits.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// The block node the VM writes (its `node-name`).
    pub node: String,
    /// Prefix of the bitmaps and round exports: `PREFIX-gN`.
    pub prefix: String,
    /// Granularity of the bitmaps: a power of two that divides the
    /// source's chunk size.
    pub granularity: u32,
    /// Most rounds before the final one ([`ChangeTracker::next_round`]
    /// fails with [`LiveError::TooManyRounds`] after that).
    pub max_rounds: u32,
    /// How long an unexported round export may take to go away.
    pub unexport_timeout: Duration,
}

impl TrackerConfig {
    /// Defaults for `node`: prefix `ferry`, 64 KiB grains, 64 rounds, 60 s.
    pub fn new(node: &str) -> TrackerConfig {
        TrackerConfig {
            node: node.into(),
            prefix: "ferry".into(),
            granularity: DEFAULT_CHUNK_SIZE,
            max_rounds: 64,
            unexport_timeout: Duration::from_secs(60),
        }
    }
}

/// One round's result: the chunks written during generation
/// [`generation`](Self::generation). Hand it back to
/// [`ChangeTracker::complete`] once they are sent, or to
/// [`ChangeTracker::abandon`] if they could not be.
#[derive(Debug)]
#[must_use = "a round must be completed or abandoned"]
pub struct Round {
    generation: u32,
    dirty: ChunkSet,
    is_final: bool,
}

impl Round {
    /// The generation this round froze and read.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The chunks written during it.
    pub fn dirty(&self) -> &ChunkSet {
        &self.dirty
    }

    /// Whether it is the final round (taken with the VM paused).
    pub fn is_final(&self) -> bool {
        self.is_final
    }
}

/// Pre-copy rounds over dirty-bitmap generations of one node, driven over
/// QMP; the round exports are added on the NBD server of the
/// [`LiveSource`] (the same `nbd-server-start`).
#[derive(Debug)]
pub struct ChangeTracker {
    qmp: Qmp,
    cfg: TrackerConfig,
    server: NbdAddr,
    chunk_size: u32,
    map_timeout: Duration,
    recording: u32,
    pending: Option<u32>,
    rounds_done: u32,
    finished: bool,
}

impl ChangeTracker {
    /// Starts recording: adds generation `g0` to `cfg.node`. Call it before
    /// the first read of round 0, so that every write after that read is
    /// in a generation.
    pub async fn start(
        mut qmp: Qmp,
        source: &LiveSource,
        cfg: TrackerConfig,
    ) -> Result<ChangeTracker, LiveError> {
        let g = cfg.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(LiveError::Config {
                what: "bitmap granularity",
                value: u64::from(g),
                reason: format!(
                    "must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}"
                ),
            });
        }
        let chunk_size = source.chunk_size();
        if g > chunk_size {
            return Err(LiveError::GranularityTooCoarse {
                granularity: g,
                chunk_size,
            });
        }
        if !chunk_size.is_multiple_of(g) {
            return Err(LiveError::Config {
                what: "chunk size",
                value: u64::from(chunk_size),
                reason: format!("not a multiple of the bitmap granularity {g}"),
            });
        }
        if cfg.prefix.is_empty() || cfg.prefix.len() > 200 {
            return Err(LiveError::Config {
                what: "name prefix length",
                value: cfg.prefix.len() as u64,
                reason: "must be 1 to 200 bytes".into(),
            });
        }
        let name = gen_name(&cfg.prefix, 0);
        qmp.execute(
            "block-dirty-bitmap-add",
            json!({ "node": cfg.node, "name": name, "granularity": g }),
        )
        .await
        .map_err(|source| LiveError::Qmp {
            during: format!("adding dirty bitmap {name:?} to node {:?}", cfg.node),
            source,
        })?;
        Ok(ChangeTracker {
            qmp,
            server: source.uri().addr.clone(),
            chunk_size,
            map_timeout: source.config().map_timeout,
            cfg,
            recording: 0,
            pending: None,
            rounds_done: 0,
            finished: false,
        })
    }

    /// The generation recording now.
    pub fn recording(&self) -> u32 {
        self.recording
    }

    /// Rounds completed so far.
    pub fn rounds_done(&self) -> u32 {
        self.rounds_done
    }

    /// The name of generation `n`'s bitmap (and of its round export).
    pub fn generation_name(&self, n: u32) -> String {
        gen_name(&self.cfg.prefix, n)
    }

    /// Ends the recording generation and returns the chunks written
    /// during it. If anything fails after the switch, the frozen
    /// generation is merged back ([`LiveError::RoundFailed`]).
    pub async fn next_round(&mut self) -> Result<Round, LiveError> {
        if self.rounds_done >= self.cfg.max_rounds {
            return Err(LiveError::TooManyRounds {
                max: self.cfg.max_rounds,
            });
        }
        self.round(false).await
    }

    /// The same as [`next_round`](Self::next_round), with the VM paused:
    /// its set is the final change list. Once completed, the tracker is
    /// finished (every bitmap removed); abandoned, it can be taken again.
    pub async fn final_round(&mut self) -> Result<Round, LiveError> {
        self.round(true).await
    }

    async fn round(&mut self, is_final: bool) -> Result<Round, LiveError> {
        if self.finished {
            return Err(LiveError::State("the final round is done".into()));
        }
        if let Some(g) = self.pending {
            return Err(LiveError::State(format!(
                "round {g} is neither completed nor abandoned"
            )));
        }
        let n = self.recording;
        let old = self.generation_name(n);
        let new = self.generation_name(n + 1);
        self.qmp_do(
            format!("switching generation {old:?} to {new:?}"),
            "transaction",
            json!({ "actions": [
                { "type": "block-dirty-bitmap-add",
                  "data": { "node": self.cfg.node, "name": new,
                            "granularity": self.cfg.granularity } },
                { "type": "block-dirty-bitmap-disable",
                  "data": { "node": self.cfg.node, "name": old } },
            ] }),
        )
        .await?;
        self.recording = n + 1;
        self.pending = Some(n);
        match self.read_generation(n).await {
            Ok(dirty) => Ok(Round {
                generation: n,
                dirty,
                is_final,
            }),
            Err(cause) => Err(self.merge_back(n, cause).await),
        }
    }

    /// Exports frozen generation `n`, reads it, unexports it.
    async fn read_generation(&mut self, n: u32) -> Result<ChunkSet, LiveError> {
        let name = self.generation_name(n);
        self.qmp_do(
            format!("exporting generation {name:?}"),
            "block-export-add",
            json!({ "type": "nbd", "id": name, "node-name": self.cfg.node, "name": name,
                    "writable": false, "bitmaps": [name] }),
        )
        .await?;
        let uri = NbdUri {
            addr: self.server.clone(),
            export: name.clone(),
        };
        let read = dirty_chunks(&uri, &name, self.chunk_size, self.map_timeout).await;
        let gone = self.unexport(&name).await;
        let dirty = read?;
        gone?;
        Ok(dirty)
    }

    /// Deletes export `name` (dropping any client) and waits until QEMU
    /// has let go of it (its bitmap stays busy until then).
    async fn unexport(&mut self, name: &str) -> Result<(), LiveError> {
        self.qmp_do(
            format!("unexporting {name:?}"),
            "block-export-del",
            json!({ "id": name, "mode": "hard" }),
        )
        .await?;
        let t0 = Instant::now();
        loop {
            if !self
                .export_present(name, format!("waiting for export {name:?} to go"))
                .await?
            {
                return Ok(());
            }
            if t0.elapsed() > self.cfg.unexport_timeout {
                return Err(LiveError::Timeout {
                    during: format!("waiting for export {name:?} to go"),
                    after: self.cfg.unexport_timeout,
                });
            }
            tokio::time::sleep(UNEXPORT_POLL).await;
        }
    }

    /// Merges frozen generation `n` into the recording one and removes
    /// it; the error to return for the round that failed with `cause`.
    async fn merge_back(&mut self, n: u32, cause: LiveError) -> LiveError {
        let name = self.generation_name(n);
        // The export may still exist if the failure came before its
        // removal; it must go before the bitmap can be merged.
        let _ = self.unexport_if_present(&name).await;
        let target = self.generation_name(self.recording);
        let merged = self
            .qmp_do(
                format!("merging failed round {name:?} back into {target:?}"),
                "block-dirty-bitmap-merge",
                json!({ "node": self.cfg.node, "target": target, "bitmaps": [name] }),
            )
            .await;
        if let Err(e) = merged {
            return LiveError::ChangesLost {
                round: n,
                bitmap: name,
                cause: cause.to_string(),
                merge: e.to_string(),
            };
        }
        self.pending = None;
        // Merged: a bitmap left behind costs memory only.
        let _ = self.remove_bitmap(&name).await;
        LiveError::RoundFailed {
            round: n,
            source: Box::new(cause),
        }
    }

    /// Whether a block export with id `name` exists (`during`: what the
    /// query is for, in errors).
    async fn export_present(&mut self, name: &str, during: String) -> Result<bool, LiveError> {
        let list = self
            .qmp_do(during, "query-block-exports", json!({}))
            .await?;
        Ok(list.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e.get("id").and_then(Value::as_str) == Some(name))
        }))
    }

    async fn unexport_if_present(&mut self, name: &str) -> Result<(), LiveError> {
        if self
            .export_present(name, format!("looking for export {name:?}"))
            .await?
        {
            self.unexport(name).await?;
        }
        Ok(())
    }

    async fn remove_bitmap(&mut self, name: &str) -> Result<(), LiveError> {
        self.qmp_do(
            format!("removing dirty bitmap {name:?}"),
            "block-dirty-bitmap-remove",
            json!({ "node": self.cfg.node, "name": name }),
        )
        .await
        .map(drop)
    }

    fn check_pending(&self, round: &Round) -> Result<(), LiveError> {
        if self.pending != Some(round.generation) {
            return Err(LiveError::State(format!(
                "round {} is not the round in progress ({:?})",
                round.generation, self.pending
            )));
        }
        Ok(())
    }

    /// The round's chunks were sent: its generation is removed. After the
    /// final round, the recording generation is removed too and the
    /// tracker is finished.
    pub async fn complete(&mut self, round: Round) -> Result<(), LiveError> {
        self.check_pending(&round)?;
        let name = self.generation_name(round.generation);
        self.remove_bitmap(&name).await?;
        self.pending = None;
        self.rounds_done += 1;
        if round.is_final {
            let rec = self.generation_name(self.recording);
            self.remove_bitmap(&rec).await?;
            self.finished = true;
        }
        Ok(())
    }

    /// The round's chunks could not be sent: its generation is merged
    /// back into the recording one, so the next round reports them again.
    pub async fn abandon(&mut self, round: Round) -> Result<(), LiveError> {
        self.check_pending(&round)?;
        match self
            .merge_back(round.generation, LiveError::State("abandoned".into()))
            .await
        {
            LiveError::RoundFailed { .. } => Ok(()),
            e => Err(e),
        }
    }

    /// Completes the final round and keeps the generation recording since
    /// its switch as a [`WriteWatch`]: with the VM paused it stays empty,
    /// and a write after the final round shows in its count (the final
    /// list would have missed it). The frozen generation is removed (best
    /// effort: left behind, a disabled bitmap costs memory only).
    pub async fn into_watch(mut self, round: Round) -> Result<WriteWatch, LiveError> {
        self.check_pending(&round)?;
        if !round.is_final {
            return Err(LiveError::State(format!(
                "round {} is not the final round",
                round.generation
            )));
        }
        let name = self.generation_name(round.generation);
        let _ = self.remove_bitmap(&name).await;
        let rec = self.generation_name(self.recording);
        Ok(WriteWatch::from_parts(self.qmp, &self.cfg.node, &rec))
    }

    /// The QMP connection the tracker drives (one command at a time; do
    /// not touch its bitmaps).
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Stops tracking: removes the round export and the bitmaps this
    /// tracker still holds (best effort; the first error is returned).
    pub async fn close(mut self) -> Result<(), LiveError> {
        let mut first = Ok(());
        if let Some(n) = self.pending.take() {
            let name = self.generation_name(n);
            let r = async {
                self.unexport_if_present(&name).await?;
                self.remove_bitmap(&name).await
            }
            .await;
            first = first.and(r);
        }
        if !self.finished {
            let rec = self.generation_name(self.recording);
            let r = self.remove_bitmap(&rec).await;
            first = first.and(r);
        }
        first
    }

    async fn qmp_do(
        &mut self,
        during: String,
        command: &str,
        args: Value,
    ) -> Result<Value, LiveError> {
        self.qmp
            .execute(command, args)
            .await
            .map_err(|source| LiveError::Qmp { during, source })
    }
}

fn gen_name(prefix: &str, n: u32) -> String {
    format!("{prefix}-g{n}")
}
