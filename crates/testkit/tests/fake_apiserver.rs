//! The fake API server driven by the real kube client and watcher: the best
//! evidence that it speaks the protocol the proxy's informers expect.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::{Value, json};
use svcproxy_testkit::{FakeApiServer, Lab, http_get, wait_until};

const PATIENCE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

fn local_server() -> FakeApiServer {
    FakeApiServer::start(SocketAddr::from(([127, 0, 0, 1], 0)))
}

async fn client(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("parse kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("load kubeconfig");
    Client::try_from(config).expect("build client")
}

fn service(namespace: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn names<K: ResourceExt>(objects: impl IntoIterator<Item = K>) -> Vec<String> {
    let mut names: Vec<String> = objects.into_iter().map(|o| o.name_any()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn lists_gets_and_selects() {
    let server = local_server();
    server
        .apply(service("default", "web", json!({"app": "web"})))
        .unwrap();
    server.apply(service("prod", "db", json!({"app": "db"}))).unwrap();
    server
        .apply(service(
            "prod",
            "headless",
            json!({"service.kubernetes.io/headless": ""}),
        ))
        .unwrap();
    let client = client(&server).await;

    let all: Api<Service> = Api::all(client.clone());
    let list = all.list(&ListParams::default()).await.expect("list");
    assert_eq!(names(list.items), ["db", "headless", "web"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    let prod: Api<Service> = Api::namespaced(client.clone(), "prod");
    assert_eq!(
        names(prod.list(&ListParams::default()).await.unwrap()),
        ["db", "headless"]
    );
    let not_headless = ListParams::default().labels("!service.kubernetes.io/headless");
    assert_eq!(names(all.list(&not_headless).await.unwrap()), ["db", "web"]);
    let by_name = ListParams::default().fields("metadata.name=web");
    assert_eq!(names(all.list(&by_name).await.unwrap()), ["web"]);

    let web = Api::<Service>::namespaced(client.clone(), "default")
        .get("web")
        .await
        .unwrap();
    assert!(web.uid().is_some() && web.creation_timestamp().is_some());
    let missing = prod.get("web").await.unwrap_err();
    assert!(
        matches!(missing, kube::Error::Api(ref status) if status.code == 404),
        "{missing:?}"
    );

    let logged = server.request_log();
    assert!(
        logged
            .iter()
            .any(|r| r.param("labelSelector") == Some("!service.kubernetes.io/headless")),
        "{logged:?}"
    );

    server.set_fail_lists(1);
    let outage = all.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(outage, kube::Error::Api(ref status) if status.code == 500),
        "{outage:?}"
    );
    assert!(all.list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn watch_streams_selected_changes() {
    let server = local_server();
    let client = client(&server).await;
    let api: Api<Service> = Api::all(client);
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let params = WatchParams::default().labels("app=web").timeout(10);
    let mut events = api.watch(&params, &rv).await.expect("watch").boxed();

    server
        .apply(service("default", "web", json!({"app": "web"})))
        .unwrap();
    server
        .apply(service("default", "other", json!({"app": "other"})))
        .unwrap();
    server
        .apply(service("default", "web", json!({"app": "web", "v": "2"})))
        .unwrap();
    server
        .apply(service("default", "web", json!({"app": "moved"})))
        .unwrap();
    server
        .apply(service("default", "other", json!({"app": "web"})))
        .unwrap();
    server.delete("Service", Some("default"), "other").unwrap();

    let mut seen = Vec::new();
    while seen.len() < 5 {
        match events
            .try_next()
            .await
            .expect("watch event")
            .expect("stream open")
        {
            WatchEvent::Added(s) => seen.push(format!("ADDED {}", s.name_any())),
            WatchEvent::Modified(s) => seen.push(format!("MODIFIED {}", s.name_any())),
            WatchEvent::Deleted(s) => seen.push(format!("DELETED {}", s.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(status) => panic!("unexpected error event {status:?}"),
        }
    }
    // Leaving and entering the selection read as delete and add.
    assert_eq!(
        seen,
        [
            "ADDED web",
            "MODIFIED web",
            "DELETED web",
            "ADDED other",
            "DELETED other"
        ]
    );
}

#[tokio::test]
async fn watch_sends_bookmarks_and_ends_at_timeout() {
    let server = local_server();
    let api: Api<Node> = Api::all(client(&server).await);
    let params = WatchParams::default().timeout(2);
    let rv = server.resource_version().to_string();
    let events: Vec<_> = api.watch(&params, &rv).await.unwrap().collect().await;
    assert!(
        events.iter().any(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))),
        "{events:?}"
    );
}

#[tokio::test]
async fn watch_from_compacted_version_is_gone() {
    let server = local_server();
    server.apply(service("default", "web", json!({}))).unwrap();
    let old = server.resource_version().to_string();
    server.compact();
    let api: Api<Service> = Api::all(client(&server).await);
    let first = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed()
        .try_next()
        .await
        .unwrap();
    assert!(
        matches!(first, Some(WatchEvent::Error(ref status)) if status.code == 410 && status.reason == "Expired"),
        "{first:?}"
    );
}

/// The proxy's informers are kube watchers; they must converge through
/// everything an apiserver does to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_converges_through_compaction_restart_and_outage() {
    let server = local_server();
    server.apply(service("default", "a", json!({}))).unwrap();
    server
        .apply(service(
            "default",
            "headless",
            json!({"service.kubernetes.io/headless": ""}),
        ))
        .unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels("!service.kubernetes.io/headless");
    let informer = reflector(writer, watcher(api, config))
        .default_backoff()
        .for_each(|_| async {});
    let task = tokio::spawn(informer);

    let converged = |expected: &[&str]| {
        let expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        let description = format!("the watcher holds {expected:?}");
        wait_until(PATIENCE, POLL, &description, || {
            (names(reader.state().iter().map(|s| (**s).clone())) == expected).then_some(())
        });
    };
    converged(&["a"]);

    server.apply(service("default", "b", json!({}))).unwrap();
    converged(&["a", "b"]);

    let lists_before = count_lists(&server);
    server.compact();
    server.break_watches();
    server.delete("Service", Some("default"), "a").unwrap();
    converged(&["b"]);
    wait_until(PATIENCE, POLL, "the watcher relists after 410", || {
        (count_lists(&server) > lists_before).then_some(())
    });

    server.set_fail_lists(2);
    server.compact();
    server.break_watches();
    server.apply(service("default", "c", json!({}))).unwrap();
    converged(&["b", "c"]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_streaming_list_watcher_converges() {
    let server = local_server();
    server
        .apply(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.2"]}],
        }))
        .unwrap();
    let api: Api<EndpointSlice> = Api::all(client(&server).await);
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        reflector(writer, watcher(api, watcher::Config::default().streaming_lists()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    wait_until(PATIENCE, POLL, "the streaming watcher holds web-abc", || {
        (reader.state().len() == 1).then_some(())
    });
    assert!(server.request_log().iter().all(|r| r.is_watch()));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_watch_by_field_selector() {
    let server = local_server();
    let node = |name: &str| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    server.apply(node("node-a")).unwrap();
    server.apply(node("node-b")).unwrap();
    let api: Api<Node> = Api::all(client(&server).await);
    let config = watcher::Config::default().fields("metadata.name=node-b");
    let mut events = watcher(api, config).applied_objects().boxed();
    let first = events.try_next().await.unwrap().unwrap();
    assert_eq!(first.name_any(), "node-b");
}

#[tokio::test]
async fn serves_malformed_objects_as_stored() {
    let server = local_server();
    let mut broken = service("default", "broken", json!({}));
    broken["spec"]["ports"] = json!("not a list");
    server.apply(broken).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(err, kube::Error::SerdeError(_)), "{err:?}");
}

#[test]
fn serves_from_inside_a_lab_node() {
    let lab = Lab::new();
    let server = FakeApiServer::start_in(lab.node(), SocketAddr::from(([0, 0, 0, 0], 0)));
    server.apply(service("default", "web", json!({}))).unwrap();
    let port = server.addr().port();
    let (status, body) = http_get(
        lab.node(),
        SocketAddr::from(([127, 0, 0, 1], port)),
        "/api/v1/services",
        Duration::from_secs(5),
    )
    .expect("GET from the node");
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");

    let (status, _) = http_get(
        lab.external(),
        SocketAddr::from((Lab::NODE_IP, port)),
        "/api/v1/nodes/missing",
        Duration::from_secs(5),
    )
    .expect("GET from outside");
    assert_eq!(status, 404);
}

fn count_lists(server: &FakeApiServer) -> usize {
    server
        .request_log()
        .iter()
        .filter(|r| r.is_list_of("/api/v1/services"))
        .count()
}

#[tokio::test]
async fn events_are_created_and_a_taken_name_conflicts() {
    use k8s_openapi::api::events::v1::Event;
    use kube::api::PostParams;
    let server = local_server();
    let api: Api<Event> = Api::namespaced(client(&server).await, "default");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": "node-a.1"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "Starting",
        "action": "StartKubeProxy",
        "reportingController": "svcproxy",
        "reportingInstance": "node-a",
        "type": "Normal",
        "regarding": {"kind": "Node", "name": "node-a"}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &event).await.expect("created");
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
    assert!(created.metadata.resource_version.is_some());
    let stored = server.store().list("Event");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["reason"], "Starting");
    let again = api.create(&PostParams::default(), &event).await;
    assert!(
        matches!(again, Err(kube::Error::Api(ref s)) if s.code == 409),
        "{again:?}"
    );
}
