//! [`WriteWatch`]: whether a block node was written since a moment, from
//! the count of one dirty bitmap added at that moment (for a source that
//! must not change, e.g. `ferry serve` of a paused VM's export).

use serde_json::{json, Value};

use crate::error::LiveError;
use crate::qmp::{Qmp, QmpError};

/// One dirty bitmap on a node, added by [`start`](Self::start): every
/// write to the node after that shows in [`dirty_bytes`](Self::dirty_bytes).
#[derive(Debug)]
pub struct WriteWatch {
    qmp: Qmp,
    node: String,
    bitmap: String,
}

impl WriteWatch {
    /// Adds dirty bitmap `bitmap` (QEMU's default granularity) to `node`;
    /// fails if a bitmap of that name exists.
    pub async fn start(mut qmp: Qmp, node: &str, bitmap: &str) -> Result<WriteWatch, LiveError> {
        qmp.execute(
            "block-dirty-bitmap-add",
            json!({ "node": node, "name": bitmap }),
        )
        .await
        .map_err(|source| LiveError::Qmp {
            during: format!("adding dirty bitmap {bitmap:?} to node {node:?}"),
            source,
        })?;
        Ok(WriteWatch {
            qmp,
            node: node.into(),
            bitmap: bitmap.into(),
        })
    }

    /// A watch over bitmap `bitmap` of `node`, which exists already and
    /// records (the recording generation of a finished tracker).
    pub(crate) fn from_parts(qmp: Qmp, node: &str, bitmap: &str) -> WriteWatch {
        WriteWatch {
            qmp,
            node: node.into(),
            bitmap: bitmap.into(),
        }
    }

    /// The node watched.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The bitmap's name.
    pub fn bitmap(&self) -> &str {
        &self.bitmap
    }

    /// Bytes of the node written since [`start`](Self::start), in whole
    /// grains: 0 while it is unchanged. A bitmap that has gone (removed
    /// by someone else) is an error: writes could no longer be seen.
    pub async fn dirty_bytes(&mut self) -> Result<u64, LiveError> {
        let during = || {
            format!(
                "reading the count of dirty bitmap {:?} of node {:?}",
                self.bitmap, self.node
            )
        };
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await
            .map_err(|source| LiveError::Qmp {
                during: during(),
                source,
            })?;
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n.get("node-name").and_then(Value::as_str) == Some(self.node.as_str()))
            .flat_map(|n| {
                n.get("dirty-bitmaps")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .find(|b| b.get("name").and_then(Value::as_str) == Some(self.bitmap.as_str()))
            .and_then(|b| b.get("count").and_then(Value::as_u64))
            .ok_or_else(|| {
                LiveError::State(format!(
                    "{}: node or bitmap not found (removed behind ferry's back?)",
                    during()
                ))
            })
    }

    /// Removes the bitmap.
    pub async fn close(mut self) -> Result<(), LiveError> {
        self.qmp
            .execute(
                "block-dirty-bitmap-remove",
                json!({ "node": self.node, "name": self.bitmap }),
            )
            .await
            .map(drop)
            .map_err(|source| LiveError::Qmp {
                during: format!(
                    "removing dirty bitmap {:?} of node {:?}",
                    self.bitmap, self.node
                ),
                source,
            })
    }
}

/// The block node behind block export `id` (`query-block-exports`).
pub async fn export_node(qmp: &mut Qmp, id: &str) -> Result<String, LiveError> {
    let list = qmp
        .execute("query-block-exports", json!({}))
        .await
        .map_err(|source| LiveError::Qmp {
            during: format!("looking for block export {id:?}"),
            source,
        })?;
    let exports: Vec<&Value> = list.as_array().into_iter().flatten().collect();
    exports
        .iter()
        .find(|e| e.get("id").and_then(Value::as_str) == Some(id))
        .and_then(|e| e.get("node-name").and_then(Value::as_str))
        .map(String::from)
        .ok_or_else(|| {
            let ids: Vec<&str> = exports
                .iter()
                .filter_map(|e| e.get("id").and_then(Value::as_str))
                .collect();
            LiveError::State(format!(
                "no block export with id {id:?} (the exports are {ids:?}); name the node"
            ))
        })
}

/// Whether the VM behind `qmp` runs (`query-status`): `Some(true)` while
/// it may write, `Some(false)` paused, `None` when the monitor has no run
/// state (qemu-storage-daemon: no VM, the caller must stop its writers).
pub async fn vm_running(qmp: &mut Qmp) -> Result<Option<bool>, LiveError> {
    match qmp.execute("query-status", json!({})).await {
        Ok(v) => Ok(Some(
            v.get("running").and_then(Value::as_bool).unwrap_or(true),
        )),
        Err(QmpError::Command { class, .. }) if class == "CommandNotFound" => Ok(None),
        Err(source) => Err(LiveError::Qmp {
            during: "asking whether the VM runs (query-status)".into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A monitor that greets, accepts `qmp_capabilities` and answers
    /// `query-status` with `reply` (a whole QMP reply line).
    fn fake_monitor(dir: &std::path::Path, reply: &'static str) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            // Bounded: the two commands of the test.
            for _ in 0..2 {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let out = if line.contains("qmp_capabilities") {
                    r#"{"return": {}}"#
                } else {
                    reply
                };
                writeln!(w, "{out}").unwrap();
            }
        });
        path
    }

    fn state(reply: &'static str) -> Result<Option<bool>, LiveError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fake_monitor(dir.path(), reply);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut q = Qmp::connect(&path).await.expect("connect");
            vm_running(&mut q).await
        })
    }

    #[test]
    fn the_run_state_comes_from_query_status() {
        let running = r#"{"return": {"running": true, "status": "running"}}"#;
        let paused = r#"{"return": {"running": false, "status": "paused"}}"#;
        let none = r#"{"error": {"class": "CommandNotFound", "desc": "The command query-status has not been found"}}"#;
        let other = r#"{"error": {"class": "GenericError", "desc": "no"}}"#;
        assert_eq!(state(running).unwrap(), Some(true));
        assert_eq!(state(paused).unwrap(), Some(false));
        assert_eq!(state(none).unwrap(), None);
        assert!(state(other).is_err());
    }
}
