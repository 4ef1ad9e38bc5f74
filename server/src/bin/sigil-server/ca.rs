//! `sigil-server ca ...`: the CA journal.

use clap::Subcommand;
use serde_json::json;
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{Authority, AuthorityId, ListAuthoritiesRequest};
use tonic::transport::Channel;

use crate::admin::answer;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// The journal: every X.509 CA and JWT key with its state (prepared, active, old, tainted,
    /// revoked) and expiry.
    Show,
    /// Makes the next X.509 CA and JWT key: published in the bundle at once, signing only once
    /// activated (give agents and federated peers a refresh interval in between).
    Prepare,
    /// The prepared CA and JWT key start signing; the ones they replace become old.
    Activate,
    /// An old authority not to rely on any more: agents replace everything it signed at once.
    Taint {
        /// Its id (from `ca show`).
        #[arg(long)]
        id: String,
    },
    /// Removes a tainted authority from the bundle, once everything it signed was replaced.
    Revoke {
        /// Its id (from `ca show`).
        #[arg(long)]
        id: String,
    },
}

pub(crate) async fn run(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: CaCommand,
) -> anyhow::Result<()> {
    let authorities = match command {
        CaCommand::Show => {
            answer(client.list_authorities(ListAuthoritiesRequest {}))
                .await?
                .authorities
        }
        CaCommand::Prepare => {
            answer(client.prepare_authorities(ListAuthoritiesRequest {}))
                .await?
                .authorities
        }
        CaCommand::Activate => {
            answer(client.activate_authorities(ListAuthoritiesRequest {}))
                .await?
                .authorities
        }
        CaCommand::Taint { id } => vec![answer(client.taint_authority(AuthorityId { id })).await?],
        CaCommand::Revoke { id } => {
            vec![answer(client.revoke_authority(AuthorityId { id })).await?]
        }
    };
    print_authorities(format, &authorities);
    Ok(())
}

fn print_authorities(format: Format, authorities: &[Authority]) {
    let rows = |a: &Authority| {
        vec![
            ("ID", a.id.clone()),
            ("Kind", a.kind.clone()),
            ("State", a.state.clone()),
            ("Owner", a.owner.clone()),
            ("Created at", a.created_at.to_string()),
            ("Not after", a.not_after.to_string()),
        ]
    };
    let empty = "No authorities found";
    output::print_items(format, authorities, "authorities", empty, rows, |a| {
        json!({
            "id": a.id,
            "kind": a.kind,
            "state": a.state,
            "owner": a.owner,
            "created_at": a.created_at,
            "not_after": a.not_after,
        })
    });
}
