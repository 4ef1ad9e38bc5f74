//! `sigil-server federation ...` and the foreign half of `sigil-server bundle ...`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{FederationRelationship, ListFederationsRequest, TrustDomainName};
use tonic::transport::Channel;

use crate::admin::answer;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub(crate) enum FederationCommand {
    /// Starts trusting a foreign trust domain, fetching its bundle from its bundle endpoint.
    Create(RelationshipArgs),
    /// Changes a relationship (endpoint, profile, endpoint ID; optionally the bundle).
    Update(RelationshipArgs),
    /// Lists relationships with the refresher's view of each.
    List,
    /// Shows one relationship.
    Show {
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
    },
    /// Deletes a relationship; its last bundle stays until `bundle delete`.
    Delete {
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
    },
    /// Fetches the foreign bundle now and prints it.
    Refresh {
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
        /// pem or spiffe.
        #[arg(long, value_enum, default_value_t = output::BundleFormat::Pem)]
        format: output::BundleFormat,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RelationshipArgs {
    /// The foreign trust domain, e.g. `b.example`.
    #[arg(long)]
    trust_domain: String,
    /// Its bundle endpoint, `https://host:port/`.
    #[arg(long)]
    bundle_endpoint_url: String,
    /// https_spiffe (the endpoint presents an X509-SVID) or https_web (a web PKI certificate).
    #[arg(long, default_value = "https_spiffe")]
    profile: String,
    /// For https_spiffe: the SPIFFE ID the endpoint presents, e.g. `spiffe://b.example/sigil/server`.
    #[arg(long, default_value = "")]
    endpoint_spiffe_id: String,
    /// The first bundle to trust the endpoint with: a file holding `sigil-server bundle show
    /// --format spiffe` of the foreign server.
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
}

impl RelationshipArgs {
    fn into_proto(self) -> anyhow::Result<FederationRelationship> {
        let trust_bundle_json = match &self.trust_bundle {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the trust bundle {}", path.display()))?,
            None => String::new(),
        };
        Ok(FederationRelationship {
            trust_domain: self.trust_domain,
            bundle_endpoint_url: self.bundle_endpoint_url,
            profile: self.profile,
            endpoint_spiffe_id: self.endpoint_spiffe_id,
            trust_bundle_json,
            ..FederationRelationship::default()
        })
    }
}

pub(crate) async fn run(
    client: &mut AdminApiClient<Channel>,
    format: Format,
    command: FederationCommand,
) -> anyhow::Result<()> {
    let name = |trust_domain: String| TrustDomainName { trust_domain };
    let relationships = match command {
        FederationCommand::Create(args) => {
            vec![answer(client.create_federation(args.into_proto()?)).await?]
        }
        FederationCommand::Update(args) => {
            vec![answer(client.update_federation(args.into_proto()?)).await?]
        }
        FederationCommand::List => {
            answer(client.list_federations(ListFederationsRequest {}))
                .await?
                .relationships
        }
        FederationCommand::Show { trust_domain } => {
            vec![answer(client.get_federation(name(trust_domain))).await?]
        }
        FederationCommand::Delete { trust_domain } => {
            vec![answer(client.delete_federation(name(trust_domain))).await?]
        }
        FederationCommand::Refresh {
            trust_domain,
            format: bundle_format,
        } => {
            let bundle = answer(client.refresh_federation(name(trust_domain))).await?;
            print!("{}", crate::admin::render_bundle(bundle, bundle_format)?);
            return Ok(());
        }
    };
    print_relationships(format, &relationships);
    Ok(())
}

fn print_relationships(format: Format, relationships: &[FederationRelationship]) {
    let rows = |r: &FederationRelationship| {
        vec![
            ("Trust domain", r.trust_domain.clone()),
            ("Bundle endpoint", r.bundle_endpoint_url.clone()),
            ("Profile", r.profile.clone()),
            ("Endpoint SPIFFE ID", r.endpoint_spiffe_id.clone()),
            ("Bundle sequence", r.bundle_sequence.to_string()),
            ("Last refresh", r.last_refresh_at.to_string()),
            ("Last success", r.last_success_at.to_string()),
            ("Last error", r.last_error.clone()),
            ("Next refresh", r.next_refresh_at.to_string()),
        ]
    };
    let empty = "No federation relationships found";
    output::print_items(format, relationships, "relationships", empty, rows, |r| {
        json!({
            "trust_domain": r.trust_domain,
            "bundle_endpoint_url": r.bundle_endpoint_url,
            "profile": r.profile,
            "endpoint_spiffe_id": r.endpoint_spiffe_id,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "bundle_sequence": r.bundle_sequence,
            "last_refresh_at": r.last_refresh_at,
            "last_success_at": r.last_success_at,
            "last_error": r.last_error,
            "next_refresh_at": r.next_refresh_at,
        })
    });
}
