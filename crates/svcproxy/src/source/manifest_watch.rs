//! Watches a manifest directory and sends a fresh snapshot whenever anything in it changes.

use std::path::PathBuf;
use std::time::Duration;

use notify::RecursiveMode;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::SourceEvent;
use super::manifest_dir::{DirRead, ManifestDir, ManifestDirError};
use crate::dir_changes::watch_dir;

/// Long enough to coalesce an editor's write-rename-chmod burst or a ConfigMap volume's symlink swap.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// A slow re-read covers the rare event a watch misses (network filesystems, overflowed inotify queues).
const RESCAN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ManifestWatchError {
    #[error(transparent)]
    Dir(#[from] ManifestDirError),
    #[error("cannot watch {dir}: {source}")]
    Watch { dir: PathBuf, source: notify::Error },
}

/// Logs what a read found; each rejection (an object or file, at every read it is still bad) counts in
/// `rejected`.
fn report(dir: &ManifestDir, read: &DirRead, rejected: &Counter) {
    rejected.inc_by(read.errors.len() as u64);
    for w in &read.warnings {
        tracing::warn!(dir = %dir.dir().display(), "{w}");
    }
    for e in &read.errors {
        tracing::error!(dir = %dir.dir().display(), "rejected: {e}; the last good version of the object stays programmed");
    }
    tracing::info!(
        services = read.state.services.len(),
        endpoint_slices = read.state.endpoint_slices.len(),
        node = read.state.node.is_some(),
        rejected = read.errors.len(),
        "read manifest directory {}",
        dir.dir().display()
    );
}

/// Reads `dir` on a blocking thread: parsing a directory of thousands of Services takes a while, and the
/// health and metrics servers share the runtime's few workers with this task.
async fn read_aside(mut dir: ManifestDir) -> (ManifestDir, Result<DirRead, ManifestDirError>) {
    tokio::task::spawn_blocking(move || {
        let read = dir.read();
        (dir, read)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Reads the directory once, sends the snapshot and `Synced`, then re-reads on every change until the
/// receiver goes away. A directory that cannot be read at start is an error; later read failures are logged
/// and the previous state stays.
pub async fn run(
    mut dir: ManifestDir,
    tx: mpsc::Sender<SourceEvent>,
    rejected: Counter,
) -> Result<(), ManifestWatchError> {
    // Watched before the first read: a change made while a large directory is being read (or the first sync
    // runs) then still raises a re-read, where watching after it left the change unseen until the rescan.
    let watch = watch_dir(dir.dir(), RecursiveMode::Recursive, DEBOUNCE);
    // A directory that is not there fails both; its read error is the one that says so.
    let first;
    (dir, first) = read_aside(dir).await;
    let first = first?;
    let (_watch, mut fs_rx) = watch.map_err(|source| ManifestWatchError::Watch {
        dir: dir.dir().to_path_buf(),
        source,
    })?;
    report(&dir, &first, &rejected);
    if tx.send(SourceEvent::Snapshot(first.state)).await.is_err()
        || tx.send(SourceEvent::Synced).await.is_err()
    {
        return Ok(());
    }

    let mut rescan = tokio::time::interval(RESCAN);
    rescan.tick().await;
    loop {
        tokio::select! {
            changed = fs_rx.recv() => if changed.is_none() { break },
            _ = rescan.tick() => {},
            _ = tx.closed() => break,
        }
        let read;
        (dir, read) = read_aside(dir).await;
        match read {
            Ok(read) => {
                report(&dir, &read, &rejected);
                if tx.send(SourceEvent::Snapshot(read.state)).await.is_err() {
                    break;
                }
            }
            Err(e) => tracing::error!("{e}; keeping the previous state"),
        }
    }
    Ok(())
}
