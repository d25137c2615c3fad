//! Pure set-up decisions: which driver features to ask for, and the device
//! parameters (geometry, cache and discard limits) to hand the driver.

use libublk::sys;

use crate::UblkError;

/// `UBLK_F_*` feature bits that ferry uses.
pub(crate) mod feature {
    /// A crashed server can be replaced without losing the block device.
    pub(crate) const USER_RECOVERY: u64 = libublk::sys::UBLK_F_USER_RECOVERY as u64;
    /// On recovery, requests the dead server held are issued again.
    pub(crate) const USER_RECOVERY_REISSUE: u64 = libublk::sys::UBLK_F_USER_RECOVERY_REISSUE as u64;
    /// Request data is copied with pread/pwrite on `/dev/ublkcN` by the
    /// server, not through per-tag buffers.
    pub(crate) const USER_COPY: u64 = libublk::sys::UBLK_F_USER_COPY as u64;
    /// Control and I/O commands use ioctl-encoded opcodes.
    pub(crate) const CMD_IOCTL_ENCODE: u64 = libublk::sys::UBLK_F_CMD_IOCTL_ENCODE as u64;
}

/// What the driver is asked for, and what had to be left out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FeaturePlan {
    /// `UBLK_F_*` flags for the new device.
    pub(crate) ctrl_flags: u64,
    /// One human-readable reason per feature ferry would have used but the
    /// driver lacks.
    pub(crate) degraded: Vec<String>,
}

/// Chooses the device flags from the driver's reported features (`None`
/// when the driver cannot report them, before Linux 6.5).
///
/// `recover` (re-attaching to a device a crashed server left) needs
/// USER_RECOVERY; everything else degrades with a reason. `user_copy: false`
/// leaves USER_COPY out on purpose (also reported as a reason).
pub(crate) fn plan_features(
    driver: Option<u64>,
    recover: bool,
    user_copy: bool,
) -> Result<FeaturePlan, UblkError> {
    let mut degraded = Vec::new();
    let Some(driver) = driver else {
        if recover {
            return Err(UblkError::RecoveryUnsupported);
        }
        degraded.push(
            "the driver does not report its features (Linux < 6.5): \
             no crash recovery, legacy command encoding, reads copied twice (no user copy)"
                .to_string(),
        );
        return Ok(FeaturePlan {
            ctrl_flags: 0,
            degraded,
        });
    };
    let mut ctrl_flags = 0;
    if driver & feature::CMD_IOCTL_ENCODE != 0 {
        ctrl_flags |= feature::CMD_IOCTL_ENCODE;
    } else {
        degraded.push("no UBLK_F_CMD_IOCTL_ENCODE: using legacy command encoding".to_string());
    }
    if driver & feature::USER_RECOVERY != 0 {
        ctrl_flags |= feature::USER_RECOVERY;
        if driver & feature::USER_RECOVERY_REISSUE != 0 {
            ctrl_flags |= feature::USER_RECOVERY_REISSUE;
        } else {
            degraded.push(
                "no UBLK_F_USER_RECOVERY_REISSUE: requests in flight when the \
                 server dies fail instead of being issued again"
                    .to_string(),
            );
        }
    } else if recover {
        return Err(UblkError::RecoveryUnsupported);
    } else {
        degraded
            .push("no UBLK_F_USER_RECOVERY: the block device dies with this process".to_string());
    }
    if !user_copy {
        degraded.push(
            "UBLK_F_USER_COPY turned off by the options: request data goes through \
             per-tag buffers (two copies per read)"
                .to_string(),
        );
    } else if driver & feature::USER_COPY != 0 {
        ctrl_flags |= feature::USER_COPY;
    } else {
        degraded.push(
            "no UBLK_F_USER_COPY: request data goes through per-tag buffers \
             (two copies per read)"
                .to_string(),
        );
    }
    Ok(FeaturePlan {
        ctrl_flags,
        degraded,
    })
}

