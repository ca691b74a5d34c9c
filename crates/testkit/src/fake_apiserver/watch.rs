use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::filter::Filter;
use super::store::{EventType, Expired, Store};

/// How often a watch that allows bookmarks is sent one. Far more often than
/// a real apiserver (about a minute), so resumption after a broken stream is
/// exercised from fresh resource versions within a test's lifetime.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// What to stream, as parsed from a watch request.
#[derive(Debug)]
pub(crate) struct WatchRequest {
    pub filter: Filter,
    /// `None` for `resourceVersion` unset or "0": start from the current
    /// state, sent as synthetic ADDED events.
    pub since: Option<u64>,
    pub bookmarks: bool,
    /// Streaming-list mode: mark the end of the synthetic ADDED events with
    /// an annotated bookmark.
    pub send_initial_events: bool,
    pub timeout: Duration,
}

/// Starts a watch stream on the current runtime and returns its body: one
/// JSON event per line, ending at the timeout or on `break_watches`.
pub(crate) fn stream(store: Store, request: WatchRequest) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if let Err(Hangup) = feed(&store, &request, &tx).await {
            tracing::debug!("watch client went away");
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    }))
}

/// The client closed the connection.
struct Hangup;

async fn feed(store: &Store, request: &WatchRequest, tx: &mpsc::Sender<Bytes>) -> Result<(), Hangup> {
    let kind = request.filter.resource.kind;
    let api_version = request.filter.resource.api_version();
    let deadline = Instant::now() + request.timeout;
    // Subscribing before the first read means no change slips between them.
    let mut signal = store.subscribe();
    let generation = signal.borrow_and_update().generation;

    let mut position = match request.since {
        Some(rv) => rv,
        None => {
            let (rv, objects) = store.snapshot(&request.filter);
            for object in objects {
                send(tx, event_line(EventType::Added.as_str(), object)).await?;
            }
            rv
        }
    };
    if request.send_initial_events {
        let mut bookmark = bookmark(kind, &api_version, position);
        bookmark["object"]["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        send(tx, line(&bookmark)).await?;
    }

    let mut bookmarks = tokio::time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
    bookmarks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut resuming = false;
    loop {
        match store.events_since(position, &request.filter, resuming) {
            Ok((events, reached)) => {
                for (event_type, object) in events {
                    send(tx, event_line(event_type.as_str(), object)).await?;
                }
                position = reached;
            }
            Err(expired) => {
                send(tx, line(&gone(&expired))).await?;
                return Ok(());
            }
        }
        resuming = true;
        tokio::select! {
            changed = signal.changed() => {
                if changed.is_err() || signal.borrow_and_update().generation != generation {
                    return Ok(());
                }
            }
            _ = bookmarks.tick(), if request.bookmarks => {
                send(tx, line(&bookmark(kind, &api_version, position))).await?;
            }
            () = tokio::time::sleep_until(deadline) => return Ok(()),
            () = tx.closed() => return Err(Hangup),
        }
    }
}

async fn send(tx: &mpsc::Sender<Bytes>, line: Bytes) -> Result<(), Hangup> {
    tx.send(line).await.map_err(|_| Hangup)
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn event_line(event_type: &str, object: Value) -> Bytes {
    line(&json!({"type": event_type, "object": object}))
}

fn bookmark(kind: &str, api_version: &str, rv: u64) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "kind": kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": rv.to_string()},
        },
    })
}

/// The in-stream error a real apiserver sends when the requested version
/// has been compacted away.
fn gone(expired: &Expired) -> Value {
    json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {} ({})", expired.requested, expired.oldest),
            "reason": "Expired",
            "code": 410,
        },
    })
}
