//! The machine-readable description of the HTTP API: an OpenAPI 3.1 document served at
//! `GET /v1/openapi.json`.
//!
//! Every route is registered through `utoipa_axum::routes!` from a handler annotated with
//! `#[utoipa::path]` (see `api::documented_routes`), so the router and the document
//! come from the same annotations: a handler cannot be routed without being described.
//! Wire types get their schemas from `sealpost-proto`'s `openapi` feature.
//!
//! Each handler lists the statuses it can answer itself. Responses that middleware can
//! produce on any route are added here to every operation: `429 rate_limited` (per-address
//! limit), `408 timeout` (the request took longer than the request timeout) and
//! `500 internal` (a server fault; never expected, but any route that touches the database
//! can fail). Every error body is [`ErrorBody`].

use std::sync::OnceLock;

use axum::http::header;
use sealpost_proto::ErrorBody;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema as _};

use crate::error::ApiError;

/// The name of the bearer-token security scheme in the document.
pub const BEARER_AUTH: &str = "bearerAuth";

/// The document's fixed parts: title, tags, shared schemas and the security scheme. The
/// paths come from the handlers, added by [`super::documented_routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sealpost",
        description = "The HTTP API of the Sealpost delivery server. Binary fields are \
            unpadded URL-safe base64. Every error is `{\"error\":{\"code\",\"message\"}}` \
            with a stable `code`. See docs/PROTOCOL.md for the protocol around it."
    ),
    components(schemas(
        ErrorBody,
        sealpost_proto::ErrorCode,
        sealpost_proto::api::ServerEvent,
        sealpost_proto::api::EnvelopeKind,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts", description = "Registration, login and account lookups"),
        (name = "devices", description = "An account's devices"),
        (name = "links", description = "Linking a new device"),
        (name = "keypackages", description = "MLS KeyPackages"),
        (name = "groups", description = "Groups and sequencing of MLS messages"),
        (name = "mailbox", description = "Per-device mailboxes and the wake-up WebSocket"),
        (name = "kt", description = "Key transparency (no login needed)"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
struct ApiDoc;

/// Adds the bearer-token security scheme that authenticated operations name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER_AUTH,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `POST /v1/auth/login`: `Authorization: Bearer TOKEN`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// An error response with the common error body.
fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "ErrorBody",
            ))))
            .build(),
    )
}

/// Adds the responses that middleware produces on every route, where a handler did not
/// describe that status itself.
fn add_common_responses(openapi: &mut utoipa::openapi::OpenApi) {
    let rate_limited = error_response(
        "`rate_limited`: too many requests from this address (or, for authenticated routes, \
         this account); retry after `Retry-After` seconds.",
    )
    .header(
        header::RETRY_AFTER.as_str(),
        HeaderBuilder::new()
            .schema(Some(u64::schema()))
            .description(Some("Seconds to wait before retrying."))
            .build(),
    )
    .build();
    let common = [
        (
            "408",
            error_response("`timeout`: the request (its body included) took too long.").build(),
        ),
        ("429", rate_limited),
        (
            "500",
            error_response("`internal`: a server fault; the cause is in the server's log.").build(),
        ),
    ];
    for item in openapi.paths.paths.values_mut() {
        let operations: [&mut Option<Operation>; 5] = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, response) in &common {
                operation
                    .responses
                    .responses
                    .entry((*status).to_owned())
                    .or_insert_with(|| RefOr::T(response.clone()));
            }
        }
    }
}

/// The document's fixed parts, before any route is added.
pub(super) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The complete OpenAPI document of [`super::router`].
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut openapi) = super::documented_routes().split_for_parts();
    add_common_responses(&mut openapi);
    openapi
}

