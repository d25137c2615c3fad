//! An NBD server (fixed newstyle negotiation, simple replies) over a
//! ferry [`BlockDevice`](ferry_device::BlockDevice).
//!
//! `ferry pull` exposes the disk being migrated to the hypervisor through
//! this server: [`NbdListener::bind`] opens a TCP or unix socket, [`serve`]
//! accepts clients (qemu, `qemu-nbd -c`, `nbd-client`) until a shutdown
//! future resolves ([`serve_connection`] serves one stream the caller
//! already has). Each connection negotiates with `NBD_OPT_GO`/`INFO`
//! (or the old `NBD_OPT_EXPORT_NAME`) and then serves READ, WRITE, FLUSH,
//! TRIM, WRITE_ZEROES (with FUA) and DISC, with many requests in flight at
//! once and replies serialized through one writer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_nbd::NbdError> {
//! use std::sync::Arc;
//! use ferry_device::MemDevice;
//! use ferry_nbd::{serve, NbdListener, NbdServerConfig};
//!
//! let listener = NbdListener::bind("127.0.0.1:10809").await?;
//! println!("serving on {}", listener.describe());
//! let config = NbdServerConfig { export_name: "disk".into(), read_only: false };
//! serve(listener, Arc::new(MemDevice::new(1 << 20)), config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```
#![forbid(unsafe_code)]

mod errors;
mod handshake;
mod listener;
mod proto;
mod server;
mod transmission;

pub use errors::NbdError;
pub use listener::{bind_unix_socket, NbdListener, SocketAccess};
pub use server::{serve, serve_connection, NbdServerConfig, HANDSHAKE_TIMEOUT, MAX_CLIENTS};
