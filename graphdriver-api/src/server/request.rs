//! Pure parsing: from a method, path, query string and body bytes to a
//! [`Request`], before anything acts on it.
//!
//! [`route`] is the one flat match from path to [`Endpoint`]; [`parse`] is the
//! one flat match from endpoint to [`Request`]. Neither does I/O, so both are
//! unit-tested with the raw strings dockerd sends.

use std::fmt;

use axum::http::Method;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::types::{ApplyDiffQuery, CreateRequest, IdRequest, InitRequest};

/// One of the sixteen calls of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/Plugin.Activate`
    Activate,
    /// `/GraphDriver.Init`
    Init,
    /// `/GraphDriver.Create`
    Create,
    /// `/GraphDriver.CreateReadWrite`
    CreateReadWrite,
    /// `/GraphDriver.Remove`
    Remove,
    /// `/GraphDriver.Get`
    Get,
    /// `/GraphDriver.Put`
    Put,
    /// `/GraphDriver.Exists`
    Exists,
    /// `/GraphDriver.Status`
    Status,
    /// `/GraphDriver.GetMetadata`
    GetMetadata,
    /// `/GraphDriver.Cleanup`
    Cleanup,
    /// `/GraphDriver.Diff`: JSON request, streamed tar reply.
    Diff,
    /// `/GraphDriver.Changes`
    Changes,
    /// `/GraphDriver.ApplyDiff?id=..&parent=..`: streamed tar request.
    ApplyDiff,
    /// `/GraphDriver.DiffSize`
    DiffSize,
    /// `/GraphDriver.Capabilities`
    Capabilities,
}

impl Endpoint {
    /// Every endpoint, in the order of the protocol reference.
    pub const ALL: [Endpoint; 16] = [
        Endpoint::Activate,
        Endpoint::Init,
        Endpoint::Create,
        Endpoint::CreateReadWrite,
        Endpoint::Remove,
        Endpoint::Get,
        Endpoint::Put,
        Endpoint::Exists,
        Endpoint::Status,
        Endpoint::GetMetadata,
        Endpoint::Cleanup,
        Endpoint::Diff,
        Endpoint::Changes,
        Endpoint::ApplyDiff,
        Endpoint::DiffSize,
        Endpoint::Capabilities,
    ];

