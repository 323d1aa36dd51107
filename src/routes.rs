//! Exposed routes: path normalization, matching (path + method) and the
//! backend path a match is rewritten to.
//!
//! Invariant: the backend only ever receives a path built from a configured
//! `backend_path` template, with each `{param}` replaced by one percent-encoded
//! segment of the normalized device path. `..`, `%2e%2e`, doubled slashes and
//! encoded slashes cannot change which template is used.

use crate::config::RouteConfig;
use http::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use std::borrow::Cow;
use std::sync::Arc;

/// Why a device path was refused before matching.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// Invalid percent-encoding, invalid UTF-8, NUL, or an encoded `/` or `\`.
    Malformed,
    /// `..` climbing above the root.
    Escapes,
}

/// Normalizes a request path: decodes percent-escapes, drops empty and `.`
/// segments, resolves `..`, keeps a trailing slash. Encoded slashes and
/// backslashes, NUL and control characters are refused outright.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::Malformed);
    }
    if is_plain(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    resolve(raw).map(Cow::Owned)
}

/// The general case of [`normalize`], for a path starting with `/`.
fn resolve(raw: &str) -> Result<String, PathError> {
    // Refuse escapes that would change the segment structure once decoded.
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::Malformed)?;
            let hi = (hex[0] as char).to_digit(16).ok_or(PathError::Malformed)?;
            let lo = (hex[1] as char).to_digit(16).ok_or(PathError::Malformed)?;
            let c = (hi * 16 + lo) as u8;
            if c == b'/' || c == b'\\' || c < 0x20 || c == 0x7f {
                return Err(PathError::Malformed);
            }
            i += 3;
        } else {
            if bytes[i] == b'\\' {
                return Err(PathError::Malformed);
            }
            i += 1;
        }
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| PathError::Malformed)?;
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::Escapes);
                }
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !out.is_empty();
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing || path.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// True for a path that normalization would leave as it is: no escapes,
/// backslashes or control bytes, no empty, `.` or `..` segment. Most device
/// requests are like this and need neither decoding nor a copy.
fn is_plain(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes
        .iter()
        .all(|&b| b > 0x20 && b != b'%' && b != b'\\' && b != 0x7f)
        && !bytes.windows(2).any(|w| w == b"//" || w == b"/.")
}

/// Characters escaped when a parameter value is put back into a backend path.
/// `;` too: servlet containers read `..;` as `..` (path parameters).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b';')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

#[derive(Debug)]
enum Piece {
    Literal(String),
    Param(String),
}

/// An exposed route, ready to serve.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    /// Metrics and access-log label: the configured path template.
    pub label: crate::metrics::RouteName,
    /// `Allow` header value.
    pub allow: Vec<Method>,
    /// The route's own rate limit, per API key name.
    pub rate_limit: Option<crate::ratelimit::Limiter<Arc<str>>>,
    template: Vec<Piece>,
    /// The backend path ready made when the template has no parameters.
    fixed: Option<http::uri::PathAndQuery>,
}

impl Route {
    /// The backend path when it is the same for every request (no
    /// parameters): a shared copy, neither built nor parsed per request.
    pub fn fixed_path(&self) -> Option<&http::uri::PathAndQuery> {
        self.fixed.as_ref()
    }

    /// Builds the backend path (without query) for matched parameters.
    pub fn backend_path(&self, params: &matchit::Params<'_, '_>) -> String {
        let mut out = String::with_capacity(self.config.backend_path.len() + 16);
        for piece in &self.template {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Param(name) => {
                    let value = params.get(name).unwrap_or_default();
                    // A catch-all value may span segments; encode each one.
                    for (i, seg) in value.split('/').enumerate() {
                        if i > 0 {
                            out.push('/');
                        }
                        out.extend(utf8_percent_encode(seg, SEGMENT));
                    }
                }
            }
        }
        out
    }
}

fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| c + open)
            .ok_or_else(|| format!("unclosed {{ in {t:?}"))?;
        if open > 0 {
            pieces.push(Piece::Literal(rest[..open].to_owned()));
        }
        let name = rest[open + 1..close].trim_start_matches('*');
        pieces.push(Piece::Param(name.to_owned()));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_owned()));
    }
    Ok(pieces)
}

