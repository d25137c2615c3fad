//! The destination daemon of ferry (`ferry pull`) as a library.
//!
//! [`Shell`] is the I/O shell: it joins the frontends (through
//! [`PullDevice`], a [`ferry_device::BlockDevice`]), the sans-IO
//! [`ferry_core::Engine`], the storage (a [`Disk`] and its [`BlockMap`]:
//! the backing and state files of [`ferry_store`] in production), and the
//! source, reached through a [`Fetcher`]. The
//! background copier ([`copier::run_copier`]), the periodic sync
//! ([`copier::run_syncer`]), the final verification ([`verify`]), opening
//! or creating the disk ([`open`]) and the status snapshot ([`status`])
//! live here too, and the end of a migration ([`lifecycle`]: abort,
//! commit). The `ferry` binary wires a [`Fetcher`] over the QUIC
//! client, the frontends, the control socket, signals and systemd; the
//! simulation (`tests/sim.rs`) runs the same shell over a simulated link and
//! disk.
#![forbid(unsafe_code)]

pub mod copier;
pub mod disk;
mod error;
pub mod fetcher;
mod fill_trouble;
pub mod lifecycle;
pub mod local;
pub mod open;
mod precopy;
pub mod runtime;
pub mod shell;
pub mod status;
pub mod telemetry;
pub mod verify;
mod waiters;

pub use copier::{Budget, CopierSettings, Throttle, Window};
pub use disk::{BlockMap, Disk};
pub use error::PullError;
pub use fetcher::{ConnState, FetchError, Fetcher, LinkStats};
pub use shell::{PullDevice, Shell, ShellOptions};
pub use status::{Report, Status};
pub use telemetry::TelemetrySnapshot;
pub use verify::Verification;
