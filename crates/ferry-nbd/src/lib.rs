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
//! once and replies serialized through one writer. With an [`NbdTls`] in
//! the config, every client must upgrade with `NBD_OPT_STARTTLS` and
//! present a certificate signed by the configured CA (qemu's
//! `tls-creds-x509` layout; mutual TLS 1.3).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_nbd::NbdError> {
//! use std::sync::Arc;
//! use ferry_device::MemDevice;
//! use ferry_nbd::{serve, NbdListener, NbdServerConfig};
//!
//! let listener = NbdListener::bind("127.0.0.1:10809").await?;
//! println!("serving on {}", listener.describe());
//! let config = NbdServerConfig { export_name: "disk".into(), read_only: false, tls: None };
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
mod tls;
mod transmission;

pub use errors::NbdError;
pub use listener::{bind_unix_socket, NbdListener, SocketAccess};
pub use server::{
    serve, serve_connection, serve_counted, NbdServerConfig, HANDSHAKE_TIMEOUT, MAX_CLIENTS,
};
pub use tls::{NbdTls, TlsError, CA_CERT, SERVER_CERT, SERVER_KEY};