fn param_names(t: &str) -> Vec<String> {
    parse_template(t)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match p {
            Piece::Param(n) => Some(n),
            Piece::Literal(_) => None,
        })
        .collect()
}

/// The outcome of looking a request up.
pub enum Match<'r, 'p> {
    /// A route and its parameters.
    Found(&'r Arc<Route>, matchit::Params<'r, 'p>),
    /// The path exists but not with this method.
    MethodNotAllowed(&'r Arc<Route>),
    /// No exposed route has this path.
    NotFound,
}

/// All exposed routes. Lookup is a radix-tree walk (matchit): its cost
/// depends on the path's length, not on how many routes there are.
#[derive(Debug)]
pub struct Router {
    tree: matchit::Router<Arc<Route>>,
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Builds the router; every conflict or bad template is reported.
    pub fn new(configs: &[RouteConfig]) -> Result<Router, Vec<String>> {
        Router::numbered(configs, |i| i)
    }

    /// [`Router::new`], naming `configs[i]` as `routes[index(i)]` in problems
    /// (configuration checks build it from the routes that validated).
    pub fn numbered(
        configs: &[RouteConfig],
        index: impl Fn(usize) -> usize,
    ) -> Result<Router, Vec<String>> {
        let mut problems = Vec::new();
        let mut tree = matchit::Router::new();
        let mut routes = Vec::new();
        for (n, cfg) in configs.iter().enumerate() {
            let i = index(n);
            let template = match parse_template(&cfg.backend_path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("routes[{i}].backend_path: {e}"));
                    continue;
                }
            };
            let path_params = param_names(&cfg.path);
            for name in param_names(&cfg.backend_path) {
                if !path_params.contains(&name) {
                    problems.push(format!(
                        "routes[{i}].backend_path: {{{name}}} is not a parameter of {:?}",
                        cfg.path
                    ));
                }
            }
            let fixed = if template.iter().all(|p| matches!(p, Piece::Literal(_))) {
                match http::uri::PathAndQuery::try_from(cfg.backend_path.as_str()) {
                    Ok(p) if p.query().is_none() => Some(p),
                    _ => {
                        problems.push(format!(
                            "routes[{i}].backend_path: {:?} is not a valid URL path",
                            cfg.backend_path
                        ));
                        continue;
                    }
                }
            } else {
                None
            };
            let route = Arc::new(Route {
                label: crate::metrics::RouteName::new(&cfg.path),
                allow: cfg.methods.clone(),
                rate_limit: cfg.rate_limit.map(crate::ratelimit::Limiter::new),
                config: cfg.clone(),
                template,
                fixed,
            });
            if let Err(e) = tree.insert(cfg.path.clone(), Arc::clone(&route)) {
                problems.push(format!("routes[{i}].path: {:?}: {e}", cfg.path));
                continue;
            }
            routes.push(route);
        }
        if problems.is_empty() {
            Ok(Router { tree, routes })
        } else {
            Err(problems)
        }
    }

    /// Looks up a normalized path and a method.
    pub fn lookup<'r, 'p>(&'r self, path: &'p str, method: &Method) -> Match<'r, 'p> {
        match self.tree.at(path) {
            Ok(m) => {
                if m.value.allow.contains(method) {
                    Match::Found(m.value, m.params)
                } else {
                    Match::MethodNotAllowed(m.value)
                }
            }
            Err(_) => Match::NotFound,
        }
    }

    /// Every route, in configuration order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EncryptQuery;

