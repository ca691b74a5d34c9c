//! client-go's request metrics for svcproxy's API client: `rest_client_requests_total{code,host,method}` and
//! `rest_client_request_duration_seconds{host,verb}`, which kube-proxy exports through client-go and which the
//! usual dashboards ("Kube API Request Rate", request latency) and the `KubeClientErrors` alert read.
//!
//! Recorded by a layer around the client's HTTP stack: a response's status is known when its headers arrive,
//! so a watch counts once, when it starts, and its duration is the time to its first byte, as in client-go.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP status, or `<error>` when no response came.
    pub code: String,
    pub host: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub host: String,
    pub verb: String,
}

/// client-go's latency buckets, in seconds.
fn latency_histogram() -> Histogram {
    Histogram::new([0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0])
}

#[derive(Debug)]
pub struct ApiRequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<VerbLabels, Histogram, fn() -> Histogram>,
}

impl ApiRequestMetrics {
    /// Registers both series, unprefixed as client-go names them, in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = ApiRequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        registry.register(
            "rest_client_requests",
            "Number of HTTP requests, partitioned by status code, method, and host",
            m.requests.clone(),
        );
        registry.register(
            "rest_client_request_duration_seconds",
            "Request latency in seconds. Broken down by verb, and host",
            m.duration.clone(),
        );
        Arc::new(m)
    }

    fn record(&self, host: &str, method: &str, code: String, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                code,
                host: host.to_string(),
                method: method.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&VerbLabels {
                host: host.to_string(),
                verb: method.to_string(),
            })
            .observe(seconds);
    }
}

/// The layer that records every request of the client it wraps. `host` is the API server's `host:port`: the
/// requests it sees are relative, their base is set further down the stack.
#[derive(Clone)]
pub struct RecordRequests {
    pub metrics: Arc<ApiRequestMetrics>,
    pub host: Arc<str>,
}

impl<S> tower::Layer<S> for RecordRequests {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Recorded<S> {
        Recorded {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Recorded<S> {
    inner: S,
    layer: RecordRequests,
}

impl<S, B, R> tower::Service<http::Request<B>> for Recorded<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let layer = self.layer.clone();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            let seconds = started.elapsed().as_secs_f64();
            layer.metrics.record(&layer.host, &method, code, seconds);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service};

    /// Answers every request with `status`, or fails when it is 0.
    #[derive(Clone)]
    struct Answer(u16);

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(match self.0 {
                0 => Err("connection refused"),
                status => Ok(http::Response::builder().status(status).body(()).unwrap()),
            })
        }
    }

    fn request(method: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri("/api/v1/services")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn each_request_is_counted_by_code_host_and_method() {
        let mut registry = Registry::default();
        let metrics = ApiRequestMetrics::register(&mut registry);
        let layer = RecordRequests {
            metrics: metrics.clone(),
            host: "10.96.0.1:443".into(),
        };
        for (status, method) in [
            (200, "GET"),
            (200, "GET"),
            (403, "GET"),
            (201, "POST"),
            (0, "GET"),
        ] {
            let _ = layer.layer(Answer(status)).call(request(method)).await;
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "rest_client_requests_total{code=\"200\",host=\"10.96.0.1:443\",method=\"GET\"} 2",
            "rest_client_requests_total{code=\"403\",host=\"10.96.0.1:443\",method=\"GET\"} 1",
            "rest_client_requests_total{code=\"201\",host=\"10.96.0.1:443\",method=\"POST\"} 1",
            "rest_client_requests_total{code=\"<error>\",host=\"10.96.0.1:443\",method=\"GET\"} 1",
            "rest_client_request_duration_seconds_count{host=\"10.96.0.1:443\",verb=\"GET\"} 4",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
