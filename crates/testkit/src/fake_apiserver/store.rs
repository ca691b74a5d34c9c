use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Map, Value};
use tokio::sync::watch;

use super::filter::Filter;
use super::request_log::LoggedRequest;
use super::resource::Resource;
use super::timestamp::now_rfc3339;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("object is not a JSON object")]
    NotAnObject,
    #[error("kind {0:?} is not among the served resources")]
    UnknownKind(String),
    #[error("object has no metadata.name")]
    MissingName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// What open watch streams wait on: a new resource version to read up to,
/// or a new generation telling them to hang up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Signal {
    pub rv: u64,
    pub generation: u64,
}

/// A watch asked to resume from a resource version the history no longer
/// covers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    kind: &'static str,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct HistoryEvent {
    rv: u64,
    kind: &'static str,
    event_type: EventType,
    object: Value,
    /// The state before a modification, needed to tell a watcher with a
    /// selector that an object entered or left its view.
    previous: Option<Value>,
}

impl HistoryEvent {
    /// The event as a watcher with `filter` sees it. Like the real apiserver,
    /// a modification that moves an object into the selection is an ADDED,
    /// and one that moves it out is a DELETED of the old state.
    fn as_seen_by(&self, filter: &Filter) -> Option<(EventType, Value)> {
        if self.kind != filter.resource.kind {
            return None;
        }
        let now = filter.matches(&self.object);
        let before = self
            .previous
            .as_ref()
            .is_some_and(|previous| filter.matches(previous));
        match (self.event_type, before, now) {
            (EventType::Modified, true, true) => Some((EventType::Modified, self.object.clone())),
            (EventType::Modified, false, true) | (EventType::Added, _, true) => {
                Some((EventType::Added, self.object.clone()))
            }
            (EventType::Modified, true, false) => {
                let mut gone = self.previous.clone().unwrap_or_default();
                set_resource_version(&mut gone, self.rv);
                Some((EventType::Deleted, gone))
            }
            (EventType::Deleted, _, true) => Some((EventType::Deleted, self.object.clone())),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<HistoryEvent>,
    /// One counter for every kind, as etcd's revision is.
    rv: u64,
    /// Watches asked to start below this are told 410 Gone.
    compacted_rv: u64,
    /// Open streams that had read up to here when compaction happened lost
    /// nothing and carry on.
    compacted_from: u64,
    next_uid: u64,
    fail_lists: u32,
    fail_watches: u32,
    /// Kinds whose lists and watches are refused with 403, as missing RBAC refuses them.
    forbidden: BTreeSet<&'static str>,
    unserved: BTreeSet<&'static str>,
    requests: Vec<LoggedRequest>,
}

/// The fake API server's objects and their change history. Cheap to clone;
/// clones share state.
#[derive(Clone, Debug)]
pub struct Store {
    state: Arc<Mutex<State>>,
    signal: Arc<watch::Sender<Signal>>,
}

impl Default for Store {
    fn default() -> Store {
        Store::new()
    }
}

impl Store {
    pub fn new() -> Store {
        let (signal, _) = watch::channel(Signal { rv: 0, generation: 0 });
        Store {
            state: Arc::default(),
            signal: Arc::new(signal),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked mid-update leaves consistent enough state for
        // the others sharing this store.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates or replaces the object identified by its kind, namespace and
    /// name, returning it as stored. Like the apiserver, this stamps a new
    /// `resourceVersion`, keeps `uid` and `creationTimestamp` across
    /// replacements, and defaults a namespaced object's namespace to
    /// `default`. Nothing else is validated, so tests can store objects a
    /// real apiserver would refuse.
    pub fn apply(&self, mut object: Value) -> Result<Value, StoreError> {
        let fields = object.as_object_mut().ok_or(StoreError::NotAnObject)?;
        let kind = fields.get("kind").and_then(Value::as_str).unwrap_or_default();
        let resource = Resource::by_kind(kind).ok_or_else(|| StoreError::UnknownKind(kind.to_owned()))?;
        fields
            .entry("apiVersion")
            .or_insert_with(|| Value::String(resource.api_version()));
        let metadata = fields
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or(StoreError::MissingName)?;
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .ok_or(StoreError::MissingName)?
            .to_owned();
        let namespace = if resource.namespaced {
            let namespace = metadata
                .entry("namespace")
                .or_insert_with(|| Value::String("default".to_owned()));
            namespace.as_str().unwrap_or_default().to_owned()
        } else {
            String::new()
        };
        let key = ObjectKey {
            kind: resource.kind,
            namespace,
            name,
        };

        let mut state = self.lock();
        let previous = state.objects.get(&key).cloned();
        let inherited = |field: &str| {
            previous
                .as_ref()
                .and_then(|p| p.pointer(&format!("/metadata/{field}")))
        };
        if !metadata.contains_key("uid") {
            let uid = match inherited("uid") {
                Some(uid) => uid.clone(),
                None => {
                    state.next_uid += 1;
                    Value::String(format!("00000000-0000-4000-8000-{:012x}", state.next_uid))
                }
            };
            metadata.insert("uid".to_owned(), uid);
        }
        if !metadata.contains_key("creationTimestamp") {
            let created = inherited("creationTimestamp")
                .cloned()
                .unwrap_or_else(|| Value::String(now_rfc3339()));
            metadata.insert("creationTimestamp".to_owned(), created);
        }
        state.rv += 1;
        let rv = state.rv;
        set_resource_version(&mut object, rv);
        state.objects.insert(key.clone(), object.clone());
        let event_type = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        state.history.push(HistoryEvent {
            rv,
            kind: key.kind,
            event_type,
            object: object.clone(),
            previous,
        });
        self.notify(&state);
        Ok(object)
    }

    /// Deletes an object, returning its final state. `namespace` is ignored
    /// for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = key_for(kind, namespace, name)?;
        let mut state = self.lock();
        let mut object = state.objects.remove(&key)?;
        state.rv += 1;
        let rv = state.rv;
        set_resource_version(&mut object, rv);
        state.history.push(HistoryEvent {
            rv,
            kind: key.kind,
            event_type: EventType::Deleted,
            object: object.clone(),
            previous: None,
        });
        self.notify(&state);
        Some(object)
    }

    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = key_for(kind, namespace, name)?;
        self.lock().objects.get(&key).cloned()
    }

    /// The current resource version (the newest change).
    /// Every stored object of `kind`, in key order.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let state = self.lock();
        state
            .objects
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, object)| object.clone())
            .collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets all history, as etcd compaction does. Every resource version
    /// handed out so far becomes too old to watch from, so a client that
    /// reconnects afterwards gets 410 Gone and must relist; streams still
    /// open are unaffected.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted_from = state.rv;
        // Moving past every version already handed out is what makes the
        // 410 certain, rather than dependent on whether anything changed.
        state.rv += 1;
        state.compacted_rv = state.rv;
        state.history.clear();
        // Open streams are not woken: one would move to the new version with nothing to deliver and could
        // hand it out in its next bookmark, so a client reconnecting after `break_watches` would resume from
        // there instead of getting the 410 a test set up.
    }

    /// Ends every open watch stream, as an apiserver restart would.
    pub fn break_watches(&self) {
        self.signal.send_modify(|signal| signal.generation += 1);
    }

    /// Makes the next `n` list requests fail with 500, like an unavailable
    /// apiserver.
    pub fn set_fail_lists(&self, n: u32) {
        self.lock().fail_lists = n;
    }

    /// Makes the next `n` watch requests fail with 500.
    pub fn set_fail_watches(&self, n: u32) {
        self.lock().fail_watches = n;
    }

    /// Refuses lists and watches of `kind` with 403 Forbidden (as a ServiceAccount without RBAC for it is
    /// refused) until [`Store::permit`].
    pub fn forbid(&self, kind: &'static str) {
        self.lock().forbidden.insert(kind);
    }

    pub fn permit(&self, kind: &str) {
        self.lock().forbidden.remove(kind);
    }

    pub(crate) fn is_forbidden(&self, kind: &str) -> bool {
        self.lock().forbidden.contains(kind)
    }

    /// Answers lists and watches of `kind` with 404, as an API server answers for an API group or version it
    /// does not serve, until [`Store::serve`].
    pub fn unserve(&self, kind: &'static str) {
        self.lock().unserved.insert(kind);
    }

    pub fn serve(&self, kind: &str) {
        self.lock().unserved.remove(kind);
    }

    pub(crate) fn is_unserved(&self, kind: &str) -> bool {
        self.lock().unserved.contains(kind)
    }

    /// Every request served so far, oldest first.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.lock().requests.clone()
    }

    pub fn clear_request_log(&self) {
        self.lock().requests.clear();
    }

    fn notify(&self, state: &State) {
        self.signal.send_modify(|signal| signal.rv = state.rv);
    }

    pub(crate) fn log_request(&self, request: LoggedRequest) {
        self.lock().requests.push(request);
    }

    pub(crate) fn take_list_failure(&self) -> bool {
        take_one(&mut self.lock().fail_lists)
    }

    pub(crate) fn take_watch_failure(&self) -> bool {
        take_one(&mut self.lock().fail_watches)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Signal> {
        self.signal.subscribe()
    }

    /// The selected objects and the resource version they are current at.
    pub(crate) fn snapshot(&self, filter: &Filter) -> (u64, Vec<Value>) {
        let state = self.lock();
        let objects = state
            .objects
            .iter()
            .filter(|(key, object)| key.kind == filter.resource.kind && filter.matches(object))
            .map(|(_, object)| object.clone())
            .collect();
        (state.rv, objects)
    }

    /// The selected changes after `since` and the version they reach.
    /// `resuming` is false for a new watch request and true for a stream
    /// that is already open and has read up to `since`.
    pub(crate) fn events_since(
        &self,
        since: u64,
        filter: &Filter,
        resuming: bool,
    ) -> Result<(Vec<(EventType, Value)>, u64), Expired> {
        let state = self.lock();
        let lost_nothing = resuming && since >= state.compacted_from;
        if since < state.compacted_rv && !lost_nothing {
            return Err(Expired {
                requested: since,
                oldest: state.compacted_rv,
            });
        }
        let events = state
            .history
            .iter()
            .filter(|event| event.rv > since)
            .filter_map(|event| event.as_seen_by(filter))
            .collect();
        Ok((events, state.rv.max(since)))
    }
}

fn take_one(counter: &mut u32) -> bool {
    let take = *counter > 0;
    *counter = counter.saturating_sub(1);
    take
}

fn key_for(kind: &str, namespace: Option<&str>, name: &str) -> Option<ObjectKey> {
    let resource = Resource::by_kind(kind)?;
    let namespace = if resource.namespaced {
        namespace.unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    Some(ObjectKey {
        kind: resource.kind,
        namespace,
        name: name.to_owned(),
    })
}

fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
    } else if let Some(fields) = object.as_object_mut() {
        let mut metadata = Map::new();
        metadata.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
        fields.insert("metadata".to_owned(), Value::Object(metadata));
    }
}
