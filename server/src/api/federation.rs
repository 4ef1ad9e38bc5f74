//! The admin API's federation half: foreign bundles set by hand and federation relationships.
//! [`super::admin::AdminService`] delegates here.

use sigil_core::bundle::TrustBundle;
use sigil_core::id::{TrustDomain, parse_trust_domain};
use sigil_proto::admin::FederationRelationship as RelationshipMessage;
use sigil_proto::common;

use super::ServerState;
use crate::datastore::{DataStore, EndpointProfile, FederationRelationship};
use crate::federation::{RelationshipInput, check_foreign_bundle};
use crate::{Error, Result};

/// A foreign trust domain named in a request; the own one is refused with `what` explained.
fn foreign(state: &ServerState<impl DataStore>, name: &str, what: &str) -> Result<TrustDomain> {
    let td = parse_trust_domain("trust_domain", name)?;
    if &td == state.ca.trust_domain() {
        return Err(Error::Invalid(sigil_core::Error::field(
            "trust_domain",
            format!("{td} is this server's own trust domain: {what}"),
        )));
    }
    Ok(td)
}

/// Parses and checks a foreign bundle document for `td` against what is stored.
async fn checked_bundle<D: DataStore>(
    state: &ServerState<D>,
    td: &TrustDomain,
    document: &str,
) -> Result<TrustBundle> {
    let bundle = TrustBundle::from_spiffe_json(td.clone(), document)?;
    let stored = state.datastore.get_bundle(td).await?;
    check_foreign_bundle(td, &bundle, stored.as_ref())
        .map_err(|reason| Error::Invalid(sigil_core::Error::field("spiffe_bundle_json", reason)))?;
    Ok(bundle)
}

/// `bundle set`: stores a foreign trust domain's bundle.
pub(super) async fn set_bundle<D: DataStore>(
    state: &ServerState<D>,
    trust_domain: &str,
    document: &str,
) -> Result<TrustBundle> {
    let td = foreign(
        state,
        trust_domain,
        "its bundle comes from its CA and cannot be set",
    )?;
    let bundle = checked_bundle(state, &td, document).await?;
    state.datastore.put_bundle(&bundle).await?;
    state.catch_up().await?;
    Ok(bundle)
}

/// `bundle delete`: removes a foreign bundle no relationship fetches.
pub(super) async fn delete_bundle<D: DataStore>(
    state: &ServerState<D>,
    trust_domain: &str,
) -> Result<TrustBundle> {
    let td = foreign(state, trust_domain, "its bundle cannot be deleted")?;
    if state.datastore.get_federation(&td).await?.is_some() {
        return Err(Error::AlreadyExists(format!(
            "a federation relationship with {td} fetches this bundle; delete the relationship first (`sigil-server federation delete --trust-domain {td}`)"
        )));
    }
    let bundle = state
        .datastore
        .get_bundle(&td)
        .await?
        .ok_or_else(|| Error::NotFound(format!("the bundle of {td}")))?;
    state.datastore.delete_bundle(&td).await?;
    state.catch_up().await?;
    Ok(bundle)
}

