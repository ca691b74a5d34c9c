//! The health server (`/healthz`, `/livez`) and the metrics server (`/metrics`, `/proxyMode`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::{ProxyHealth, go_time};
use crate::metrics::{CodeLabels, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
pub struct AppState {
    pub health: Arc<ProxyHealth>,
    pub metrics: Arc<Metrics>,
    pub proxy_mode: &'static str,
    /// The effective configuration as `/configz` serves it (JSON), fixed at start.
    pub configz: Arc<str>,
}

fn json(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    r
}

fn code(status: StatusCode) -> CodeLabels {
    CodeLabels {
        code: status.as_u16().to_string(),
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    let st = s.health.status();
    let status = if st.healthy && st.node_eligible {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    s.metrics.healthz.get_or_create(&code(status)).inc();
    // Same body shape (and spacing) as upstream, so existing probes and scrapers parse it.
    // Upstream's fields first; a reason is added only when we know why the node is unhealthy.
    let reason = st
        .problem
        .as_deref()
        .map(|p| format!(", \"reason\": {}", serde_json::Value::from(p)))
        .unwrap_or_default();
    json(
        status,
        format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}, \"nodeEligible\": {}{reason}}}",
            go_time(st.last_updated),
            go_time(st.current_time),
            st.node_eligible
        ),
    )
}

async fn livez(State(s): State<AppState>) -> Response {
    let st = s.health.status();
    let status = if st.live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    s.metrics.livez.get_or_create(&code(status)).inc();
    json(
        status,
        format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}}}",
            go_time(st.last_updated),
            go_time(st.current_time)
        ),
    )
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut r = s.metrics.encode().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

async fn configz(State(s): State<AppState>) -> Response {
    json(StatusCode::OK, s.configz.to_string())
}

async fn proxy_mode(State(s): State<AppState>) -> &'static str {
    s.proxy_mode
}

pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(state)
}

pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(proxy_mode))
        .route("/configz", get(configz))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves `router` on `addr`. An address that cannot be bound (another process holds the port: the old
/// proxy during a migration, say) is an error with `hard_fail`; otherwise, as upstream does by default, it is
/// logged and retried every few seconds while everything else goes on, rules included. Port 0 turns the
/// server off (kube-proxy's `--healthz-port=0` / `--metrics-port=0`).
pub async fn serve(
    what: &'static str,
    addr: SocketAddr,
    router: Router,
    hard_fail: bool,
) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    const RETRY: std::time::Duration = std::time::Duration::from_secs(5);
    if addr.port() == 0 {
        tracing::info!("not serving {what}: turned off (port 0)");
        return Ok(tokio::spawn(async {}));
    }
    let first = TcpListener::bind(addr).await;
    let listener = match first {
        Ok(listener) => Some(listener),
        Err(source) if hard_fail => return Err(HttpError::Bind { addr, source }),
        Err(e) => {
            tracing::error!("cannot serve {what} on {addr}: {e}; retrying every {RETRY:?}");
            None
        }
    };
    Ok(tokio::spawn(async move {
        let listener = match listener {
            Some(listener) => listener,
            None => loop {
                tokio::time::sleep(RETRY).await;
                if let Ok(listener) = TcpListener::bind(addr).await {
                    break listener;
                }
            },
        };
        tracing::info!("serving {what} on http://{addr}");
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("HTTP server on {addr} stopped: {e}");
        }
    }))
}
