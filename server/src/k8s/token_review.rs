//! Checking a Kubernetes ServiceAccount token with the TokenReview API, for PSAT node attestation
//! and for Istio's certificate service.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;

use crate::{Error, Result};

/// A token the API server vouched for.
#[derive(Debug, Clone)]
pub struct ReviewedToken {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub service_account: String,
    /// The review's `user.extra` (the bound pod's name and UID for projected tokens).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Reviews `token` for `audience`; refusals say why.
pub async fn review(client: &kube::Client, token: String, audience: &str) -> Result<ReviewedToken> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| Error::Unavailable(format!("TokenReview failed: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Error::Unauthenticated(format!(
            "the Kubernetes API rejected the token: {}",
            status.error.unwrap_or_else(|| "not authenticated".into())
        )));
    }
    if status
        .audiences
        .as_ref()
        .is_some_and(|a| !a.iter().any(|x| x == audience))
    {
        return Err(Error::Unauthenticated(format!(
            "the token is not for audience `{audience}`"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| Error::Unauthenticated(format!("`{username}` is not a ServiceAccount")))?;
    Ok(ReviewedToken {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        extra: user.extra.unwrap_or_default(),
    })
}