    /// The endpoint served at `path` (without the query string).
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/Plugin.Activate" => Some(Endpoint::Activate),
            "/GraphDriver.Init" => Some(Endpoint::Init),
            "/GraphDriver.Create" => Some(Endpoint::Create),
            "/GraphDriver.CreateReadWrite" => Some(Endpoint::CreateReadWrite),
            "/GraphDriver.Remove" => Some(Endpoint::Remove),
            "/GraphDriver.Get" => Some(Endpoint::Get),
            "/GraphDriver.Put" => Some(Endpoint::Put),
            "/GraphDriver.Exists" => Some(Endpoint::Exists),
            "/GraphDriver.Status" => Some(Endpoint::Status),
            "/GraphDriver.GetMetadata" => Some(Endpoint::GetMetadata),
            "/GraphDriver.Cleanup" => Some(Endpoint::Cleanup),
            "/GraphDriver.Diff" => Some(Endpoint::Diff),
            "/GraphDriver.Changes" => Some(Endpoint::Changes),
            "/GraphDriver.ApplyDiff" => Some(Endpoint::ApplyDiff),
            "/GraphDriver.DiffSize" => Some(Endpoint::DiffSize),
            "/GraphDriver.Capabilities" => Some(Endpoint::Capabilities),
            _ => None,
        }
    }

    /// The method name as dockerd names it in errors, e.g. `GraphDriver.Create`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Activate => "Plugin.Activate",
            Endpoint::Init => "GraphDriver.Init",
            Endpoint::Create => "GraphDriver.Create",
            Endpoint::CreateReadWrite => "GraphDriver.CreateReadWrite",
            Endpoint::Remove => "GraphDriver.Remove",
            Endpoint::Get => "GraphDriver.Get",
            Endpoint::Put => "GraphDriver.Put",
            Endpoint::Exists => "GraphDriver.Exists",
            Endpoint::Status => "GraphDriver.Status",
            Endpoint::GetMetadata => "GraphDriver.GetMetadata",
            Endpoint::Cleanup => "GraphDriver.Cleanup",
            Endpoint::Diff => "GraphDriver.Diff",
            Endpoint::Changes => "GraphDriver.Changes",
            Endpoint::ApplyDiff => "GraphDriver.ApplyDiff",
            Endpoint::DiffSize => "GraphDriver.DiffSize",
            Endpoint::Capabilities => "GraphDriver.Capabilities",
        }
    }

    /// Whether the request body is a stream handed to the driver (only
    /// `ApplyDiff`) rather than a bounded JSON document.
    pub fn streams_request_body(self) -> bool {
        matches!(self, Endpoint::ApplyDiff)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request, parsed and ready for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Handshake; answered by the server itself.
    Activate,
    /// `GraphDriver.Init`.
    Init(InitRequest),
    /// `GraphDriver.Create`.
    Create(CreateRequest),
    /// `GraphDriver.CreateReadWrite`.
    CreateReadWrite(CreateRequest),
    /// `GraphDriver.Remove`.
    Remove {
        /// Layer id.
        id: String,
    },
    /// `GraphDriver.Get`.
    Get {
        /// Layer id.
        id: String,
        /// SELinux mount label, empty when SELinux is off.
        mount_label: String,
    },
    /// `GraphDriver.Put`.
    Put {
        /// Layer id.
        id: String,
    },
    /// `GraphDriver.Exists`.
    Exists {
        /// Layer id.
        id: String,
    },
    /// `GraphDriver.Status`.
    Status,
    /// `GraphDriver.GetMetadata`.
    GetMetadata {
        /// Layer id.
        id: String,
    },
    /// `GraphDriver.Cleanup`.
    Cleanup,
    /// `GraphDriver.Diff`; the reply is a tar stream.
    Diff {
        /// Layer id.
        id: String,
        /// Parent layer id; empty for the whole layer.
        parent: String,
    },
    /// `GraphDriver.Changes`.
    Changes {
        /// Layer id.
        id: String,
        /// Parent layer id.
        parent: String,
    },
    /// `GraphDriver.ApplyDiff`; the tar is the request body, streamed.
    ApplyDiff {
        /// Layer id, from the query string.
        id: String,
        /// Parent layer id, from the query string; empty for a base layer.
        parent: String,
    },
    /// `GraphDriver.DiffSize`.
    DiffSize {
        /// Layer id.
        id: String,
        /// Parent layer id.
        parent: String,
    },
    /// `GraphDriver.Capabilities`.
    Capabilities,
}

impl Request {
    /// The endpoint this request came in on.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Request::Activate => Endpoint::Activate,
            Request::Init(_) => Endpoint::Init,
            Request::Create(_) => Endpoint::Create,
            Request::CreateReadWrite(_) => Endpoint::CreateReadWrite,
            Request::Remove { .. } => Endpoint::Remove,
            Request::Get { .. } => Endpoint::Get,
            Request::Put { .. } => Endpoint::Put,
            Request::Exists { .. } => Endpoint::Exists,
            Request::Status => Endpoint::Status,
            Request::GetMetadata { .. } => Endpoint::GetMetadata,
            Request::Cleanup => Endpoint::Cleanup,
            Request::Diff { .. } => Endpoint::Diff,
            Request::Changes { .. } => Endpoint::Changes,
            Request::ApplyDiff { .. } => Endpoint::ApplyDiff,
            Request::DiffSize { .. } => Endpoint::DiffSize,
            Request::Capabilities => Endpoint::Capabilities,
        }
    }

    /// The layer id the request names, if any (for logs).
    pub fn id(&self) -> Option<&str> {
        match self {
            Request::Create(req) | Request::CreateReadWrite(req) => Some(&req.id),
            Request::Remove { id }
            | Request::Get { id, .. }
            | Request::Put { id }
            | Request::Exists { id }
            | Request::GetMetadata { id }
            | Request::Diff { id, .. }
            | Request::Changes { id, .. }
            | Request::ApplyDiff { id, .. }
            | Request::DiffSize { id, .. } => Some(id),
            Request::Activate
            | Request::Init(_)
            | Request::Status
            | Request::Cleanup
            | Request::Capabilities => None,
        }
    }

    /// The parent layer id the request names, if any (for logs).
    pub fn parent(&self) -> Option<&str> {
        match self {
            Request::Create(req) | Request::CreateReadWrite(req) => Some(&req.parent),
            Request::Diff { parent, .. }
            | Request::Changes { parent, .. }
            | Request::ApplyDiff { parent, .. }
            | Request::DiffSize { parent, .. } => Some(parent),
            Request::Activate
            | Request::Init(_)
            | Request::Remove { .. }
            | Request::Get { .. }
            | Request::Put { .. }
            | Request::Exists { .. }
            | Request::Status
            | Request::GetMetadata { .. }
            | Request::Cleanup
            | Request::Capabilities => None,
        }
    }
}