    fn route(path: &str, backend: &str) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            methods: vec![Method::GET],
            backend_path: backend.into(),
            public: false,
            encrypt_query: EncryptQuery::None,
            timeout: None,
            max_body: None,
            stream_request_body: false,
            json_body: false,
            rate_limit: None,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// The shortcut for plain paths answers what the general case would.
        #[test]
        fn plain_paths_need_no_rewrite(raw in "/[a-z./%2eE\\\\_~-]{0,12}") {
            if is_plain(&raw) {
                proptest::prop_assert_eq!(resolve(&raw), Ok(raw.clone()));
            }
            proptest::prop_assert_eq!(normalize(&raw).map(Cow::into_owned), resolve(&raw));
        }
    }

    #[test]
    fn normalization() {
        assert_eq!(normalize("/a//b/./c/").unwrap(), "/a/b/c/");
        assert_eq!(normalize("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(normalize("/a/%2e%2e/c").unwrap(), "/c");
        assert_eq!(normalize("/a/%2E%2E/%2e%2e/c"), Err(PathError::Escapes));
        assert_eq!(normalize("/../etc"), Err(PathError::Escapes));
        assert_eq!(normalize("/a%2fb"), Err(PathError::Malformed));
        assert_eq!(normalize("/a%5Cb"), Err(PathError::Malformed));
        assert_eq!(normalize("/a\\b"), Err(PathError::Malformed));
        assert_eq!(normalize("/a%00"), Err(PathError::Malformed));
        assert_eq!(normalize("/a%zz"), Err(PathError::Malformed));
        assert_eq!(normalize("/a%"), Err(PathError::Malformed));
        assert_eq!(normalize("/%ff"), Err(PathError::Malformed));
        assert_eq!(normalize("/caf%C3%A9").unwrap(), "/café");
        assert_eq!(normalize("/").unwrap(), "/");
        assert_eq!(normalize("//").unwrap(), "/");
    }

    #[test]
    fn fixed_backend_paths_are_made_once() {
        let r = Router::new(&[
            route("/api/data", "/internal/data"),
            route("/api/orders/{id}", "/orders/{id}"),
        ])
        .unwrap();
        let fixed = |path: &str| match r.lookup(path, &Method::GET) {
            Match::Found(route, params) => {
                let made = route.fixed_path().map(|p| p.as_str().to_owned());
                if let Some(made) = &made {
                    assert_eq!(*made, route.backend_path(&params));
                }
                made
            }
            _ => panic!("{path} not found"),
        };
        assert_eq!(fixed("/api/data").as_deref(), Some("/internal/data"));
        assert_eq!(fixed("/api/orders/7"), None);
        // A literal backend path that is no URL path is a configuration error.
        let problems = Router::new(&[route("/api/x", "/caf\u{e9}\u{7f}")]).unwrap_err();
        assert!(
            problems[0].contains("routes[0].backend_path"),
            "{problems:?}"
        );
    }

    #[test]
    fn backend_path_substitution_encodes_params() {
        let r = Router::new(&[route("/api/orders/{id}", "/orders/{id}/detail")]).unwrap();
        let path = normalize("/api/orders/a%20b%3Fx").unwrap();
        match r.lookup(&path, &Method::GET) {
            Match::Found(route, params) => {
                assert_eq!(route.backend_path(&params), "/orders/a%20b%3Fx/detail")
            }
            _ => panic!("no match"),
        }
        assert!(matches!(
            r.lookup("/api/orders/1", &Method::DELETE),
            Match::MethodNotAllowed(_)
        ));
        assert!(matches!(
            r.lookup("/api/orders", &Method::GET),
            Match::NotFound
        ));
    }

    #[test]
    fn traversal_cannot_leave_the_template() {
        let r = Router::new(&[route("/api/public/{file}", "/public/{file}")]).unwrap();
        for attempt in [
            "/api/public/..%2fadmin",
            "/api/public/%2e%2e/%2e%2e/admin",
            "/api/public/../../admin",
            "/api/public/%2e%2e%5cadmin",
        ] {
            match normalize(attempt) {
                Err(_) => {}
                Ok(p) => assert!(
                    !matches!(r.lookup(&p, &Method::GET), Match::Found(..)),
                    "{attempt} matched as {p}"
                ),
            }
        }
    }

    #[test]
    fn conflicts_and_unknown_params_are_reported() {
        let e = Router::new(&[route("/a/{x}", "/b/{y}")]).unwrap_err();
        assert!(e[0].contains("{y}"));
        let e = Router::new(&[route("/a/{x}", "/a"), route("/a/{y}", "/a")]).unwrap_err();
        assert!(e[0].contains("routes[1]"));
    }

    #[test]
    fn many_routes() {
        let configs: Vec<_> = (0..5000)
            .map(|i| route(&format!("/svc{i}/items/{{id}}"), &format!("/s{i}/{{id}}")))
            .collect();
        let r = Router::new(&configs).unwrap();
        match r.lookup("/svc4999/items/7", &Method::GET) {
            Match::Found(route, params) => assert_eq!(route.backend_path(&params), "/s4999/7"),
            _ => panic!("no match"),
        }
    }
}
