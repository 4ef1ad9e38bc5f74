//! Conversions between the domain types and the protobuf messages.

use sigil_core::entry::{Entry, EntryInput};
use sigil_core::selector::Selector;
use sigil_proto::{admin, common};

use crate::ca::SignedX509Svid;
use crate::datastore::{AgentRecord, IssuedSvid};

pub(crate) fn entry_to_proto(entry: &Entry) -> common::Entry {
    common::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        parent_id: entry.parent_id.to_string(),
        selectors: entry.selectors.iter().map(common::Selector::from).collect(),
        x509_svid_ttl: entry.x509_svid_ttl,
        jwt_svid_ttl: entry.jwt_svid_ttl,
        dns_names: entry.dns_names.clone(),
        federates_with: entry
            .federates_with
            .iter()
            .map(ToString::to_string)
            .collect(),
        admin: entry.admin,
        downstream: entry.downstream,
        hint: entry.hint.clone(),
        expires_at: entry.expires_at,
        created_at: entry.created_at,
        revision: entry.revision,
    }
}

/// The user's fields of an entry, unchecked: [`EntryInput::validate`] checks them.
pub(crate) fn entry_input(entry: common::Entry) -> EntryInput {
    EntryInput {
        spiffe_id: entry.spiffe_id,
        parent_id: entry.parent_id,
        selectors: entry.selectors.into_iter().map(Selector::from).collect(),
        x509_svid_ttl: entry.x509_svid_ttl,
        jwt_svid_ttl: entry.jwt_svid_ttl,
        dns_names: entry.dns_names,
        federates_with: entry.federates_with,
        admin: entry.admin,
        downstream: entry.downstream,
        hint: entry.hint,
        expires_at: entry.expires_at,
    }
}

pub(crate) fn svid_to_proto(spiffe_id: String, svid: &SignedX509Svid) -> common::X509Svid {
    common::X509Svid {
        spiffe_id,
        cert_chain: svid.chain.clone(),
        expires_at: svid.not_after,
        serial: svid.serial.clone(),
    }
}

pub(crate) fn agent_to_proto(agent: &AgentRecord) -> admin::Agent {
    admin::Agent {
        spiffe_id: agent.spiffe_id.clone(),
        attestor: agent.attestor.clone(),
        selectors: agent.selectors.iter().map(common::Selector::from).collect(),
        svid_serial: agent.svid_serial.clone(),
        svid_expires_at: agent.svid_expires_at,
        banned: agent.banned,
        created_at: agent.created_at,
        updated_at: agent.updated_at,
    }
}

pub(crate) fn issued_to_proto(svid: &IssuedSvid) -> admin::IssuedSvid {
    admin::IssuedSvid {
        serial: svid.serial.clone(),
        spiffe_id: svid.spiffe_id.clone(),
        agent_id: svid.agent_id.clone(),
        entry_id: svid.entry_id.clone(),
        authority_id: svid.authority_id.clone(),
        not_before: svid.not_before,
        not_after: svid.not_after,
        kind: svid.kind.clone(),
    }
}