/// Why a method and path name no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The path is not one of the protocol's (answered 404).
    #[error("no such endpoint: {path}")]
    NotFound {
        /// The request path, without the query string.
        path: String,
    },
    /// The path is known but the method is not `POST` (answered 405).
    #[error("{endpoint} accepts only POST, not {method}")]
    MethodNotAllowed {
        /// The endpoint at that path.
        endpoint: Endpoint,
        /// The method used.
        method: String,
    },
}

/// Why a request's body or query string was refused (answered 400).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The body is not valid JSON, or a field has the wrong type.
    #[error("invalid {endpoint} request body: {source}")]
    Json {
        /// The endpoint.
        endpoint: Endpoint,
        /// serde_json's message, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The body is JSON, but not an object (nor `null`).
    #[error("invalid {endpoint} request body: expected a JSON object, found {found}")]
    NotAnObject {
        /// The endpoint.
        endpoint: Endpoint,
        /// What the body starts with.
        found: &'static str,
    },
    /// The `ApplyDiff` query string is malformed.
    #[error("invalid {endpoint} query string: {source}")]
    Query {
        /// The endpoint.
        endpoint: Endpoint,
        /// What is wrong with it.
        #[source]
        source: QueryError,
    },
}

/// What is wrong with an `ApplyDiff` query string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A `%` not followed by two hex digits.
    #[error("parameter {param:?} has a malformed percent escape")]
    BadEscape {
        /// The parameter name, as sent.
        param: String,
    },
    /// The decoded value is not UTF-8.
    #[error("parameter {param:?} is not UTF-8 once decoded")]
    NotUtf8 {
        /// The parameter name, as sent.
        param: String,
    },
    /// `id` or `parent` given twice.
    #[error("parameter {param:?} is given more than once")]
    Duplicate {
        /// The parameter name.
        param: &'static str,
    },
}

/// The one flat match from method and path to an endpoint.
///
/// An unknown path is [`RouteError::NotFound`] whatever the method; a known
/// path with any method but `POST` is [`RouteError::MethodNotAllowed`].
pub fn route(method: &Method, path: &str) -> Result<Endpoint, RouteError> {
    let endpoint = Endpoint::from_path(path).ok_or_else(|| RouteError::NotFound {
        path: path.to_owned(),
    })?;
    if method == Method::POST {
        Ok(endpoint)
    } else {
        Err(RouteError::MethodNotAllowed {
            endpoint,
            method: method.as_str().to_owned(),
        })
    }
}

