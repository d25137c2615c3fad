//! An async QMP client: JSON lines over the unix socket of a QEMU (or
//! qemu-storage-daemon) monitor, in command mode. Every command has a
//! timeout; after a timeout or an I/O error the connection is unusable
//! (replies could no longer be matched) and says so.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long one command may take by default (generous: a loaded machine).
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Most events skipped while waiting for one reply.
const MAX_EVENTS_PER_REPLY: usize = 10_000;
/// Most events kept in [`Qmp::events`] (the oldest are dropped).
const MAX_EVENTS_KEPT: usize = 1024;
/// Longest QMP line read.
const MAX_LINE: u64 = 16 << 20;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the monitor socket failed.
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O while {during}: {source}")]
    Io {
        /// What the client was doing.
        during: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No reply within the time limit.
    #[error("QMP: no reply within {after:?} while {during}")]
    Timeout {
        /// What the client was doing.
        during: String,
        /// The limit.
        after: Duration,
    },
    /// The monitor closed the connection.
    #[error("QMP monitor closed the connection while {0}")]
    Closed(String),
    /// An earlier error left the connection unusable.
    #[error("QMP connection unusable since an earlier error ({0}); reconnect")]
    Broken(String),
    /// A line that is not a JSON object (or too long).
    #[error("QMP sent a malformed line while {during}: {line:?}")]
    Malformed {
        /// What the client was doing.
        during: String,
        /// The line (cut to 200 bytes).
        line: String,
    },
    /// The command failed.
    #[error("QMP command {command} {arguments} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// Its arguments (JSON, cut to 300 bytes).
        arguments: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// More events than allowed while waiting for a reply.
    #[error("QMP: more than {MAX_EVENTS_PER_REPLY} events while waiting for the reply to {0}")]
    TooManyEvents(String),
}

impl QmpError {
    /// QMP's description when the command itself failed (`None` for
    /// transport errors).
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    broken: Option<String>,
    /// Events received while waiting for replies, oldest first (at most
    /// the last 1024).
    pub events: VecDeque<Value>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish()
    }
}

impl Qmp {
    /// Connects to the monitor at `path`, reads the greeting and enters
    /// command mode (`qmp_capabilities`); each command then has
    /// [`DEFAULT_QMP_TIMEOUT`].
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Self::connect_with_timeout(path, DEFAULT_QMP_TIMEOUT).await
    }

    /// As [`connect`](Self::connect), each command (and the greeting)
    /// bounded by `timeout`.
    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (rd, writer) = s.into_split();
        let mut q = Qmp {
            reader: BufReader::new(rd),
            writer,
            timeout,
            broken: None,
            events: VecDeque::new(),
        };
        let during = format!("reading the greeting of {}", path.display());
        let greeting = match tokio::time::timeout(timeout, q.read_message(&during)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(QmpError::Timeout {
                    during,
                    after: timeout,
                })
            }
        };
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Malformed {
                during,
                line: greeting.to_string().chars().take(200).collect(),
            });
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read_message(&mut self, during: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await
            .map_err(|source| QmpError::Io {
                during: during.into(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed(during.into()));
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::Malformed {
                during: during.into(),
                line: line.chars().take(200).collect(),
            }),
        }
    }

    /// Runs `command` with `arguments` (an object; `{}` for none) and
    /// returns its `return` value; events that arrive first are kept in
    /// [`events`](Self::events).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        if let Some(why) = &self.broken {
            return Err(QmpError::Broken(why.clone()));
        }
        let during = format!("running {command}");
        let limit = self.timeout;
        let r = match tokio::time::timeout(limit, self.execute_inner(command, arguments)).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                during,
                after: limit,
            }),
        };
        if let Err(e) = &r {
            if !matches!(e, QmpError::Command { .. }) {
                self.broken = Some(e.to_string());
            }
        }
        r
    }

    async fn execute_inner(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let during = format!("running {command}");
        let shown: String = arguments.to_string().chars().take(300).collect();
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                during: during.clone(),
                source,
            })?;
        for _ in 0..MAX_EVENTS_PER_REPLY {
            let v = self.read_message(&during).await?;
            if v.get("event").is_some() {
                if self.events.len() >= MAX_EVENTS_KEPT {
                    self.events.pop_front();
                }
                self.events.push_back(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    arguments: shown,
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Malformed {
                during,
                line: v.to_string().chars().take(200).collect(),
            });
        }
        Err(QmpError::TooManyEvents(command.into()))
    }
}
