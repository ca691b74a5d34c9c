//! Reading a directory of manifests into a [`ClusterState`].
//!
//! The directory is always read whole (level-triggered), never patched event by event: editors and ConfigMap
//! volumes replace files by renames, and a full re-read cannot miss such a change. A file whose text is what
//! it was last time is not parsed again: what it contributed then is used as it is (parsing is what a read
//! costs, and most reads follow an edit to one file of many). An object that fails to parse or validate keeps
//! the last good version we had of it, so one bad edit never takes a working Service down.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use serde::de::DeserializeOwned;
use serde_json::Value;
use svcproxy_model::{ClusterState, ObjectName};

use super::IGNORE_LABELS;
use super::convert::{self, ConvertError};
use super::file_stamp::FileStamp;

const DEFAULT_NAMESPACE: &str = "default";
/// Reads of a directory that keeps changing while it is read: the last is used as it is.
const READ_ATTEMPTS: u32 = 4;

/// A file's text, and the version of the file it was read from (taken from the open file, so the two belong
/// together whatever happens to the name meanwhile).
fn read_stamped(path: &Path) -> std::io::Result<(String, FileStamp)> {
    let mut file = fs::File::open(path)?;
    let stamp = FileStamp::of(&file.metadata()?);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)?;
    Ok((text, stamp))
}

/// Errors that stop a whole directory read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestDirError {
    #[error("cannot read manifest directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
}

/// A problem with one document; the rest of the directory is still used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{file} document {index}: {source}")]
    Object {
        file: String,
        index: usize,
        #[source]
        source: ConvertError,
    },
}

/// Identity of an object across reads, used to carry the last good version of a rejected object over.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ObjectKey {
    Service(ObjectName),
    Slice(ObjectName),
    Node,
    ServiceCidr(ObjectName),
}

/// The outcome of one read of the directory.
#[derive(Debug, Default)]
pub struct DirRead {
    pub state: ClusterState,
    pub errors: Vec<DocumentError>,
    pub warnings: Vec<String>,
}

/// What one file that parsed contributed to a read, with the text it was read from.
#[derive(Debug)]
struct FileRead {
    text: String,
    read: DirRead,
    keys: BTreeSet<ObjectKey>,
    rejected: BTreeSet<ObjectKey>,
}

