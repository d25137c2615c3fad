//! Sans-IO core of ferry.
//!
//! Nothing here opens a file, a socket or reads a clock: the block map,
//! the manifest of the source, and the migration engine are state machines
//! driven by the caller, so they can be tested with a simulated source,
//! link, guest and crashes (see `crates/ferry-pull/tests/sim.rs`, which runs
//! the engine inside the production shell, and its scenario tests of the
//! engine alone).
#![forbid(unsafe_code)]

pub mod changes;
pub mod control;
pub mod geometry;
pub mod manifest;
pub mod units;

pub use control::{ControlParseError, ControlRequest, MAX_RATE};
pub use geometry::Geometry;
pub use manifest::{ChunkKind, Manifest, ManifestError, ReadToken, SharedManifest};
pub use units::UnitsError;
pub mod engine;

pub use engine::{
    Arrival, Engine, Failure, FetchKind, FetchRequest, FillPlan, Payload, Phase, ReadPlan,
    SyncBatch, Wake, WritePlan,
};