/// Largest discard / write-zeroes request the device accepts, in sectors
/// (1 GiB: the device handles the whole range in one call).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Device parameters for a device of `size` bytes with logical blocks of
/// `block_size` bytes and requests of at most `io_buf_bytes` bytes.
///
/// Checks the geometry: the block size is a power of two in 512..=4096, the
/// size a non-zero multiple of it, the buffer a multiple of it.
pub(crate) fn device_params(
    size: u64,
    block_size: u32,
    io_buf_bytes: u32,
) -> Result<sys::ublk_params, UblkError> {
    let bad = |reason: &str| UblkError::Geometry {
        size,
        block_size,
        reason: reason.to_string(),
    };
    if !block_size.is_power_of_two() || !(512..=4096).contains(&block_size) {
        return Err(bad(
            "the block size must be a power of two from 512 to 4096",
        ));
    }
    if size == 0 || size & (u64::from(block_size) - 1) != 0 {
        return Err(bad(
            "the size must be a non-zero multiple of the block size",
        ));
    }
    if io_buf_bytes < block_size || io_buf_bytes & (block_size - 1) != 0 {
        return Err(bad("the I/O buffer must be a multiple of the block size"));
    }
    let shift = block_size.trailing_zeros() as u8;
    Ok(sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // A volatile cache: the kernel sends FLUSH, and FUA on writes
            // that need it; both reach the device.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift,
            physical_bs_shift: shift.max(12),
            io_opt_shift: shift.max(12),
            io_min_shift: shift,
            max_sectors: io_buf_bytes >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: block_size,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_6_12: u64 = 0x1fe;

    #[test]
    fn linux_6_12_gets_recovery_with_reissue_and_user_copy() {
        let plan = plan_features(Some(LINUX_6_12), false, true).unwrap();
        assert_eq!(
            plan.ctrl_flags,
            feature::USER_RECOVERY
                | feature::USER_RECOVERY_REISSUE
                | feature::CMD_IOCTL_ENCODE
                | feature::USER_COPY
        );
        assert!(plan.degraded.is_empty(), "{:?}", plan.degraded);
        assert_eq!(feature::USER_COPY, 0x80);
    }

    #[test]
    fn user_copy_degrades_when_missing_or_turned_off() {
        let plan = plan_features(Some(LINUX_6_12 & !feature::USER_COPY), false, true).unwrap();
        assert_eq!(plan.ctrl_flags & feature::USER_COPY, 0);
        assert_eq!(plan.degraded.len(), 1);
        assert!(plan.degraded[0].contains("no UBLK_F_USER_COPY"));
        let plan = plan_features(Some(LINUX_6_12), false, false).unwrap();
        assert_eq!(plan.ctrl_flags & feature::USER_COPY, 0);
        assert_ne!(plan.ctrl_flags & feature::USER_RECOVERY, 0);
        assert_eq!(plan.degraded.len(), 1);
        assert!(plan.degraded[0].contains("turned off"));
    }

    #[test]
    fn missing_recovery_degrades_unless_recovery_was_asked_for() {
        let driver = LINUX_6_12 & !feature::USER_RECOVERY & !feature::USER_RECOVERY_REISSUE;
        let plan = plan_features(Some(driver), false, true).unwrap();
        assert_eq!(plan.ctrl_flags & feature::USER_RECOVERY, 0);
        assert_eq!(plan.degraded.len(), 1);
        assert!(plan.degraded[0].contains("USER_RECOVERY"));
        assert!(matches!(
            plan_features(Some(driver), true, true),
            Err(UblkError::RecoveryUnsupported)
        ));
    }

    #[test]
    fn unknown_features_degrade_everything() {
        let plan = plan_features(None, false, true).unwrap();
        assert_eq!(plan.ctrl_flags, 0);
        assert_eq!(plan.degraded.len(), 1);
        assert!(plan_features(None, true, true).is_err());
    }

    #[test]
    fn params_use_4k_blocks_and_enable_flush_fua_discard() {
        let p = device_params(64 << 20, 4096, 1 << 20).unwrap();
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) >> 9);
        assert_eq!(p.basic.max_sectors, 2048);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.discard_granularity, 4096);
    }

    #[test]
    fn params_reject_bad_geometry() {
        assert!(device_params(64 << 20, 3000, 1 << 20).is_err());
        assert!(device_params(0, 4096, 1 << 20).is_err());
        assert!(device_params((64 << 20) + 512, 4096, 1 << 20).is_err());
        assert!(device_params(64 << 20, 4096, 1000).is_err());
        assert!(device_params(64 << 20, 8192, 1 << 20).is_err());
    }
}
