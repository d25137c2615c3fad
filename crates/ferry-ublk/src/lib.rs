//! A ublk frontend: exposes any [`BlockDevice`] as a Linux block device
//! `/dev/ublkbN` through the kernel's ublk driver.
//!
//! [`serve_ublk`] creates the device (or re-attaches to one a crashed server
//! left behind), serves it with one thread per queue, and returns when the
//! device is stopped ([`stop_ublk`]) or deleted. The device's futures run on
//! the caller's tokio runtime; the queue threads never block on them.
//!
//! Requests: READ, WRITE (FUA honoured), FLUSH, DISCARD and WRITE_ZEROES;
//! anything else is answered -EOPNOTSUPP. Device errors become negative errno
//! values in one place, which also logs them.
//!
//! Data path: with the driver's `UBLK_F_USER_COPY` (Linux 6.5+) a READ of a
//! file-backed device in the page cache costs one copy (page cache to the
//! request's pages, through [`BlockDevice::copy_now`]); a READ of the
//! device's file ([`BlockDevice::present_file`]) not in the page cache is
//! read on the queue's io_uring, so it stalls only its own tag. Without
//! user copy, per-tag buffers and two copies. See the `queue` and
//! `resident` modules.
//!
//! Unsafe code is denied except in two private modules (`cdev`: borrowing
//! libublk's `/dev/ublkcN` descriptor; `pagecache`: a mapping of the
//! device's file asked with `mincore`).
#![deny(unsafe_code)]

mod cdev;
mod errno;
mod pagecache;
mod queue;
mod request;
mod resident;
mod setup;

use std::path::Path;
use std::sync::{Arc, Mutex};

use ferry_device::BlockDevice;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::UblkFlags;

/// The ublk driver's control device; absent when the driver is not loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Target name recorded with the device.
const TARGET_NAME: &str = "ferry";

/// How to create (or re-attach to) the ublk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// Device id to create (`/dev/ublkbN`); `None` lets the driver choose.
    /// Required with `recover`.
    pub dev_id: Option<u32>,
    /// Number of hardware queues, each served by its own thread.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes (a multiple of the block size and the page
    /// size, at most 32 MiB), e.g. 1 MiB.
    pub io_buf_bytes: u32,
    /// Re-attach to the existing device `dev_id`, left quiesced by a server
    /// that crashed (`UBLK_F_USER_RECOVERY`), instead of creating one.
    pub recover: bool,
    /// Create the device with `UBLK_F_USER_COPY` when the driver has it
    /// (one copy per READ instead of two). `false` keeps the per-tag buffer
    /// path (for tests of that path). A recovered device keeps the mode it
    /// was created with, whatever this says.
    pub user_copy: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        Self {
            dev_id: None,
            queues: 1,
            depth: 64,
            io_buf_bytes: 1 << 20,
            recover: false,
            user_copy: true,
        }
    }
}

