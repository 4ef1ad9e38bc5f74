//! Trust bundles and federation relationships: the `bundles` and `federation_relationships`
//! tables, how federation rows map to [`FederationRelationship`], and the writes, each in one
//! transaction with its [`EventKind::Bundle`] or [`EventKind::Federation`] change event.

use sigil_core::bundle::TrustBundle;
use sigil_core::id::TrustDomain;
use sqlx::any::AnyRow;

use super::{AnyQuery, Columns, SqlDataStore, append_event, corrupt, fetch_all, fetch_optional};
use crate::Result;
use crate::datastore::{BundleStore, EndpointProfile, EventKind, FederationRelationship};

/// Selects every federation relationship, column by column; a `WHERE` or `ORDER BY` follows.
macro_rules! select_federations {
    () => {
        "SELECT trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at FROM federation_relationships"
    };
}

/// Selects the relationship of one trust domain.
fn select_federation(trust_domain: &TrustDomain) -> AnyQuery<'static> {
    sqlx::query(concat!(select_federations!(), " WHERE trust_domain = $1"))
        .bind(trust_domain.as_str().to_string())
}

fn bundle_from_row(row: &AnyRow) -> Result<TrustBundle> {
    let row = Columns::of("bundle", row);
    TrustBundle::from_spiffe_json(row.trust_domain("trust_domain")?, &row.text("document")?)
        .map_err(|e| corrupt("bundle", e))
}

fn federation_from_row(row: &AnyRow) -> Result<FederationRelationship> {
    let row = Columns::of("federation relationship", row);
    let profile = match row.text("profile")?.as_str() {
        "https_web" => EndpointProfile::HttpsWeb,
        "https_spiffe" => EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: row.spiffe_id("endpoint_spiffe_id")?,
        },
        other => return Err(corrupt("federation profile", other)),
    };
    Ok(FederationRelationship {
        trust_domain: row.trust_domain("trust_domain")?,
        bundle_endpoint_url: row.text("bundle_endpoint_url")?,
        profile,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
    })
}

impl BundleStore for SqlDataStore {
    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>> {
        let query =
            sqlx::query("SELECT trust_domain, document FROM bundles WHERE trust_domain = $1")
                .bind(trust_domain.as_str());
        fetch_optional(&self.pool, query, bundle_from_row).await
    }

    async fn put_bundle(&self, bundle: &TrustBundle) -> Result<()> {
        let document = bundle.to_spiffe_json()?;
        let now = self.clock.unix_now();
        let mut tx = self.pool.begin().await?;
        append_event(
            &mut tx,
            EventKind::Bundle,
            bundle.trust_domain.as_str(),
            now,
        )
        .await?;
        sqlx::query("INSERT INTO bundles (trust_domain, document, sequence, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (trust_domain) DO UPDATE SET document = $2, sequence = $3, updated_at = $4")
            .bind(bundle.trust_domain.as_str())
            .bind(document)
            .bind(i64::try_from(bundle.sequence).unwrap_or(i64::MAX))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_bundles(&self) -> Result<Vec<TrustBundle>> {
        let query = sqlx::query("SELECT trust_domain, document FROM bundles ORDER BY trust_domain");
        fetch_all(&self.pool, query, bundle_from_row).await
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        let now = self.clock.unix_now();
        append_event(&mut tx, EventKind::Bundle, trust_domain.as_str(), now).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()> {
        let endpoint_id = match &relationship.profile {
            EndpointProfile::HttpsWeb => String::new(),
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => endpoint_spiffe_id.to_string(),
        };
        let mut tx = self.pool.begin().await?;
        append_event(
            &mut tx,
            EventKind::Federation,
            relationship.trust_domain.as_str(),
            relationship.updated_at,
        )
        .await?;
        sqlx::query("INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (trust_domain) DO UPDATE SET bundle_endpoint_url = $2, profile = $3, endpoint_spiffe_id = $4, updated_at = $6")
            .bind(relationship.trust_domain.as_str())
            .bind(&relationship.bundle_endpoint_url)
            .bind(relationship.profile.name())
            .bind(endpoint_id)
            .bind(relationship.created_at)
            .bind(relationship.updated_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        fetch_optional(
            &self.pool,
            select_federation(trust_domain),
            federation_from_row,
        )
        .await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        let query = sqlx::query(concat!(select_federations!(), " ORDER BY trust_domain"));
        fetch_all(&self.pool, query, federation_from_row).await
    }

    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let mut tx = self.pool.begin().await?;
        let query = select_federation(trust_domain);
        let Some(relationship) = fetch_optional(&mut *tx, query, federation_from_row).await? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = $1")
            .bind(trust_domain.as_str())
            .execute(&mut *tx)
            .await?;
        let now = self.clock.unix_now();
        append_event(&mut tx, EventKind::Federation, trust_domain.as_str(), now).await?;
        tx.commit().await?;
        Ok(Some(relationship))
    }
}
