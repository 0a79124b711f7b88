//! Endpoint patterns from raw paths, for doors that see no router: forward auth, and the
//! tower layer outside axum. A path matching a configured template is recorded as that
//! template; otherwise each id-like segment (all digits, a UUID, or a long random token)
//! becomes `{id}`, so raw ids never become endpoints.
//!
//! ```
//! use usage_door::endpoint::EndpointPatterns;
//!
//! let patterns = EndpointPatterns::parse("/v1/users/{id}/orders").unwrap();
//! assert_eq!(patterns.endpoint("/v1/users/ada/orders?page=2"), "/v1/users/{id}/orders");
//! assert_eq!(patterns.endpoint("/v1/items/42"), "/v1/items/{id}");
//! assert_eq!(patterns.endpoint("/v1/items/search"), "/v1/items/search");
//! ```

/// Longest endpoint recorded; a longer path keeps its first segments and ends in `/…`.
pub const MAX_ENDPOINT_LEN: usize = 256;
/// Most templates one list may hold.
pub const MAX_TEMPLATES: usize = 1000;

/// A template that cannot be used, with why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route template `{template}`: {reason}")]
pub struct TemplateError {
    /// The template as given.
    pub template: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

#[derive(Debug, Clone)]
struct Template {
    pattern: String,
    segments: Vec<Segment>,
}

/// Route templates, tried in order, and the id rule for paths none matches.
#[derive(Debug, Clone, Default)]
pub struct EndpointPatterns {
    templates: Vec<Template>,
}

impl EndpointPatterns {
    /// Templates from a comma-separated list such as `/v1/items/{id},/v1/users/{id}/orders`
    /// (spaces around entries ignored; an empty list is no template).
    pub fn parse(list: &str) -> Result<Self, TemplateError> {
        Self::new(list.split(',').map(str::trim).filter(|t| !t.is_empty()))
    }