/// The one flat match from endpoint to [`Request`].
///
/// `body` is the whole JSON body; it is ignored for `Plugin.Activate` (sent
/// empty) and for `ApplyDiff`, whose body is the tar stream and whose
/// arguments come from `query`. An empty (or all-whitespace) body and a
/// `null` body both mean `{}`, as with Go's decoder; missing keys and `null`
/// values take their defaults; unknown keys are ignored.
pub fn parse(endpoint: Endpoint, query: Option<&str>, body: &[u8]) -> Result<Request, ParseError> {
    match endpoint {
        Endpoint::Activate => Ok(Request::Activate),
        Endpoint::Init => json::<InitRequest>(endpoint, body).map(Request::Init),
        Endpoint::Create => json::<CreateRequest>(endpoint, body).map(Request::Create),
        Endpoint::CreateReadWrite => {
            json::<CreateRequest>(endpoint, body).map(Request::CreateReadWrite)
        }
        Endpoint::Remove => json::<IdRequest>(endpoint, body).map(|r| Request::Remove { id: r.id }),
        Endpoint::Get => json::<IdRequest>(endpoint, body).map(|r| Request::Get {
            id: r.id,
            mount_label: r.mount_label,
        }),
        Endpoint::Put => json::<IdRequest>(endpoint, body).map(|r| Request::Put { id: r.id }),
        Endpoint::Exists => json::<IdRequest>(endpoint, body).map(|r| Request::Exists { id: r.id }),
        Endpoint::Status => json::<NoArgs>(endpoint, body).map(|NoArgs {}| Request::Status),
        Endpoint::GetMetadata => {
            json::<IdRequest>(endpoint, body).map(|r| Request::GetMetadata { id: r.id })
        }
        Endpoint::Cleanup => json::<NoArgs>(endpoint, body).map(|NoArgs {}| Request::Cleanup),
        Endpoint::Diff => json::<IdRequest>(endpoint, body).map(|r| Request::Diff {
            id: r.id,
            parent: r.parent,
        }),
        Endpoint::Changes => json::<IdRequest>(endpoint, body).map(|r| Request::Changes {
            id: r.id,
            parent: r.parent,
        }),
        Endpoint::ApplyDiff => parse_apply_diff_query(query)
            .map(|q| Request::ApplyDiff {
                id: q.id,
                parent: q.parent,
            })
            .map_err(|source| ParseError::Query { endpoint, source }),
        Endpoint::DiffSize => json::<IdRequest>(endpoint, body).map(|r| Request::DiffSize {
            id: r.id,
            parent: r.parent,
        }),
        Endpoint::Capabilities => {
            json::<NoArgs>(endpoint, body).map(|NoArgs {}| Request::Capabilities)
        }
    }
}

/// Parses `id=<id>&parent=<parent>` (either may be missing or empty).
///
/// dockerd does not escape the values (they are hex ids), but `%XX` escapes
/// and `+` are decoded as a form-encoded query would be. Other parameters are
/// ignored.
pub fn parse_apply_diff_query(query: Option<&str>) -> Result<ApplyDiffQuery, QueryError> {
    let mut id = None;
    let mut parent = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_component(raw_key, raw_key)?;
        let slot = match key.as_str() {
            "id" => (&mut id, "id"),
            "parent" => (&mut parent, "parent"),
            _ => continue,
        };
        if slot.0.is_some() {
            return Err(QueryError::Duplicate { param: slot.1 });
        }
        *slot.0 = Some(decode_component(raw_value, raw_key)?);
    }
    Ok(ApplyDiffQuery {
        id: id.unwrap_or_default(),
        parent: parent.unwrap_or_default(),
    })
}

/// Request bodies that carry no arguments (`{}`); any keys are ignored.
#[derive(Debug, Default, Deserialize)]
struct NoArgs {}

fn json<T: DeserializeOwned + Default>(endpoint: Endpoint, body: &[u8]) -> Result<T, ParseError> {
    let trimmed = body.trim_ascii();
    match trimmed.first() {
        None => return Ok(T::default()),
        Some(b'{') => {}
        Some(b'n') if trimmed == b"null" => return Ok(T::default()),
        Some(&first) => {
            // Find out whether it is JSON at all, for a precise message.
            serde_json::from_slice::<serde::de::IgnoredAny>(trimmed)
                .map_err(|source| ParseError::Json { endpoint, source })?;
            return Err(ParseError::NotAnObject {
                endpoint,
                found: json_kind(first),
            });
        }
    }
    serde_json::from_slice(body).map_err(|source| ParseError::Json { endpoint, source })
}

fn json_kind(first: u8) -> &'static str {
    match first {
        b'[' => "an array",
        b'"' => "a string",
        b't' | b'f' => "a boolean",
        b'-' | b'0'..=b'9' => "a number",
        _ => "something else",
    }
}

