use std::net::SocketAddr;

/// The smallest kubeconfig a client accepts for a plain-HTTP server with no
/// authentication: one cluster, one credential-less user, one context that
/// is current.
pub(crate) fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "\
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
preferences: {{}}
"
    )
}