impl FileRead {
    /// Adds this file's objects, findings and keys to a read of the whole directory, as reading its
    /// documents there in order would: an object a later file holds too is the later file's.
    fn add_to(&self, out: &mut DirRead, keys: &mut BTreeSet<ObjectKey>, rejected: &mut BTreeSet<ObjectKey>) {
        let state = &self.read.state;
        out.state
            .services
            .extend(state.services.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.state
            .endpoint_slices
            .extend(state.endpoint_slices.iter().map(|(k, v)| (k.clone(), v.clone())));
        if state.node.is_some() {
            out.state.node.clone_from(&state.node);
        }
        out.state
            .service_cidrs
            .extend(state.service_cidrs.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.errors.extend(self.read.errors.iter().cloned());
        out.warnings.extend(self.read.warnings.iter().cloned());
        keys.extend(self.keys.iter().cloned());
        rejected.extend(self.rejected.iter().cloned());
    }
}

/// One pass over a directory's files: what they hold (rejected objects keeping their last good versions),
/// which file each object came from, and the version of each file read, or for a file that could not be read
/// the version its name led to then.
struct FilesRead {
    read: DirRead,
    origin: BTreeMap<String, BTreeSet<ObjectKey>>,
    seen: Vec<(PathBuf, Option<FileStamp>)>,
}

/// Reads a manifest directory repeatedly, remembering what each file contributed last time.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    node_name: String,
    last_good: ClusterState,
    origin: BTreeMap<String, BTreeSet<ObjectKey>>,
    /// The files that parsed at the last read, by name.
    files: BTreeMap<String, FileRead>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>, node_name: impl Into<String>) -> Self {
        ManifestDir {
            dir: dir.into(),
            node_name: node_name.into(),
            last_good: ClusterState::default(),
            origin: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every `*.yaml`, `*.yml` and `*.json` file (hidden files skipped: ConfigMap volumes keep their
    /// real data in dot-directories behind symlinks we already follow).
    ///
    /// The files are read one after another, so a read that overlaps a change could hold some files as they
    /// were before it and some as they are after (a file read early, then rewritten, while one read later
    /// was written after it): a state the directory never had. So each read is checked afterwards: when the
    /// directory no longer lists the same files, or any of them is no longer the version read, it is read
    /// again, up to [`READ_ATTEMPTS`] times. A read that passes holds every file as it was at one moment,
    /// so whoever writes several files in turn never sees a later one programmed without an earlier one.
    pub fn read(&mut self) -> Result<DirRead, ManifestDirError> {
        let mut attempt = 1;
        loop {
            let pass = self.read_files()?;
            let consistent = self.unchanged(&pass.seen)?;
            if consistent || attempt == READ_ATTEMPTS {
                if !consistent {
                    tracing::debug!(
                        dir = %self.dir.display(),
                        "the directory kept changing while it was read; using the last read (the change raises another)"
                    );
                }
                self.last_good = pass.read.state.clone();
                self.origin = pass.origin;
                return Ok(pass.read);
            }
            tracing::debug!(
                dir = %self.dir.display(),
                attempt,
                "the directory changed while it was read; reading it again"
            );
            attempt += 1;
        }
    }

    /// The manifest files the directory lists, in name order.
    fn files(&self) -> Result<Vec<PathBuf>, ManifestDirError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| ManifestDirError::ReadDir {
            dir: self.dir.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.')
                    && p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Whether the directory still lists exactly the files `seen` and each is still the version read.
    fn unchanged(&self, seen: &[(PathBuf, Option<FileStamp>)]) -> Result<bool, ManifestDirError> {
        let files = self.files()?;
        Ok(files.len() == seen.len()
            && files
                .iter()
                .zip(seen)
                .all(|(path, (read, stamp))| path == read && FileStamp::now(path) == *stamp))
    }

    /// One pass over the files.
    fn read_files(&mut self) -> Result<FilesRead, ManifestDirError> {
        let files = self.files()?;
        let mut seen = Vec::with_capacity(files.len());
        let mut out = DirRead::default();
        let mut origin: BTreeMap<String, BTreeSet<ObjectKey>> = BTreeMap::new();
        let mut rejected: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut previous_files = std::mem::take(&mut self.files);
        for path in files {
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("?")
                .to_string();
            let (text, stamp) = match read_stamped(&path) {
                Ok(read) => read,
                Err(e) => {
                    // The name's version as it is now: a file that stays unreadable (its permissions) does
                    // not make every read look overtaken, one that vanished or came back does.
                    seen.push((path.clone(), FileStamp::now(&path)));
                    out.errors.push(DocumentError::File {
                        file: file.clone(),
                        reason: e.to_string(),
                    });
                    self.carry_over(&file, &mut origin, &mut rejected);
                    continue;
                }
            };
            seen.push((path.clone(), Some(stamp)));
            if let Some(same) = previous_files.remove(&file).filter(|f| f.text == text) {
                same.add_to(&mut out, origin.entry(file.clone()).or_default(), &mut rejected);
                self.files.insert(file, same);
                continue;
            }
            let docs: Vec<Value> = match parse_documents(&path, &text) {
                Ok(d) => d,
                Err(reason) => {
                    out.errors.push(DocumentError::File {
                        file: file.clone(),
                        reason,
                    });
                    self.carry_over(&file, &mut origin, &mut rejected);
                    continue;
                }
            };
            let mut fresh = FileRead {
                text,
                read: DirRead::default(),
                keys: BTreeSet::new(),
                rejected: BTreeSet::new(),
            };
            for (index, doc) in docs.into_iter().enumerate() {
                self.add_document(
                    &file,
                    index,
                    doc,
                    &mut fresh.read,
                    &mut fresh.keys,
                    &mut fresh.rejected,
                );
            }
            fresh.add_to(&mut out, origin.entry(file.clone()).or_default(), &mut rejected);
            self.files.insert(file, fresh);
        }

        // A rejected object keeps its last good version; an object that disappeared from the files is deleted.
        for key in rejected {
            match &key {
                ObjectKey::Service(n) => {
                    keep_last_good(&mut out.state.services, &self.last_good.services, n);
                }
                ObjectKey::Slice(n) => {
                    keep_last_good(&mut out.state.endpoint_slices, &self.last_good.endpoint_slices, n);
                }
                ObjectKey::Node => {
                    if out.state.node.is_none() {
                        out.state.node = self.last_good.node.clone();
                    }
                }
                ObjectKey::ServiceCidr(n) => {
                    keep_last_good(&mut out.state.service_cidrs, &self.last_good.service_cidrs, n);
                }
            }
        }
        Ok(FilesRead {
            read: out,
            origin,
            seen,
        })
    }

    /// A file that cannot be read or parsed: the objects it held last time keep their last good versions,
    /// and stay on record as its own, so they are kept again on the next read if it still fails (forgetting
    /// them there deleted them one read later).
    fn carry_over(
        &self,
        file: &str,
        origin: &mut BTreeMap<String, BTreeSet<ObjectKey>>,
        rejected: &mut BTreeSet<ObjectKey>,
    ) {
        let previous = self.origin.get(file).cloned().unwrap_or_default();
        rejected.extend(previous.iter().cloned());
        origin.insert(file.to_string(), previous);
    }

    fn add_document(
        &self,
        file: &str,
        index: usize,
        doc: Value,
        out: &mut DirRead,
        keys: &mut BTreeSet<ObjectKey>,
        rejected: &mut BTreeSet<ObjectKey>,
    ) {
        if doc.is_null() {
            return;
        }
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let meta_name = ObjectName::new(
            doc.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_NAMESPACE),
            doc.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or(""),
        );
        let ignored = IGNORE_LABELS
            .iter()
            .any(|l| doc.pointer("/metadata/labels").and_then(|m| m.get(l)).is_some());
        if ignored && matches!(kind.as_str(), "Service" | "EndpointSlice") {
            return;
        }
        let fail = |out: &mut DirRead, source: ConvertError| {
            out.errors.push(DocumentError::Object {
                file: file.to_string(),
                index,
                source,
            });
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "List") => {
                // Taken out of the document, not copied: a list of 5,000 Services and their slices is a
                // 10 MB file and several times that as a value, and each item is dropped once it is read.
                let items = match doc {
                    Value::Object(mut fields) => match fields.remove("items") {
                        Some(Value::Array(items)) => items,
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                };
                for item in items {
                    self.add_document(file, index, item, out, keys, rejected);
                }
            }
            ("v1", "Service") => {
                let key = ObjectKey::Service(meta_name.clone());
                keys.insert(key.clone());
                match typed::<core::Service>("Service", &meta_name, doc)
                    .and_then(|s| convert::service(&s, DEFAULT_NAMESPACE))
                {
                    Ok(s) => {
                        out.state.services.insert(s.name.clone(), s);
                    }
                    Err(e) => {
                        rejected.insert(key);
                        fail(out, e);
                    }
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let key = ObjectKey::Slice(meta_name.clone());
                keys.insert(key.clone());
                match typed::<discovery::EndpointSlice>("EndpointSlice", &meta_name, doc)
                    .and_then(|s| convert::endpoint_slice(&s, DEFAULT_NAMESPACE))
                {
                    Ok(s) => {
                        out.state.endpoint_slices.insert(s.name.clone(), s);
                    }
                    Err(e) => {
                        rejected.insert(key);
                        fail(out, e);
                    }
                }
            }
            ("v1", "Node") => {
                // Only our own Node matters; others are legal in a shared manifest set and ignored quietly.
                if meta_name.name != self.node_name {
                    return;
                }
                keys.insert(ObjectKey::Node);
                match typed::<core::Node>("Node", &meta_name, doc).and_then(|n| convert::node(&n)) {
                    Ok(n) => out.state.node = Some(n),
                    Err(e) => {
                        rejected.insert(ObjectKey::Node);
                        fail(out, e);
                    }
                }
            }
            ("networking.k8s.io/v1", "ServiceCIDR") => {
                // Cluster-scoped: whatever namespace the document names is not part of its identity.
                let name = ObjectName::new("", meta_name.name.clone());
                let key = ObjectKey::ServiceCidr(name.clone());
                keys.insert(key.clone());
                match typed::<networking::ServiceCIDR>("ServiceCIDR", &name, doc)
                    .and_then(|c| convert::service_cidr(&c))
                {
                    Ok(c) => {
                        out.state.service_cidrs.insert(c.name.clone(), c);
                    }
                    Err(e) => {
                        rejected.insert(key);
                        fail(out, e);
                    }
                }
            }
            _ => out.warnings.push(format!(
                "{file} document {index}: ignoring {} {meta_name} (svcproxy reads Service, EndpointSlice, Node, \
                 ServiceCIDR and List)",
                if kind.is_empty() { "object without kind".to_string() } else { format!("{api_version} {kind}") },
            )),
        }
    }
}

/// A rejected object's last good version, unless this read has a good one after all (another file holds it).
fn keep_last_good<T: Clone>(
    out: &mut BTreeMap<ObjectName, T>,
    last: &BTreeMap<ObjectName, T>,
    name: &ObjectName,
) {
    if let (false, Some(good)) = (out.contains_key(name), last.get(name)) {
        out.insert(name.clone(), good.clone());
    }
}

/// The parser's default budget guards against YAML bombs but also caps honest files at 250,000 nodes and
/// 1,024 documents, which a cluster of a few thousand Services exceeds. Raise the size limits, keep the limits
/// on aliases and anchors (what bombs are made of).
fn yaml_options() -> serde_saphyr::Options {
    // Both types are non-exhaustive: start from the defaults and raise fields.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 500_000_000;
    budget.max_documents = 10_000_000;
    budget.max_nodes = 200_000_000;
    budget.max_total_scalar_bytes = 4 << 30;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Every document of a file: JSON files (what generators and `kubectl get -o json` write) are one value,
/// YAML files a stream of documents.
fn parse_documents(path: &Path, text: &str) -> Result<Vec<Value>, String> {
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        return serde_json::from_str::<Value>(text)
            .map(|v| vec![v])
            .map_err(|e| format!("not valid JSON: {e}"));
    }
    serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| format!("not valid YAML: {e}"))
}

/// Deserialises into a k8s-openapi type, naming the field that did not fit.
fn typed<T: DeserializeOwned>(kind: &'static str, name: &ObjectName, doc: Value) -> Result<T, ConvertError> {
    serde_path_to_error::deserialize(doc).map_err(|e| ConvertError {
        kind,
        object: name.to_string(),
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.100
  ports:
  - {name: http, protocol: TCP, port: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- addresses: [10.244.0.11]
";

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("svcproxy-manifest-dir-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
        fn write(&self, file: &str, text: &str) {
            fs::write(self.0.join(file), text).unwrap();
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn web() -> ObjectName {
        ObjectName::new("demo", "web")
    }

    #[test]
    fn a_file_that_stays_broken_keeps_its_objects_read_after_read() {
        let dir = Dir::new("broken");
        dir.write("web.yaml", WEB);
        let mut manifests = ManifestDir::new(&dir.0, "node-a");
        let good = manifests.read().unwrap();
        assert!(good.errors.is_empty(), "{:?}", good.errors);
        assert!(good.state.services.contains_key(&web()));

        dir.write(
            "web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
        );
        for read in 1..=3 {
            let broken = manifests.read().unwrap();
            assert_eq!(broken.errors.len(), 1, "read {read}");
            assert_eq!(broken.state.services, good.state.services, "read {read}");
            assert_eq!(
                broken.state.endpoint_slices, good.state.endpoint_slices,
                "read {read}"
            );
        }

        // Removed, the file's objects go.
        fs::remove_file(dir.0.join("web.yaml")).unwrap();
        let gone = manifests.read().unwrap();
        assert!(gone.state.services.is_empty() && gone.state.endpoint_slices.is_empty());
    }

    const CIDRS: &str = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n\
                         spec: {cidrs: [10.96.0.0/16, 'fd00:10:96::/112']}\n";

    #[test]
    fn service_cidrs_are_read_kept_through_a_bad_edit_and_dropped_with_their_file() {
        let dir = Dir::new("cidrs");
        dir.write("cidrs.yaml", CIDRS);
        let mut manifests = ManifestDir::new(&dir.0, "node-a");
        let good = manifests.read().unwrap();
        assert!(good.errors.is_empty() && good.warnings.is_empty(), "{good:?}");
        let name = ObjectName::new("", "kubernetes");
        let ranges: Vec<String> = good.state.service_cidrs[&name]
            .cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ranges, ["10.96.0.0/16", "fd00:10:96::/112"]);

        dir.write("cidrs.yaml", &CIDRS.replace("10.96.0.0/16", "10.96.0.1/16"));
        let bad = manifests.read().unwrap();
        assert_eq!(bad.errors.len(), 1, "{bad:?}");
        let message = bad.errors[0].to_string();
        assert!(
            message.contains("ServiceCIDR kubernetes") && message.contains("spec.cidrs[0]"),
            "{message}"
        );
        assert_eq!(bad.state.service_cidrs, good.state.service_cidrs);

        fs::remove_file(dir.0.join("cidrs.yaml")).unwrap();
        assert!(manifests.read().unwrap().state.service_cidrs.is_empty());
    }

    #[test]
    fn an_invalid_object_keeps_its_last_good_version_read_after_read() {
        let dir = Dir::new("invalid");
        dir.write("web.yaml", WEB);
        let mut manifests = ManifestDir::new(&dir.0, "node-a");
        let good = manifests.read().unwrap();
        dir.write("web.yaml", &WEB.replace("port: 80}", "port: 70000}"));
        for read in 1..=3 {
            let invalid = manifests.read().unwrap();
            assert_eq!(invalid.errors.len(), 1, "read {read}");
            assert_eq!(invalid.state.services, good.state.services, "read {read}");
        }
    }

    #[test]
    fn an_unchanged_file_is_taken_from_the_last_read_and_an_edited_one_read_again() {
        let dir = Dir::new("unchanged");
        dir.write("a.yaml", WEB);
        let other = WEB
            .replace("name: web", "name: api")
            .replace("10.96.0.100", "10.96.0.101");
        dir.write("b.yaml", &other);
        let mut manifests = ManifestDir::new(&dir.0, "node-a");
        let first = manifests.read().unwrap();
        assert_eq!(first.state.services.len(), 2);
        assert_eq!(manifests.read().unwrap().state, first.state, "nothing changed");

        // An edit of the same length (a cached size or time would not tell it), to the second file only.
        dir.write("b.yaml", &other.replace("10.96.0.101", "10.96.0.102"));
        let edited = manifests.read().unwrap();
        let api = ObjectName::new("demo", "api");
        assert_eq!(
            edited.state.services[&api].cluster_ips[0].to_string(),
            "10.96.0.102"
        );
        assert_eq!(edited.state.services[&web()], first.state.services[&web()]);

        // A file that later holds an object an unchanged earlier file also holds wins, as in a fresh read.
        dir.write("b.yaml", &WEB.replace("10.96.0.100", "10.96.0.103"));
        let shadowed = manifests.read().unwrap();
        assert_eq!(shadowed.state.services.len(), 1);
        assert_eq!(
            shadowed.state.services[&web()].cluster_ips[0].to_string(),
            "10.96.0.103"
        );

        // The unchanged file's objects go with it, and its findings are reported again while it stays.
        dir.write("a.yaml", &WEB.replace("port: 80}", "port: 70000}"));
        assert_eq!(manifests.read().unwrap().errors.len(), 1);
        assert_eq!(
            manifests.read().unwrap().errors.len(),
            1,
            "the same file, taken from the last read"
        );
        fs::remove_file(dir.0.join("b.yaml")).unwrap();
        fs::remove_file(dir.0.join("a.yaml")).unwrap();
        let empty = manifests.read().unwrap();
        assert!(
            empty.state.services.is_empty() && empty.errors.is_empty(),
            "{empty:?}"
        );
    }

    /// A Service per line of YAML: `name` in namespace demo, serving `port`.
    fn service_at(name: &str, index: u32, port: u32) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  \
             clusterIP: 10.96.{}.{}\n  ports:\n  - {{name: http, protocol: TCP, port: {port}}}\n",
            index / 200,
            index % 200 + 1
        )
    }

    fn port_of(read: &DirRead, name: &str) -> u16 {
        read.state.services[&ObjectName::new("demo", name)].ports[0].port
    }

    /// Written as a writer of several files does it: `a-bulk.yaml` (read first, and long to parse), then
    /// `b-marker.yaml`, each version's port in both. Whenever a read overlaps the writes, a pass reads the
    /// bulk file before it changed and the marker after; the read must notice and read again, so that no read
    /// ever holds a marker newer than the bulk file it was written after.
    #[test]
    fn a_read_overlapping_writes_to_several_files_holds_them_all_as_of_one_moment() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

        let dir = Arc::new(Dir::new("overlap"));
        fn write(dir: &Dir, file: &str, text: &str) {
            let tmp = dir.0.join(format!(".{file}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, dir.0.join(file)).unwrap();
        }
        fn version(dir: &Dir, v: u32) {
            let bulk: String = (0..150)
                .map(|i| service_at(&format!("bulk-{i}"), i, 1000 + v))
                .collect();
            write(dir, "a-bulk.yaml", &bulk);
            write(dir, "b-marker.yaml", &service_at("marker", 999, 1000 + v));
        }
        version(&dir, 0);
        let reads = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        // Each version is written right after a read returned, so it lands in the next read's first pass,
        // while the reader is listing the directory or reading the bulk file; nothing is written while the
        // reader reads again.
        let writer = {
            let (dir, reads, done) = (dir.clone(), reads.clone(), done.clone());
            std::thread::spawn(move || {
                for v in 1..=40 {
                    let seen = reads.load(Ordering::SeqCst);
                    while reads.load(Ordering::SeqCst) == seen {
                        std::thread::yield_now();
                    }
                    version(&dir, v);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut manifests = ManifestDir::new(&dir.0, "node-a");
        let mut mixed = Vec::new();
        let mut last = 0;
        while !done.load(Ordering::SeqCst) {
            let read = manifests.read().unwrap();
            reads.fetch_add(1, Ordering::SeqCst);
            assert!(read.errors.is_empty(), "{:?}", read.errors);
            let (bulk, marker) = (port_of(&read, "bulk-0"), port_of(&read, "marker"));
            if (0..150).any(|i| port_of(&read, &format!("bulk-{i}")) != bulk) {
                mixed.push(format!("bulk file read half-written at marker {marker}"));
            }
            if marker > bulk {
                mixed.push(format!("marker {marker} with bulk {bulk}"));
            }
            last = marker;
        }
        writer.join().unwrap();
        assert!(mixed.is_empty(), "reads mixing versions: {mixed:?}");
        assert!(
            last >= 1039,
            "the reads followed the writes: the last saw marker {last}"
        );
        assert_eq!(port_of(&manifests.read().unwrap(), "marker"), 1040);
    }
}