/// The document as JSON, built once.
fn document_json() -> Result<&'static str, ApiError> {
    static JSON: OnceLock<String> = OnceLock::new();
    if let Some(json) = JSON.get() {
        return Ok(json);
    }
    let json = document().to_json().map_err(|e| ApiError::internal(&e))?;
    Ok(JSON.get_or_init(|| json))
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses(
        (status = 200, description = "This document.", body = Object),
    )
)]
pub async fn openapi_json()
-> Result<([(header::HeaderName, &'static str); 1], &'static str), ApiError> {
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        document_json()?,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use sealpost_proto::limits;
    use serde_json::Value;

    use super::*;
    use crate::testing::TestServer;

    /// The methods a route of this API can have.
    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

    /// `(METHOD, path template)` of every operation in a document.
    fn operations(document: &Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let method = method.to_ascii_uppercase();
                assert!(METHODS.contains(&method.as_str()), "{method} {path}");
                out.insert((method, path.clone()));
            }
        }
        out
    }

    /// A concrete path for a template, with well-formed parameters.
    fn concrete(template: &str) -> String {
        let path = template
            .replace("{username}", "nobody_here")
            .replace("{device_id}", &uuid::Uuid::nil().to_string())
            .replace("{group_id}", &"0".repeat(32))
            .replace("{link_id}", &"0".repeat(16));
        assert!(!path.contains('{'), "unknown parameter in {template}");
        path
    }

    /// Whether an answer comes from the router's fallbacks (no such path, or no such
    /// method on it) rather than from a handler.
    fn fallback_code(status: u16, body: &Value) -> Option<&'static str> {
        let code = body["error"]["code"].as_str();
        match (status, code) {
            (404, Some("not_found"))
                if body["error"]["message"] == crate::api::NO_SUCH_ENDPOINT =>
            {
                Some("not_found")
            }
            (405, Some("method_not_allowed")) => Some("method_not_allowed"),
            _ => None,
        }
    }

    async fn fetch_document(server: &TestServer) -> Value {
        let response = reqwest::get(format!("{}/v1/openapi.json", server.url()))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            "application/json"
        );
        response.json().await.unwrap()
    }

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    match (key.as_str(), item) {
                        ("$ref", Value::String(target)) => out.push(target),
                        _ => refs(item, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| refs(item, out)),
            _ => {}
        }
    }

    #[tokio::test]
    async fn the_served_document_is_openapi_3() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(dir.path()).await;
        let document = fetch_document(&server).await;
        assert!(
            document["openapi"].as_str().unwrap().starts_with("3."),
            "{}",
            document["openapi"]
        );
        // It is what `document()` builds, and it parses as an OpenAPI document.
        assert_eq!(document, serde_json::to_value(super::document()).unwrap());
        let parsed: utoipa::openapi::OpenApi = serde_json::from_value(document.clone()).unwrap();
        assert!(!parsed.paths.paths.is_empty());

        // Every reference resolves, and operation ids are unique.
        let mut targets = Vec::new();
        refs(&document, &mut targets);
        assert!(!targets.is_empty());
        for target in targets {
            let pointer = target.strip_prefix('#').unwrap();
            assert!(document.pointer(pointer).is_some(), "dangling {target}");
        }
        let mut ids = BTreeSet::new();
        for (method, path) in operations(&document) {
            let operation = &document["paths"][&path][method.to_ascii_lowercase()];
            let id = operation["operationId"].as_str().unwrap().to_owned();
            assert!(ids.insert(id.clone()), "duplicate operationId {id}");
            // Middleware answers on every route: the document says so everywhere.
            for status in ["408", "429", "500"] {
                assert!(
                    operation["responses"][status].is_object(),
                    "{method} {path} lacks {status}"
                );
            }
            if operation["security"].is_array() {
                assert!(
                    operation["responses"]["401"].is_object(),
                    "{method} {path} needs a token but lacks 401"
                );
            }
        }
        // The bearer scheme that authenticated operations name exists.
        assert_eq!(
            document["components"]["securitySchemes"][BEARER_AUTH]["scheme"],
            "bearer"
        );

        // Bounds in the schemas are the limits the server enforces.
        let schemas = &document["components"]["schemas"];
        let max_items = |schema: &str, field: &str| {
            schemas[schema]["properties"][field]["maxItems"]
                .as_u64()
                .unwrap() as usize
        };
        assert_eq!(max_items("AckRequest", "ids"), limits::ACK_MAX_IDS);
        assert_eq!(
            max_items("UploadKeyPackagesRequest", "key_packages"),
            limits::KEY_PACKAGES_PER_UPLOAD
        );
        assert_eq!(
            max_items("PostCommitRequest", "added_devices"),
            limits::DEVICES_PER_COMMIT
        );
        assert_eq!(
            max_items("PostCommitRequest", "removed_devices"),
            limits::DEVICES_PER_COMMIT
        );
        assert_eq!(
            schemas["Bytes64"]["pattern"],
            sealpost_proto::bytes::BASE64URL_PATTERN
        );
        // Request bodies refuse unknown fields, as serde does.
        assert_eq!(schemas["RegisterRequest"]["additionalProperties"], false);
        server.stop().await;
    }

    /// The document lists exactly the routes the server serves: every documented
    /// operation reaches a handler, and every other method on a documented path is
    /// refused by the router. (Paths outside the document cannot be enumerated at run
    /// time; [`routes_are_registered_only_from_annotations`] keeps them from existing.)
    #[tokio::test]
    async fn the_document_lists_exactly_the_routes_served() {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(dir.path()).await;
        let document = fetch_document(&server).await;
        let documented = operations(&document);
        // The routes every deployment relies on are there.
        for expected in [
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
            ("GET", "/v1/openapi.json"),
            ("POST", "/v1/accounts"),
            ("GET", "/v1/ws"),
            ("POST", "/v1/groups/{group_id}/commits"),
        ] {
            assert!(
                documented.contains(&(expected.0.to_owned(), expected.1.to_owned())),
                "{expected:?} is not documented"
            );
        }
        let paths: BTreeSet<&String> = documented.iter().map(|(_, path)| path).collect();
        let http = reqwest::Client::new();
        for template in paths {
            for method in METHODS {
                let url = format!("{}{}", server.url(), concrete(template));
                let mut request = http.request(method.parse().unwrap(), &url);
                if matches!(method, "POST" | "PUT" | "PATCH") {
                    request = request
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body("{}");
                }
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let is_documented = documented.contains(&(method.to_owned(), template.clone()));
                let fallback = fallback_code(status, &body);
                if is_documented {
                    assert_eq!(
                        fallback, None,
                        "{method} {template} is documented but not routed: {status} {body}"
                    );
                } else {
                    assert_eq!(
                        fallback,
                        Some("method_not_allowed"),
                        "{method} {template} is served but not documented: {status} {body}"
                    );
                }
            }
        }
        // And a path that is no route gets the fallback.
        let response = http
            .get(format!("{}/v1/no-such-route", server.url()))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(fallback_code(status, &body), Some("not_found"));
        server.stop().await;
    }

    /// The router takes routes only from `routes!`, so each has a `#[utoipa::path]`
    /// annotation and is in the document. Adding one any other way fails here.
    #[test]
    fn routes_are_registered_only_from_annotations() {
        let source = include_str!("mod.rs");
        for forbidden in [
            ".route(",
            ".route_service(",
            ".nest(",
            ".nest_service(",
            ".merge(",
            ".fallback_service(",
        ] {
            assert!(
                !source.contains(forbidden),
                "api/mod.rs calls `{forbidden}`: register routes with `routes!` from a \
                 handler annotated with #[utoipa::path] so that the OpenAPI document lists them"
            );
        }
        assert!(source.contains(".routes(routes!("));
    }
}
