//! Objects as the list/watch decodes them: EndpointSlices with only the parts [`convert::endpoint_slice`]
//! reads, other kinds boxed one by one ([`Boxed`]).
//!
//! The watcher holds a whole list response while its objects are handed over one by one, and an API server
//! serving the initial list from its cache (`resourceVersion=0`) answers in one response whatever page size
//! was asked for. Decoded into the full API types, the lists of 5,000 Services and 5,000 slices × 10
//! endpoints took 41 MB, most of it endpoints (each carries room for a target reference, a hostname and a
//! topology map the proxy never reads); this form takes a fraction of that, and drops each object's
//! `managedFields` as soon as it is decoded.
//!
//! Decoding is as lenient as the full type's: unknown and unread fields are skipped, missing ones default.

use std::borrow::Cow;

use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{NamespaceResourceScope, Resource as _};
use serde::Deserialize;

use super::convert::{self, ConvertError};

/// An EndpointSlice with the fields the proxy reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(try_from = "RawSlice")]
pub struct WireEndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    pub endpoints: Option<Vec<WireEndpoint>>,
    pub ports: Option<Vec<discovery::EndpointPort>>,
}

/// One endpoint with the fields the proxy reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireEndpoint {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    pub conditions: Option<discovery::EndpointConditions>,
    pub hints: Option<discovery::EndpointHints>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// The wire form before the checks the full type makes (`apiVersion` and `kind`, when present, must be the
/// EndpointSlice's).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSlice {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<ObjectMeta>,
    address_type: Option<String>,
    endpoints: Option<Vec<WireEndpoint>>,
    ports: Option<Vec<discovery::EndpointPort>>,
}

impl TryFrom<RawSlice> for WireEndpointSlice {
    type Error = String;

    fn try_from(raw: RawSlice) -> Result<Self, String> {
        for (field, got, want) in [
            (
                "apiVersion",
                &raw.api_version,
                discovery::EndpointSlice::API_VERSION,
            ),
            ("kind", &raw.kind, discovery::EndpointSlice::KIND),
        ] {
            if let Some(got) = got
                && got != want
            {
                return Err(format!("invalid value: {field} {got:?}, expected {want}"));
            }
        }
        let mut metadata = raw.metadata.unwrap_or_default();
        // Written by every controller that touches the object and never read here.
        metadata.managed_fields = None;
        let mut endpoints = raw.endpoints;
        if let Some(e) = endpoints.as_mut() {
            // Decoded arrays grow by doubling; the slice is held until the whole list has been handed over.
            e.shrink_to_fit();
        }
        Ok(WireEndpointSlice {
            metadata,
            address_type: raw.address_type.unwrap_or_default(),
            endpoints,
            ports: raw.ports,
        })
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl kube::Resource for WireEndpointSlice {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        discovery::EndpointSlice::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        discovery::EndpointSlice::GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        discovery::EndpointSlice::VERSION.into()
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        discovery::EndpointSlice::API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        discovery::EndpointSlice::URL_PATH_SEGMENT.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl WireEndpointSlice {
    /// The API object with what was decoded, for [`convert::endpoint_slice`].
    pub fn to_api(&self) -> discovery::EndpointSlice {
        discovery::EndpointSlice {
            metadata: self.metadata.clone(),
            address_type: self.address_type.clone(),
            endpoints: self.endpoints.as_ref().map(|endpoints| {
                endpoints
                    .iter()
                    .map(|e| discovery::Endpoint {
                        addresses: e.addresses.clone(),
                        conditions: e.conditions.clone(),
                        hints: e.hints.clone(),
                        node_name: e.node_name.clone(),
                        zone: e.zone.clone(),
                        ..Default::default()
                    })
                    .collect()
            }),
            ports: self.ports.clone(),
        }
    }

    /// [`convert::endpoint_slice`] of this slice.
    pub fn convert(&self, default_namespace: &str) -> Result<svcproxy_model::EndpointSlice, ConvertError> {
        convert::endpoint_slice(&self.to_api(), default_namespace)
    }
}

/// An API object on the heap of its own, without `managedFields`. A list response is decoded into one
/// array of objects, grown by doubling: 5,000 Services (1 KB each before their strings) took 8.6 MB there;
/// boxed, the array holds pointers and each object takes its own size.
#[derive(Debug, Clone, PartialEq)]
pub struct Boxed<K>(pub Box<K>);

impl<'de, K> Deserialize<'de> for Boxed<K>
where
    K: Deserialize<'de> + kube::Resource,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut object = K::deserialize(d)?;
        object.meta_mut().managed_fields = None;
        Ok(Boxed(Box::new(object)))
    }
}

impl<K: kube::Resource> kube::Resource for Boxed<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &K::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &K::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &K::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &K::DynamicType) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &K::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice_json() -> serde_json::Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "ns", "resourceVersion": "7",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-01-01T00:00:00Z"},
                "managedFields": [{"manager": "m", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:x": {}}}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "n1", "zone": "z1", "hostname": "h", "targetRef": {"kind": "Pod", "name": "p"},
                 "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]},
                 "deprecatedTopology": {"a": "b"}},
                {"addresses": null, "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]}
            ]
        })
    }

    #[test]
    fn converts_like_the_full_api_type() {
        let value = slice_json();
        let full: discovery::EndpointSlice = serde_json::from_value(value.clone()).unwrap();
        let wire: WireEndpointSlice = serde_json::from_value(value).unwrap();
        assert_eq!(wire.metadata.managed_fields, None);
        assert_eq!(
            wire.convert("default").unwrap(),
            convert::endpoint_slice(&full, "default").unwrap()
        );
    }

    #[test]
    fn boxed_objects_decode_as_the_full_type_without_managed_fields() {
        let value = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns", "managedFields": [{"manager": "m"}]},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        let mut full: k8s_openapi::api::core::v1::Service = serde_json::from_value(value.clone()).unwrap();
        let boxed: Boxed<k8s_openapi::api::core::v1::Service> = serde_json::from_value(value).unwrap();
        assert!(full.metadata.managed_fields.take().is_some());
        assert_eq!(*boxed.0, full);
        assert!(
            serde_json::from_value::<Boxed<k8s_openapi::api::core::v1::Service>>(json!({"kind": "Pod"}))
                .is_err()
        );
    }

    #[test]
    fn missing_fields_default_and_foreign_kinds_are_refused_as_the_full_type_does() {
        let minimal = json!({"metadata": {"name": "s"}});
        let full: discovery::EndpointSlice = serde_json::from_value(minimal.clone()).unwrap();
        let wire: WireEndpointSlice = serde_json::from_value(minimal).unwrap();
        assert_eq!(
            wire.convert("default").map_err(|e| e.to_string()),
            convert::endpoint_slice(&full, "default").map_err(|e| e.to_string())
        );
        for bad in [
            json!({"kind": "Service", "metadata": {"name": "s"}}),
            json!({"apiVersion": "v1", "metadata": {"name": "s"}}),
        ] {
            assert!(serde_json::from_value::<discovery::EndpointSlice>(bad.clone()).is_err());
            assert!(serde_json::from_value::<WireEndpointSlice>(bad).is_err());
        }
    }
}