    /// Templates from a list: each starts with `/`; a segment `{name}` matches any one
    /// segment; others match exactly.
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a str>) -> Result<Self, TemplateError> {
        let mut parsed = Vec::new();
        for template in templates {
            let error = |reason| TemplateError {
                template: template.chars().take(100).collect(),
                reason,
            };
            if parsed.len() == MAX_TEMPLATES {
                return Err(error("more than 1000 templates"));
            }
            if !template.starts_with('/') {
                return Err(error("must start with `/`"));
            }
            if template.len() > MAX_ENDPOINT_LEN {
                return Err(error("longer than 256 characters"));
            }
            if !template.bytes().all(|b| b.is_ascii_graphic()) || template.contains(['?', '#']) {
                return Err(error(
                    "must be visible ASCII without spaces, `?` or `#` (a path, not a URL)",
                ));
            }
            let segments = split(template)
                .map(|segment| match segment.strip_prefix('{') {
                    Some(rest) if rest.ends_with('}') && rest.len() > 1 => Ok(Segment::Param),
                    _ if segment.contains(['{', '}']) => {
                        Err(error("a parameter is a whole segment such as `{id}`"))
                    }
                    _ => Ok(Segment::Literal(segment.to_owned())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            parsed.push(Template {
                pattern: template.to_owned(),
                segments,
            });
        }
        Ok(Self { templates: parsed })
    }

    /// How many templates there are.
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// The endpoint recorded for a request to `path_and_query`: the first matching
    /// template, else the path (without query or fragment) with id-like segments as `{id}`.
    pub fn endpoint(&self, path_and_query: &str) -> String {
        // A full URL (`https://host/path`) counts by its path.
        let path_and_query = match path_and_query.split_once("://") {
            Some((_, rest)) if !path_and_query.starts_with('/') => {
                rest.find('/').map_or("/", |i| &rest[i..])
            }
            _ => path_and_query,
        };
        let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
        let path = if path.starts_with('/') { path } else { "/" };
        for template in &self.templates {
            if matches(&template.segments, path) {
                return template.pattern.clone();
            }
        }
        let mut endpoint = String::with_capacity(path.len().min(MAX_ENDPOINT_LEN));
        for segment in split(path) {
            let segment = if is_id_like(segment) { "{id}" } else { segment };
            if endpoint.len() + 1 + segment.len() > MAX_ENDPOINT_LEN - 4 {
                endpoint.push_str("/…");
                return endpoint;
            }
            endpoint.push('/');
            endpoint.push_str(segment);
        }
        if endpoint.is_empty() || path.ends_with('/') && path.len() > 1 {
            endpoint.push('/');
        }
        endpoint
    }
}

/// The segments of a path after its leading `/` (an empty path has none).
fn split(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed
        .split('/')
        .filter(|s| !trimmed.is_empty() || !s.is_empty())
}

fn matches(template: &[Segment], path: &str) -> bool {
    let mut segments = split(path);
    for expected in template {
        match (expected, segments.next()) {
            (_, None) => return false,
            (Segment::Param, Some(s)) if !s.is_empty() => {}
            (Segment::Literal(lit), Some(s)) if lit == s => {}
            _ => return false,
        }
    }
    segments.next().is_none()
}

/// All digits, a UUID, or a long random token (16+ characters of letters, digits, `-`
/// and `_`, at least one a digit): what an id looks like, not a word.
fn is_id_like(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) {
        return true;
    }
    if is_uuid(bytes) {
        return true;
    }
    bytes.len() >= 16
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        && bytes.iter().any(u8::is_ascii_digit)
}

fn is_uuid(bytes: &[u8]) -> bool {
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_win_in_order_and_match_whole_segments() {
        let patterns =
            EndpointPatterns::parse(" /v1/items/{id} , /v1/users/{user}/orders,/v1/items/new")
                .unwrap();
        assert_eq!(patterns.len(), 3);
        assert_eq!(patterns.endpoint("/v1/items/abc"), "/v1/items/{id}");
        // The first template matches before the literal one.
        assert_eq!(patterns.endpoint("/v1/items/new"), "/v1/items/{id}");
        assert_eq!(
            patterns.endpoint("/v1/users/ada/orders?x=1#f"),
            "/v1/users/{user}/orders"
        );
        assert_eq!(patterns.endpoint("/v1/users/ada"), "/v1/users/ada");
        assert_eq!(
            patterns.endpoint("/v1/items/abc/more"),
            "/v1/items/abc/more"
        );
    }

    #[test]
    fn ids_never_become_endpoints() {
        let none = EndpointPatterns::default();
        assert_eq!(none.endpoint("/v1/items/42"), "/v1/items/{id}");
        assert_eq!(
            none.endpoint("/v1/orders/0190f7a2-5b1c-7c3d-9e4f-1a2b3c4d5e6f/lines/7"),
            "/v1/orders/{id}/lines/{id}"
        );
        assert_eq!(
            none.endpoint("/v1/files/f3a9c2b7e1d04f6a8b5c"),
            "/v1/files/{id}"
        );
        assert_eq!(
            none.endpoint("/v1/authentication-settings"),
            "/v1/authentication-settings"
        );
        assert_eq!(none.endpoint("/v1/v2"), "/v1/v2");
        assert_eq!(none.endpoint("/"), "/");
        assert_eq!(none.endpoint(""), "/");
        assert_eq!(none.endpoint("?q=1"), "/");
        assert_eq!(none.endpoint("/v1/items/"), "/v1/items/");
        assert_eq!(
            none.endpoint("https://api.example.com/v1/items/42?x=1"),
            "/v1/items/{id}"
        );
        assert_eq!(none.endpoint("https://api.example.com"), "/");
        assert_eq!(none.endpoint("/v1/go?to=https://x.example/y"), "/v1/go");
    }

    #[test]
    fn long_paths_are_cut_at_a_segment() {
        let none = EndpointPatterns::default();
        let path = "/segment".repeat(100);
        let endpoint = none.endpoint(&path);
        assert!(endpoint.len() <= MAX_ENDPOINT_LEN, "{}", endpoint.len());
        assert!(endpoint.ends_with("/segment/…"), "{endpoint}");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (list, reason) in [
            ("v1/items", "must start with `/`"),
            ("/v1/items?x=1", "must be visible ASCII"),
            ("/v1/it ems", "must be visible ASCII"),
            ("/v1/item{id}", "a parameter is a whole segment"),
            ("/v1/{}", "a parameter is a whole segment"),
        ] {
            let error = EndpointPatterns::parse(list).unwrap_err();
            assert!(error.to_string().contains(reason), "{list}: {error}");
        }
        assert!(EndpointPatterns::parse("").unwrap().is_empty());
        let many = vec!["/a"; MAX_TEMPLATES + 1].join(",");
        assert!(EndpointPatterns::parse(&many).is_err());
    }
}
