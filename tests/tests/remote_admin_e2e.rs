//! Remote administration the SPIFFE way (issue 13): a workload whose entry has `admin = true`
//! calls the admin API over mTLS on the server's agent API port with the X509-SVID the real agent
//! served it (fetched with the `spiffe` crate), and manages entries; a workload of the same node
//! without the flag, and an agent's own SVID, are refused with PermissionDenied.

use anyhow::{Context, ensure};
use rcgen::KeyPair;
use sigil_agent::node::{AgentIdentity, IdentityStore, server_channel};
use sigil_core::id::{SpiffeId, parse_trust_domain};
use sigil_proto::admin::admin_api_client::AdminApiClient;
use sigil_proto::admin::{CountEntriesRequest, CreateEntryRequest, EntryId};
use sigil_proto::common;
use sigil_tests::{NODE_ALIAS, Node};
use tonic::Code;

const CONTROLLER: &str = "spiffe://example.org/controller";
const PLAIN: &str = "spiffe://example.org/plain";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_workload_manages_entries_over_mtls_and_others_are_refused() -> anyhow::Result<()>
{
    let node = Node::for_this_uid(&[(CONTROLLER, &["--admin"]), (PLAIN, &[])])?;
    let workload = node.agent.workload_client().await?;
    let context = workload.fetch_x509_context().await?;
    let trust = node.server.trust()?;
    let admin_client =
        |spiffe_id: &str| -> anyhow::Result<AdminApiClient<tonic::transport::Channel>> {
            let svid = context
                .svids()
                .iter()
                .find(|svid| svid.spiffe_id().to_string() == spiffe_id)
                .with_context(|| format!("the agent served no SVID for {spiffe_id}"))?;
            let identity = AgentIdentity {
                spiffe_id: SpiffeId::new(spiffe_id)?,
                chain: svid
                    .cert_chain()
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect(),
                expires_at: 0,
                key: KeyPair::try_from(svid.private_key().as_ref())?,
            };
            let channel = server_channel(
                node.server.agent_api.as_str(),
                &trust.trust_domain,
                &trust.roots,
                Some(&identity),
            )?;
            Ok(AdminApiClient::new(channel))
        };

    let mut controller = admin_client(CONTROLLER)?;
    let before = controller
        .count_entries(CountEntriesRequest::default())
        .await?
        .into_inner()
        .count;
    let created = controller
        .create_entry(CreateEntryRequest {
            entry: Some(common::Entry {
                spiffe_id: "spiffe://example.org/managed".into(),
                parent_id: NODE_ALIAS.into(),
                selectors: vec![common::Selector {
                    r#type: "unix".into(),
                    value: "uid:4242".into(),
                }],
                ..common::Entry::default()
            }),
        })
        .await?
        .into_inner();
    let after = controller
        .count_entries(CountEntriesRequest::default())
        .await?
        .into_inner()
        .count;
    ensure!(after == before + 1, "{before} then {after} entries");
    let shown = node
        .server
        .cli_json(&["entry", "show", "--id", &created.id])?;
    ensure!(
        shown["entries"][0]["spiffe_id"] == "spiffe://example.org/managed",
        "{shown}"
    );
    controller
        .delete_entry(EntryId {
            id: created.id.clone(),
        })
        .await?;

    let mut plain = admin_client(PLAIN)?;
    let refused = plain
        .count_entries(CountEntriesRequest::default())
        .await
        .err()
        .context("a workload without admin = true was let in")?;
    ensure!(refused.code() == Code::PermissionDenied, "{refused:?}");
    ensure!(refused.message().contains("admin = true"), "{refused:?}");

    // The agent's own SVID is no admin credential either.
    let trust_domain = parse_trust_domain("trust_domain", "example.org")?;
    let (agent_svid, _) = IdentityStore::open(&node.agent.data_dir)?
        .load(&trust_domain)?
        .context("the agent stored no identity")?;
    let agent_channel = server_channel(
        node.server.agent_api.as_str(),
        &trust_domain,
        &trust.roots,
        Some(&agent_svid),
    )?;
    let refused = AdminApiClient::new(agent_channel)
        .count_entries(CountEntriesRequest::default())
        .await
        .err()
        .context("an agent SVID was let in")?;
    ensure!(refused.code() == Code::PermissionDenied, "{refused:?}");
    Ok(())
}
