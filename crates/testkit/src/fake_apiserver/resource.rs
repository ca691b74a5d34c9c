/// A resource type the fake API server serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// Empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

/// What a proxy watches, and the events it writes. Adding a type here is all it takes to serve it.
pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        group: "networking.k8s.io",
        version: "v1",
        plural: "servicecidrs",
        kind: "ServiceCIDR",
        namespaced: false,
    },
    // What a proxy writes: events about its Node and Services.
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
];

impl Resource {
    pub fn by_kind(kind: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|resource| resource.kind == kind)
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

/// The resource, namespace and object a request path addresses.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Target {
    /// Parses `/api/v1/...` and `/apis/<group>/<version>/...` paths, in their
    /// all-namespaces, namespaced and single-object forms.
    pub fn from_path(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let (namespace, plural, name) = match rest {
            ["namespaces", namespace, plural, name @ ..] => (Some(*namespace), *plural, name),
            [plural, name @ ..] => (None, *plural, name),
            [] => return None,
        };
        let name = match name {
            [] => None,
            [name] => Some((*name).to_owned()),
            _ => return None,
        };
        let resource = RESOURCES.iter().find(|resource| {
            resource.group == group && resource.version == version && resource.plural == plural
        })?;
        if namespace.is_some() && !resource.namespaced {
            return None;
        }
        Some(Target {
            resource,
            namespace: namespace.map(str::to_owned),
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Resource, Target};

    #[test]
    fn parses_request_paths() {
        let services = Resource::by_kind("Service").unwrap();
        let slices = Resource::by_kind("EndpointSlice").unwrap();
        let nodes = Resource::by_kind("Node").unwrap();
        let target = |resource, namespace: Option<&str>, name: Option<&str>| {
            Some(Target {
                resource,
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
            })
        };
        assert_eq!(
            Target::from_path("/api/v1/services"),
            target(services, None, None)
        );
        assert_eq!(
            Target::from_path("/api/v1/namespaces/default/services/web"),
            target(services, Some("default"), Some("web"))
        );
        assert_eq!(
            Target::from_path("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices"),
            target(slices, Some("kube-system"), None)
        );
        assert_eq!(
            Target::from_path("/api/v1/nodes/node-a"),
            target(nodes, None, Some("node-a"))
        );
        assert_eq!(Target::from_path("/api/v1/namespaces/x/nodes"), None);
        assert_eq!(Target::from_path("/api/v1/pods"), None);
        assert_eq!(
            Target::from_path("/apis/discovery.k8s.io/v1beta1/endpointslices"),
            None
        );
    }
}