/// `federation create` (`replace` false) and `federation update` (`replace` true).
pub(super) async fn put_relationship<D: DataStore>(
    state: &ServerState<D>,
    request: RelationshipMessage,
    replace: bool,
) -> Result<RelationshipMessage> {
    let input = RelationshipInput {
        trust_domain: request.trust_domain.clone(),
        bundle_endpoint_url: request.bundle_endpoint_url.clone(),
        profile: request.profile.clone(),
        endpoint_spiffe_id: request.endpoint_spiffe_id.clone(),
    };
    let mut relationship = input.validate(state.ca.trust_domain(), state.clock.unix_now())?;
    let td = relationship.trust_domain.clone();
    match (state.datastore.get_federation(&td).await?, replace) {
        (Some(_), false) => {
            return Err(Error::AlreadyExists(format!(
                "a federation relationship with {td}; change it with `federation update`"
            )));
        }
        (None, true) => {
            return Err(Error::NotFound(format!(
                "a federation relationship with {td}"
            )));
        }
        (Some(existing), true) => relationship.created_at = existing.created_at,
        (None, false) => {}
    }
    let first_bundle = if request.trust_bundle_json.is_empty() {
        None
    } else {
        Some(checked_bundle(state, &td, &request.trust_bundle_json).await?)
    };
    let stored = state.datastore.get_bundle(&td).await?;
    if matches!(relationship.profile, EndpointProfile::HttpsSpiffe { .. })
        && first_bundle.is_none()
        && stored.is_none()
    {
        return Err(Error::Invalid(sigil_core::Error::field(
            "trust_bundle_json",
            format!(
                "an https_spiffe endpoint is authenticated with {td}'s bundle and none is stored: pass the first one (`--trust-bundle <file>`, the output of `sigil-server bundle show --format spiffe` on {td}'s server)"
            ),
        )));
    }
    if let Some(bundle) = &first_bundle {
        state.datastore.put_bundle(bundle).await?;
    }
    state.datastore.put_federation(&relationship).await?;
    state.catch_up().await?;
    state.federation.relationships_changed();
    to_message(state, &relationship).await
}

/// The relationship with `td`, or `NotFound` naming it.
fn found(
    relationship: Option<FederationRelationship>,
    td: &TrustDomain,
) -> Result<FederationRelationship> {
    relationship.ok_or_else(|| Error::NotFound(format!("a federation relationship with {td}")))
}

/// `federation show`.
pub(super) async fn get_relationship<D: DataStore>(
    state: &ServerState<D>,
    trust_domain: &str,
) -> Result<RelationshipMessage> {
    let td = parse_trust_domain("trust_domain", trust_domain)?;
    let relationship = found(state.datastore.get_federation(&td).await?, &td)?;
    to_message(state, &relationship).await
}

/// `federation list`.
pub(super) async fn list_relationships<D: DataStore>(
    state: &ServerState<D>,
) -> Result<Vec<RelationshipMessage>> {
    let mut messages = Vec::new();
    for relationship in state.datastore.list_federations().await? {
        messages.push(to_message(state, &relationship).await?);
    }
    Ok(messages)
}

/// `federation delete`: the relationship goes, the last fetched bundle stays.
pub(super) async fn delete_relationship<D: DataStore>(
    state: &ServerState<D>,
    trust_domain: &str,
) -> Result<RelationshipMessage> {
    let td = parse_trust_domain("trust_domain", trust_domain)?;
    let relationship = found(state.datastore.delete_federation(&td).await?, &td)?;
    state.federation.relationships_changed();
    to_message(state, &relationship).await
}

/// `federation refresh`: fetch now.
pub(super) async fn refresh<D: DataStore>(
    state: &ServerState<D>,
    trust_domain: &str,
) -> Result<common::Bundle> {
    let td = parse_trust_domain("trust_domain", trust_domain)?;
    let relationship = found(state.datastore.get_federation(&td).await?, &td)?;
    let bundle = state
        .federation
        .refresh(state.datastore.as_ref(), &relationship)
        .await?;
    state.catch_up().await?;
    Ok(common::Bundle::from(&bundle))
}

async fn to_message<D: DataStore>(
    state: &ServerState<D>,
    relationship: &FederationRelationship,
) -> Result<RelationshipMessage> {
    let td = &relationship.trust_domain;
    let status = state.federation.status(td);
    let sequence = state
        .datastore
        .get_bundle(td)
        .await?
        .map_or(0, |b| b.sequence);
    Ok(RelationshipMessage {
        trust_domain: td.to_string(),
        bundle_endpoint_url: relationship.bundle_endpoint_url.clone(),
        profile: relationship.profile.name().into(),
        endpoint_spiffe_id: match &relationship.profile {
            EndpointProfile::HttpsWeb => String::new(),
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => endpoint_spiffe_id.to_string(),
        },
        trust_bundle_json: String::new(),
        created_at: relationship.created_at,
        updated_at: relationship.updated_at,
        bundle_sequence: sequence,
        last_refresh_at: status.last_attempt_at,
        last_success_at: status.last_success_at,
        last_error: status.last_error,
        next_refresh_at: status.next_attempt_at,
    })
}
