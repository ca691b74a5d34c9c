//! A directory's changes as a stream of "look again" signals: what both file watches (the manifest
//! directory, the configuration file's directory) need from inotify.

use std::path::Path;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

/// Keeps the watch alive; dropping it ends the signals.
pub type DirWatch = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Watches `dir` and sends `()` after each burst of changes, `debounce` apart at most. The receiver holds
/// at most one pending signal: a re-read that is already due covers every change before it.
pub fn watch_dir(
    dir: &Path,
    mode: RecursiveMode,
    debounce: Duration,
) -> Result<(DirWatch, mpsc::Receiver<()>), notify::Error> {
    let (tx, rx) = mpsc::channel::<()>(1);
    let mut debouncer = new_debouncer(debounce, None, move |res: DebounceEventResult| {
        // The watcher's own reads raise access events; only changes to the content matter. An error from
        // the watch may have cost events, so it is a reason to look again too.
        let changed = match res {
            Ok(events) => events.iter().any(|e| !matches!(e.kind, EventKind::Access(_))),
            Err(errors) => {
                tracing::debug!(?errors, "the directory watch reported errors; looking again");
                true
            }
        };
        if changed {
            let _ = tx.try_send(());
        }
    })?;
    debouncer.watch(dir, mode)?;
    Ok((debouncer, rx))
}
