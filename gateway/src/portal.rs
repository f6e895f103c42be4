//! The portal: a static page under `/portal/`, served on the API's port.
//!
//! The page (`gateway/portal/`: HTML, one stylesheet, one script, an icon) is embedded in the
//! binary, so the gateway serves it without a file system, a CDN or the internet. It is a client
//! of the `/v1` admin API and nothing else: it has no route of its own that reads or changes
//! state, and it signs in with a bearer token like `rkictl` does: an organization's (the fleet
//! manager's page) or the key owner's (the provider's page, which uploads devices). See
//! `docs/PORTAL.md`.
//!
//! **Invariant.** Nothing here touches the engine or the store; the router needs no state.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// Where the portal lives.
pub const PREFIX: &str = "/portal/";

/// One embedded file of the portal.
pub struct Asset {
    /// Path under [`PREFIX`]; empty for the page itself.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Every file of the portal. Adding one here is the only way to serve it.
pub static ASSETS: [Asset; 4] = [
    Asset { path: "", content_type: "text/html; charset=utf-8", body: include_str!("../portal/index.html") },
    Asset {
        path: "portal.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../portal/portal.js"),
    },
    Asset { path: "portal.css", content_type: "text/css; charset=utf-8", body: include_str!("../portal/portal.css") },
    Asset { path: "favicon.svg", content_type: "image/svg+xml", body: include_str!("../portal/favicon.svg") },
];

/// The page may load only its own files and talk only to its own origin; no inline script, no
/// framing (clickjacking), no form posted elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The portal's routes. Generic over the state so that it merges into any router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new().route("/portal", get(|| async { Redirect::permanent(PREFIX) }));
    for asset in &ASSETS {
        router = router.route(&format!("{PREFIX}{}", asset.path), get(move || async move { respond(asset) }));
    }
    router
}

/// An asset with the headers every portal response carries.
pub fn respond(asset: &'static Asset) -> Response {
    let headers: [(HeaderName, &'static str); 6] = [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // Small files; always revalidated, so an upgraded gateway serves its own page at once.
        (header::CACHE_CONTROL, "no-cache"),
    ];
    let mut response = (StatusCode::OK, asset.body).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(path: &str) -> &'static Asset {
        ASSETS.iter().find(|a| a.path == path).expect("asset")
    }

    #[test]
    fn every_asset_is_served_with_its_type_and_the_security_headers() {
        for asset in &ASSETS {
            let response = respond(asset);
            assert_eq!(response.status(), StatusCode::OK);
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        }
    }

    #[test]
    fn the_page_loads_nothing_from_outside_the_gateway() {
        for asset in &ASSETS {
            // The SVG namespace is a name, not a fetch.
            let text = asset.body.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "{} names an outside URL", asset.path);
            assert!(!text.contains("src=\"//") && !text.contains("href=\"//"), "{} names an outside host", asset.path);
        }
    }

    #[test]
    fn the_page_references_only_embedded_files_and_no_inline_script() {
        let page = asset("").body;
        for reference in ["portal.js", "portal.css", "favicon.svg"] {
            assert!(page.contains(&format!("\"{reference}\"")), "index.html does not use {reference}");
            assert!(ASSETS.iter().any(|a| a.path == reference));
        }
        // The CSP forbids inline scripts; a `<script>` must have a `src`.
        for tag in page.split("<script").skip(1) {
            assert!(tag.trim_start().starts_with("src="), "inline script in index.html");
        }
        assert!(!page.contains(" onclick=") && !page.contains(" style="), "inline handler or style");
    }

    #[test]
    fn the_token_is_kept_in_the_tab_and_sent_only_as_a_header() {
        let script = asset("portal.js").body;
        assert!(script.contains("sessionStorage"));
        assert!(!script.contains("localStorage"), "a token in localStorage outlives the tab");
        assert!(!script.contains("document.cookie"));
        assert!(!script.contains("innerHTML"), "untrusted text must go in as text, not HTML");
        // The sign-in form posts if the script fails, so the token never lands in a URL.
        assert!(asset("").body.contains("<form id=\"signin-form\" method=\"post\""));
    }
}
