use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::filter::Filter;
use super::request_log::LoggedRequest;
use super::resource::Target;
use super::store::Store;
use super::watch::{self, WatchRequest};

/// What a watch without `timeoutSeconds` gets, matching kube clients' own
/// default so neither side is surprised.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);

/// Serves every request: paths are parsed by hand rather than with a router
/// so that namespaced, all-namespaces and single-object forms share one
/// table of resources.
pub(crate) async fn handle(State(store): State<Store>, method: Method, uri: Uri, body: Bytes) -> Response {
    let params = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|Query(params)| params)
        .unwrap_or_default();
    let request = LoggedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        params,
    };
    tracing::debug!(method = %request.method, path = %request.path, query = %request.query, "fake apiserver request");
    store.log_request(request.clone());
    match method {
        Method::GET => respond(&store, &request),
        Method::POST => create(&store, &request, &body),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only reads and creates are served",
        ),
    }
}

/// A create (`POST` to a collection): the object is stored as sent, under the path's namespace, and answered
/// with what was stored. A name already taken is a conflict, as on an apiserver.
fn create(store: &Store, request: &LoggedRequest, body: &[u8]) -> Response {
    let Some(target) = Target::from_path(&request.path).filter(|t| t.name.is_none()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no collection at {}", request.path),
        );
    };
    let mut object: Value = match serde_json::from_slice(body) {
        Ok(object) => object,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    if object.get("kind").and_then(Value::as_str) != Some(target.resource.kind) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the body is not a {}", target.resource.kind),
        );
    }
    if let (Some(namespace), Some(metadata)) = (&target.namespace, object.get_mut("metadata")) {
        metadata["namespace"] = Value::String(namespace.clone());
    }
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if store
        .get(target.resource.kind, target.namespace.as_deref(), &name)
        .is_some()
    {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", target.resource.plural),
        );
    }
    match store.apply(object) {
        Ok(stored) => (StatusCode::CREATED, Json(stored)).into_response(),
        Err(e) => status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string()),
    }
}

fn respond(store: &Store, request: &LoggedRequest) -> Response {
    let target = Target::from_path(&request.path).filter(|t| !store.is_unserved(t.resource.kind));
    let Some(target) = target else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if let Some(name) = &target.name {
        return match store.get(target.resource.kind, target.namespace.as_deref(), name) {
            Some(object) => Json(object).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", target.resource.plural),
            ),
        };
    }
    let filter = match Filter::new(
        &target,
        request.param("labelSelector"),
        request.param("fieldSelector"),
    ) {
        Ok(filter) => filter,
        Err(err) => return status(StatusCode::BAD_REQUEST, "BadRequest", &err.to_string()),
    };
    if store.is_forbidden(target.resource.kind) {
        let verb = if request.is_watch() { "watch" } else { "list" };
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "{plural} is forbidden: User \"system:serviceaccount:kube-system:svcproxy\" cannot {verb} \
                 resource \"{plural}\"",
                plural = target.resource.plural
            ),
        );
    }
    if request.is_watch() {
        start_watch(store, request, filter)
    } else {
        list(store, &filter)
    }
}

fn list(store: &Store, filter: &Filter) -> Response {
    if store.take_list_failure() {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected list failure",
        );
    }
    // Everything fits in one page; leaving out `continue` is how a server
    // says so, whatever `limit` asked for.
    let (rv, items) = store.snapshot(filter);
    Json(json!({
        "apiVersion": filter.resource.api_version(),
        "kind": filter.resource.list_kind(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    }))
    .into_response()
}

fn start_watch(store: &Store, request: &LoggedRequest, filter: Filter) -> Response {
    if store.take_watch_failure() {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected watch failure",
        );
    }
    let since = match request.param("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        rv => match rv.parse() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resourceVersion {rv:?}"),
                );
            }
        },
    };
    // Zero means "not set" to an apiserver, not "end at once".
    let timeout = request
        .param("timeoutSeconds")
        .and_then(|secs| secs.parse().ok())
        .filter(|&secs| secs > 0)
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let body = watch::stream(
        store.clone(),
        WatchRequest {
            filter,
            since,
            bookmarks: request.param("allowWatchBookmarks") == Some("true"),
            send_initial_events: request.param("sendInitialEvents") == Some("true"),
            timeout,
        },
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An error in the `Status` form clients parse for the reason and code.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body: Value = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}
