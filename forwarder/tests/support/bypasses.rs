//! The requests that once got past the forwarder's raw-prefix HTTP rules (issue 10, attack 5),
//! against the rules `* * /admin` deny, `* DELETE /api` deny, `* GET /api` allow. One list, so
//! the unit test of the decision and the end-to-end test through curl try the same attacks; it
//! is included by path from both.

/// (method, request target as sent); every one must be refused (400 or 403).
pub(crate) const BYPASSES: [(&str, &str); 18] = [
    ("GET", "/admin"),
    ("GET", "/%61dmin"),
    ("GET", "//admin"),
    ("GET", "/./admin"),
    ("GET", "/api/../admin"),
    ("GET", "/api/%2e%2e/admin"),
    ("GET", "/api/..%2Fadmin"),
    ("GET", "/api%2F..%2Fadmin"),
    ("GET", "/api/..%5cadmin"),
    ("GET", "/api/..\\admin"),
    ("GET", "/api/..;/admin"),
    ("DELETE", "/api/x"),
    ("delete", "/api/x"),
    ("Delete", "/api/x"),
    ("DELETE", "//api/x"),
    ("DELETE", "/%61pi/x"),
    ("DELETE", "/api/./x"),
    ("GET", "/api-internal"),
];