fn decode_component(raw: &str, param: &str) -> Result<String, QueryError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|c| hex_value(*c));
                let lo = bytes.get(i + 2).and_then(|c| hex_value(*c));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => {
                        return Err(QueryError::BadEscape {
                            param: param.to_owned(),
                        });
                    }
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8 {
        param: param.to_owned(),
    })
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::types::IdMap;

    const L1: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const M: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn ok(endpoint: Endpoint, body: &str) -> Request {
        match parse(endpoint, None, body.as_bytes()) {
            Ok(request) => request,
            Err(err) => panic!("{endpoint} {body:?}: {err}"),
        }
    }

    fn err(endpoint: Endpoint, body: &str) -> String {
        match parse(endpoint, None, body.as_bytes()) {
            Ok(request) => panic!("{endpoint} {body:?} parsed as {request:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn routes_every_endpoint_by_path() {
        for endpoint in Endpoint::ALL {
            let path = format!("/{}", endpoint.name());
            assert_eq!(route(&Method::POST, &path), Ok(endpoint), "{path}");
        }
    }

    #[test]
    fn route_errors() {
        let cases: &[(Method, &str, RouteError)] = &[
            (
                Method::POST,
                "/GraphDriver.Nope",
                RouteError::NotFound {
                    path: "/GraphDriver.Nope".into(),
                },
            ),
            (Method::GET, "/", RouteError::NotFound { path: "/".into() }),
            (
                Method::POST,
                "/graphdriver.create",
                RouteError::NotFound {
                    path: "/graphdriver.create".into(),
                },
            ),
            (
                Method::GET,
                "/GraphDriver.Create",
                RouteError::MethodNotAllowed {
                    endpoint: Endpoint::Create,
                    method: "GET".into(),
                },
            ),
            (
                Method::PUT,
                "/Plugin.Activate",
                RouteError::MethodNotAllowed {
                    endpoint: Endpoint::Activate,
                    method: "PUT".into(),
                },
            ),
        ];
        for (method, path, want) in cases {
            assert_eq!(route(method, path).as_ref(), Err(want), "{method} {path}");
        }
    }

    #[test]
    fn init_bodies_as_dockerd_sends_them() {
        let cases: &[(&str, InitRequest)] = &[
            (
                r#"{"Home":"/var/lib/docker/rbd","Opts":null,"UIDMaps":null,"GIDMaps":null}
"#,
                InitRequest {
                    home: "/var/lib/docker/rbd".into(),
                    ..InitRequest::default()
                },
            ),
            (
                r#"{"Home":"/d/rbdprobe","Opts":["rbd.pool=docker","rbd.size=10G"],"UIDMaps":null,"GIDMaps":null}"#,
                InitRequest {
                    home: "/d/rbdprobe".into(),
                    opts: vec!["rbd.pool=docker".into(), "rbd.size=10G".into()],
                    ..InitRequest::default()
                },
            ),
            (
                r#"{"Home":"/d/231072.231072/rbd","Opts":null,"UIDMaps":[{"container_id":0,"host_id":231072,"size":65536}],"GIDMaps":[{"container_id":0,"host_id":231072,"size":65536}]}"#,
                InitRequest {
                    home: "/d/231072.231072/rbd".into(),
                    opts: vec![],
                    uid_maps: vec![IdMap {
                        container_id: 0,
                        host_id: 231072,
                        size: 65536,
                    }],
                    gid_maps: vec![IdMap {
                        container_id: 0,
                        host_id: 231072,
                        size: 65536,
                    }],
                },
            ),
            ("{}", InitRequest::default()),
            ("", InitRequest::default()),
            ("null", InitRequest::default()),
            (
                r#"{"Home":"/h","Unknown":{"nested":[1,2]}}"#,
                InitRequest {
                    home: "/h".into(),
                    ..InitRequest::default()
                },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                ok(Endpoint::Init, body),
                Request::Init(want.clone()),
                "{body}"
            );
        }
    }

    #[test]
    fn create_bodies_as_dockerd_sends_them() {
        let size = BTreeMap::from([("size".to_owned(), "20G".to_owned())]);
        let cases: &[(Endpoint, String, CreateRequest)] = &[
            (
                Endpoint::Create,
                format!("{{\"ID\":\"{L1}\"}}\n"),
                CreateRequest {
                    id: L1.into(),
                    ..CreateRequest::default()
                },
            ),
            (
                Endpoint::Create,
                format!("{{\"ID\":\"{M}\",\"Parent\":\"{L1}\"}}\n"),
                CreateRequest {
                    id: M.into(),
                    parent: L1.into(),
                    ..CreateRequest::default()
                },
            ),
            (
                Endpoint::CreateReadWrite,
                format!(
                    "{{\"ID\":\"{M}-init\",\"Parent\":\"{L1}\",\"MountLabel\":\"system_u:object_r:container_file_t:s0:c1,c2\",\"StorageOpt\":{{\"size\":\"20G\"}}}}\n"
                ),
                CreateRequest {
                    id: format!("{M}-init"),
                    parent: L1.into(),
                    mount_label: "system_u:object_r:container_file_t:s0:c1,c2".into(),
                    storage_opt: size.clone(),
                },
            ),
            (
                Endpoint::CreateReadWrite,
                format!("{{\"ID\":\"{M}\",\"Parent\":\"{M}-init\",\"StorageOpt\":null}}"),
                CreateRequest {
                    id: M.into(),
                    parent: format!("{M}-init"),
                    ..CreateRequest::default()
                },
            ),
        ];
        for (endpoint, body, want) in cases {
            let want = match endpoint {
                Endpoint::Create => Request::Create(want.clone()),
                _ => Request::CreateReadWrite(want.clone()),
            };
            assert_eq!(ok(*endpoint, body), want, "{body}");
        }
    }

    #[test]
    fn id_bodies_map_to_their_requests() {
        let id = format!("{{\"ID\":\"{M}\"}}\n");
        let id_label = format!("{{\"ID\":\"{M}\",\"MountLabel\":\"lbl\"}}\n");
        let id_parent = format!("{{\"ID\":\"{M}\",\"Parent\":\"{M}-init\"}}\n");
        let m = || M.to_owned();
        let init = || format!("{M}-init");
        let cases: Vec<(Endpoint, &str, Request)> = vec![
            (Endpoint::Remove, &id, Request::Remove { id: m() }),
            (
                Endpoint::Get,
                &id,
                Request::Get {
                    id: m(),
                    mount_label: String::new(),
                },
            ),
            (
                Endpoint::Get,
                &id_label,
                Request::Get {
                    id: m(),
                    mount_label: "lbl".into(),
                },
            ),
            (Endpoint::Put, &id, Request::Put { id: m() }),
            (Endpoint::Exists, &id, Request::Exists { id: m() }),
            (Endpoint::GetMetadata, &id, Request::GetMetadata { id: m() }),
            (
                Endpoint::Diff,
                &id_parent,
                Request::Diff {
                    id: m(),
                    parent: init(),
                },
            ),
            (
                Endpoint::Diff,
                &id,
                Request::Diff {
                    id: m(),
                    parent: String::new(),
                },
            ),
            (
                Endpoint::Changes,
                &id_parent,
                Request::Changes {
                    id: m(),
                    parent: init(),
                },
            ),
            (
                Endpoint::DiffSize,
                &id_parent,
                Request::DiffSize {
                    id: m(),
                    parent: init(),
                },
            ),
            (Endpoint::Status, "{}\n", Request::Status),
            (Endpoint::Cleanup, "{}\n", Request::Cleanup),
            (Endpoint::Capabilities, "{}\n", Request::Capabilities),
            (Endpoint::Activate, "", Request::Activate),
            // Activate ignores whatever body it gets.
            (Endpoint::Activate, "not json", Request::Activate),
            (
                Endpoint::Remove,
                "{}",
                Request::Remove { id: String::new() },
            ),
            (
                Endpoint::Remove,
                "null",
                Request::Remove { id: String::new() },
            ),
            (
                Endpoint::Remove,
                " \n\t ",
                Request::Remove { id: String::new() },
            ),
            (
                Endpoint::Remove,
                r#"{"ID":null}"#,
                Request::Remove { id: String::new() },
            ),
        ];
        for (endpoint, body, want) in cases {
            let got = ok(endpoint, body);
            assert_eq!(got, want, "{endpoint} {body:?}");
            assert_eq!(got.endpoint(), endpoint);
        }
    }

    #[test]
    fn bad_bodies_name_the_endpoint_and_the_problem() {
        let cases: &[(Endpoint, &str, &str)] = &[
            (Endpoint::Create, r#"{"ID":5}"#, "invalid type: integer `5`"),
            (Endpoint::Create, r#"{"ID":"a""#, "EOF while parsing"),
            (Endpoint::Create, r#"{"ID":"a"} x"#, "trailing characters"),
            (
                Endpoint::Create,
                r#"{"StorageOpt":{"size":20}}"#,
                "invalid type: integer `20`, expected a string",
            ),
            (
                Endpoint::Create,
                r#"{"StorageOpt":["size"]}"#,
                "expected a map",
            ),
            (
                Endpoint::Init,
                r#"{"Opts":"rbd.pool=x"}"#,
                "expected a sequence",
            ),
            (
                Endpoint::Init,
                r#"{"UIDMaps":[{"ContainerID":0,"HostID":1,"Size":2}]}"#,
                "missing field `container_id`",
            ),
            (
                Endpoint::Get,
                "[]",
                "expected a JSON object, found an array",
            ),
            (
                Endpoint::Get,
                r#""ID""#,
                "expected a JSON object, found a string",
            ),
            (
                Endpoint::Get,
                "17",
                "expected a JSON object, found a number",
            ),
            (
                Endpoint::Get,
                "true",
                "expected a JSON object, found a boolean",
            ),
            (Endpoint::Get, "nul", "EOF while parsing a value"),
            (Endpoint::Get, "nil", "expected ident"),
            (Endpoint::Status, "{", "EOF while parsing an object"),
            (Endpoint::Status, "[1]", "found an array"),
            (Endpoint::Diff, "\u{1}", "expected value"),
        ];
        for (endpoint, body, want) in cases {
            let message = err(*endpoint, body);
            assert!(
                message.starts_with(&format!("invalid {endpoint} request body: ")),
                "{message}"
            );
            assert!(
                message.contains(want),
                "{body:?}: {message:?} lacks {want:?}"
            );
        }
    }

    #[test]
    fn apply_diff_query() {
        type Want = Result<(&'static str, &'static str), QueryError>;
        let cases: &[(Option<&str>, Want)] = &[
            (Some("id=abc&parent=def"), Ok(("abc", "def"))),
            (Some("id=abc&parent="), Ok(("abc", ""))),
            (Some("parent=def&id=abc"), Ok(("abc", "def"))),
            (Some("id=abc"), Ok(("abc", ""))),
            (Some("id=abc&parent"), Ok(("abc", ""))),
            (None, Ok(("", ""))),
            (Some(""), Ok(("", ""))),
            (Some("&&id=a&&"), Ok(("a", ""))),
            (Some("id=a%2Db+c&other=x&x"), Ok(("a-b c", ""))),
            (Some("%69d=abc"), Ok(("abc", ""))),
            (
                Some("id=a%zz"),
                Err(QueryError::BadEscape { param: "id".into() }),
            ),
            (
                Some("id=a%2"),
                Err(QueryError::BadEscape { param: "id".into() }),
            ),
            (
                Some("parent=%ff"),
                Err(QueryError::NotUtf8 {
                    param: "parent".into(),
                }),
            ),
            (
                Some("id=a&id=b"),
                Err(QueryError::Duplicate { param: "id" }),
            ),
        ];
        for (query, want) in cases {
            let got = parse_apply_diff_query(*query);
            match (got, want) {
                (Ok(got), Ok((id, parent))) => {
                    assert_eq!(
                        (got.id.as_str(), got.parent.as_str()),
                        (*id, *parent),
                        "{query:?}"
                    )
                }
                (Err(got), Err(want)) => assert_eq!(&got, want, "{query:?}"),
                (got, want) => panic!("{query:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn apply_diff_ignores_the_body_and_reports_the_query() {
        let request = parse(Endpoint::ApplyDiff, Some("id=l1&parent="), b"\x00tar bytes");
        assert_eq!(
            request.ok(),
            Some(Request::ApplyDiff {
                id: "l1".into(),
                parent: String::new()
            })
        );
        let message = match parse(Endpoint::ApplyDiff, Some("id=%"), b"") {
            Err(err) => err.to_string(),
            Ok(request) => panic!("parsed {request:?}"),
        };
        assert_eq!(
            message,
            "invalid GraphDriver.ApplyDiff query string: parameter \"id\" has a malformed percent escape"
        );
    }

    #[test]
    fn ids_and_parents_for_logs() {
        let request = ok(
            Endpoint::Create,
            &format!("{{\"ID\":\"{M}\",\"Parent\":\"{L1}\"}}"),
        );
        assert_eq!(request.id(), Some(M));
        assert_eq!(request.parent(), Some(L1));
        assert_eq!(Request::Status.id(), None);
        assert_eq!(Request::Put { id: "x".into() }.parent(), None);
    }
}