/// Why a ublk device could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// `/dev/ublk-control` does not exist.
    #[error("the ublk driver is not loaded: modprobe ublk_drv, or use --nbd")]
    DriverMissing,
    /// The options cannot describe a device.
    #[error("invalid ublk options: {0}")]
    Options(String),
    /// The device's size or block size cannot be served.
    #[error("cannot serve a {size}-byte device with {block_size}-byte blocks: {reason}")]
    Geometry {
        /// Device size in bytes.
        size: u64,
        /// Logical block size in bytes.
        block_size: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// Recovery was asked for but the driver cannot recover devices.
    #[error("the ublk driver does not support user recovery (UBLK_F_USER_RECOVERY)")]
    RecoveryUnsupported,
    /// Creating the ublk device failed.
    #[error("failed to create the ublk device")]
    Create(#[source] libublk::UblkError),
    /// Re-attaching to an existing device failed.
    #[error("failed to recover ublk device {dev_id}: {reason}")]
    Recover {
        /// The device id.
        dev_id: u32,
        /// What went wrong.
        reason: String,
    },
    /// Starting or serving the device failed.
    #[error("failed to serve ublk device {dev_id}")]
    Serve {
        /// The device id.
        dev_id: u32,
        /// The driver's or libublk's error.
        #[source]
        source: libublk::UblkError,
    },
    /// Stopping a device failed.
    #[error("failed to stop ublk device {dev_id}")]
    Stop {
        /// The device id.
        dev_id: u32,
        /// The driver's or libublk's error.
        #[source]
        source: libublk::UblkError,
    },
}

/// The ublk driver's `UBLK_F_*` feature bits, or `None` if it cannot report
/// them (before Linux 6.5).
///
/// Fails with [`UblkError::DriverMissing`] when the driver is not loaded.
pub fn driver_features() -> Result<Option<u64>, UblkError> {
    driver_present()?;
    Ok(UblkCtrl::get_features())
}

/// Creates (or, with `recover`, re-attaches to) the ublk device and serves
/// `device` through it until the device is stopped ([`stop_ublk`]) or
/// deleted. Calls `on_live(dev_path)` once the device is live (`/dev/ublkbN`).
///
/// Blocks the calling thread for the device's lifetime: call it from a plain
/// thread or `spawn_blocking`, not from an async task. The device's futures
/// are spawned on `rt`; each queue is served by its own thread. A device
/// stopped or deleted on purpose is deleted before this returns, without
/// waiting for its openers (a file system still mounted on it sees I/O
/// errors; the kernel frees the device at the unmount); if the process dies
/// instead, a device created with `UBLK_F_USER_RECOVERY` stays, quiesced,
/// for a new server to recover.
pub fn serve_ublk<D: BlockDevice>(
    device: Arc<D>,
    rt: tokio::runtime::Handle,
    opts: UblkOptions,
    on_live: impl FnOnce(&str) + Send + 'static,
) -> Result<(), UblkError> {
    driver_present()?;
    check_options(&opts)?;
    let size = device.size();
    let params = setup::device_params(size, device.block_size(), opts.io_buf_bytes)?;

    let features = UblkCtrl::get_features();
    tracing::info!(
        features = format_args!("{:#x}", features.unwrap_or(0)),
        "ublk driver features"
    );
    let plan = setup::plan_features(features, opts.recover, opts.user_copy)?;
    for reason in &plan.degraded {
        tracing::warn!("ublk: degraded: {reason}");
    }

    let ctrl = if opts.recover {
        recover_ctrl(&opts, plan.ctrl_flags, size)?
    } else {
        UblkCtrlBuilder::default()
            .name(TARGET_NAME)
            .id(opts.dev_id.map_or(-1, |id| id as i32))
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .io_buf_bytes(opts.io_buf_bytes)
            .ctrl_flags(plan.ctrl_flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(UblkError::Create)?
    };
    let dev_id = ctrl.dev_info().dev_id;
    let user_copy = ctrl.dev_info().flags & setup::feature::USER_COPY != 0;
    tracing::info!(
        dev_id,
        user_copy,
        size,
        queues = ctrl.dev_info().nr_hw_queues,
        depth = ctrl.dev_info().queue_depth,
        flags = format_args!("{:#x}", ctrl.dev_info().flags),
        recover = opts.recover,
        "ublk device set up"
    );

    let residency = Arc::new(resident::Residency::new(size));
    let served = Arc::new(queue::Served {
        device,
        rt,
        size,
        residency: Arc::clone(&residency),
    });
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = params;
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| queue::serve_queue(qid, dev, &served);
    // run_target wants a Sync callback; on_live is only Send.
    let on_live = Mutex::new(Some(on_live));
    let live = move |ctrl: &UblkCtrl| {
        let path = ctrl.get_bdev_path();
        tracing::info!(dev = %path, "ublk device live");
        let taken = on_live.lock().map(|mut f| f.take());
        if let Ok(Some(on_live)) = taken {
            on_live(&path);
        }
    };
    let served_result = ctrl.run_target(tgt_init, q_fn, live);
    tracing::info!(
        dev_id,
        page_cache_checks = residency.checks(),
        reads_on_ring = residency.misses(),
        "ublk device served (READs not in the page cache were read on the queues' rings)"
    );
    // Delete explicitly (a recovered device is not owned by `ctrl`, and a
    // created one would otherwise be deleted by `ctrl`'s drop with the
    // synchronous DEL_DEV).
    delete_device(&ctrl, dev_id);
    served_result
        .map(|_| ())
        .map_err(|source| UblkError::Serve { dev_id, source })
}

/// Deletes the stopped device without waiting for its last opener.
///
/// The synchronous DEL_DEV waits until nothing holds the block device: with
/// a file system still mounted on `/dev/ublkbN` it would block this thread
/// (and a `ferry pull` asked to stop) until the unmount. DEL_DEV_ASYNC
/// (Linux 6.8+) removes the device at once and lets the kernel free it when
/// the last opener goes; older drivers refuse it, and get DEL_DEV.
fn delete_device(ctrl: &UblkCtrl, dev_id: u32) {
    if let Err(e) = ctrl.del_dev_async() {
        tracing::debug!(
            dev_id,
            "DEL_DEV_ASYNC failed ({e}); deleting with DEL_DEV, which waits for the last opener"
        );
        if let Err(e) = ctrl.del_dev() {
            tracing::warn!(dev_id, "deleting the ublk device failed: {e}");
        }
    }
}

/// Stops ublk device `dev_id`: its queues are aborted and the
/// [`serve_ublk`] serving it returns. Callable from any thread.
pub fn stop_ublk(dev_id: u32) -> Result<(), UblkError> {
    driver_present()?;
    let id = i32::try_from(dev_id)
        .map_err(|_| UblkError::Options(format!("device id {dev_id} is too large")))?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|source| UblkError::Stop { dev_id, source })?;
    ctrl.kill_dev()
        .map(|_| ())
        .map_err(|source| UblkError::Stop { dev_id, source })
}

/// The device id in a `/dev/ublkbN` path.
pub fn dev_id_of(dev_path: &str) -> Option<u32> {
    dev_path.strip_prefix("/dev/ublkb")?.parse().ok()
}

fn driver_present() -> Result<(), UblkError> {
    if Path::new(CONTROL_PATH).exists() {
        Ok(())
    } else {
        Err(UblkError::DriverMissing)
    }
}

fn check_options(opts: &UblkOptions) -> Result<(), UblkError> {
    let max_queues = libublk::sys::UBLK_MAX_NR_QUEUES;
    let max_depth = libublk::sys::UBLK_MAX_QUEUE_DEPTH;
    if opts.queues == 0 || u32::from(opts.queues) > max_queues {
        return Err(UblkError::Options(format!(
            "queues must be 1..={max_queues}, not {}",
            opts.queues
        )));
    }
    if opts.depth == 0 || u32::from(opts.depth) > max_depth {
        return Err(UblkError::Options(format!(
            "depth must be 1..={max_depth}, not {}",
            opts.depth
        )));
    }
    if opts.io_buf_bytes == 0 || opts.io_buf_bytes & 4095 != 0 || opts.io_buf_bytes > 32 << 20 {
        return Err(UblkError::Options(format!(
            "io_buf_bytes must be a multiple of 4096 up to 32 MiB, not {}",
            opts.io_buf_bytes
        )));
    }
    if opts.recover && opts.dev_id.is_none() {
        return Err(UblkError::Options(
            "recover needs the id of the device to re-attach to".to_string(),
        ));
    }
    if opts.dev_id.is_some_and(|id| i32::try_from(id).is_err()) {
        return Err(UblkError::Options("device id too large".to_string()));
    }
    Ok(())
}

/// Puts the quiesced device `opts.dev_id` into recovery and returns a
/// control handle for serving it again.
///
/// The new server must move data the way the device was created to
/// (the driver refuses a FETCH with a buffer address on a user-copy device,
/// and one without on a buffered device), so the device's own
/// `UBLK_F_USER_COPY` bit replaces the plan's; the queues then follow the
/// flags the driver reports for the device.
fn recover_ctrl(opts: &UblkOptions, ctrl_flags: u64, size: u64) -> Result<UblkCtrl, UblkError> {
    let dev_id = opts.dev_id.unwrap_or_default();
    let fail = |reason: String| UblkError::Recover { dev_id, reason };
    let existing =
        UblkCtrl::new_simple(dev_id as i32).map_err(|e| fail(format!("no such device: {e}")))?;
    let info = existing.dev_info();
    if info.flags & setup::feature::USER_RECOVERY == 0 {
        return Err(fail(
            "the device was created without UBLK_F_USER_RECOVERY".to_string(),
        ));
    }
    let mut params = libublk::sys::ublk_params {
        types: libublk::sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    existing
        .get_params(&mut params)
        .map_err(|e| fail(format!("reading its parameters failed: {e}")))?;
    let existing_size = params.basic.dev_sectors << 9;
    if existing_size != size {
        return Err(fail(format!(
            "it holds {existing_size} bytes but the device to serve holds {size}"
        )));
    }
    if info.nr_hw_queues != opts.queues || info.queue_depth != opts.depth {
        tracing::warn!(
            dev_id,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            "recovering with the existing device's queues and depth, not the options'"
        );
    }
    let ctrl_flags =
        (ctrl_flags & !setup::feature::USER_COPY) | (info.flags & setup::feature::USER_COPY);
    if opts.user_copy != (info.flags & setup::feature::USER_COPY != 0) {
        tracing::warn!(
            dev_id,
            device_user_copy = info.flags & setup::feature::USER_COPY != 0,
            "recovering with the data path the device was created with, not the options'"
        );
    }
    tracing::info!(dev_id, state = info.state, "starting ublk user recovery");
    match existing.start_user_recover() {
        Ok(res) if res >= 0 => {}
        Ok(res) => return Err(fail(format!("START_USER_RECOVERY: errno {}", -res))),
        Err(e) => return Err(fail(format!("START_USER_RECOVERY: {e}"))),
    }
    drop(existing);
    UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(dev_id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .ctrl_flags(ctrl_flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| fail(format!("re-opening it failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_missing_message_is_exact() {
        assert_eq!(
            UblkError::DriverMissing.to_string(),
            "the ublk driver is not loaded: modprobe ublk_drv, or use --nbd"
        );
    }

    #[test]
    fn serving_without_the_driver_says_so() {
        if Path::new(CONTROL_PATH).exists() {
            eprintln!(
                "SKIPPED: {CONTROL_PATH} exists; the driver-missing path is covered in the VM"
            );
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let device = Arc::new(ferry_device::MemDevice::new(1 << 20));
        let err =
            serve_ublk(device, rt.handle().clone(), UblkOptions::default(), |_| {}).unwrap_err();
        assert!(matches!(err, UblkError::DriverMissing), "{err}");
        assert!(matches!(stop_ublk(0), Err(UblkError::DriverMissing)));
    }

    #[test]
    fn options_are_checked() {
        let ok = UblkOptions::default();
        assert!(check_options(&ok).is_ok());
        for bad in [
            UblkOptions {
                queues: 0,
                ..ok.clone()
            },
            UblkOptions {
                depth: 0,
                ..ok.clone()
            },
            UblkOptions {
                io_buf_bytes: 1000,
                ..ok.clone()
            },
            UblkOptions {
                recover: true,
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(check_options(&bad), Err(UblkError::Options(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dev_ids_come_from_paths() {
        assert_eq!(dev_id_of("/dev/ublkb3"), Some(3));
        assert_eq!(dev_id_of("/dev/ublkc3"), None);
    }
}
