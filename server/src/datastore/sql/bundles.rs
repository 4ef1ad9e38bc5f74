//! Trust bundles and federation relationships: the `bundles` and `federation_relationships`
//! tables, how federation rows map to [`FederationRelationship`], and the writes, each in one
//! transaction with its [`EventKind::Bundle`] or [`EventKind::Federation`] change event.

use sigil_core::bundle::TrustBundle;
use sigil_core::id::{TrustDomain, parse_spiffe_id, parse_trust_domain};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlDataStore, append_event, corrupt};
use crate::Result;
use crate::datastore::{EndpointProfile, EventKind, FederationRelationship};

macro_rules! federation_columns {
    () => {
        "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at"
    };
}

fn federation_from_row(row: &AnyRow) -> Result<FederationRelationship> {
    let name: String = row.try_get("trust_domain")?;
    let profile: String = row.try_get("profile")?;
    let endpoint_id: String = row.try_get("endpoint_spiffe_id")?;
    let profile = match profile.as_str() {
        "https_web" => EndpointProfile::HttpsWeb,
        "https_spiffe" => EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: parse_spiffe_id("endpoint_spiffe_id", &endpoint_id)
                .map_err(|e| corrupt("federation relationship", e))?,
        },
        other => return Err(corrupt("federation profile", other)),
    };
    Ok(FederationRelationship {
        trust_domain: parse_trust_domain("trust_domain", &name)
            .map_err(|e| corrupt("federation relationship", e))?,
        bundle_endpoint_url: row.try_get("bundle_endpoint_url")?,
        profile,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl SqlDataStore {
    pub(super) async fn get_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<TrustBundle>> {
        let row = sqlx::query("SELECT document FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let document: String = row.try_get("document")?;
            TrustBundle::from_spiffe_json(trust_domain.clone(), &document)
                .map_err(|e| corrupt("bundle", e))
        })
        .transpose()
    }

    pub(super) async fn put_bundle(&self, bundle: &TrustBundle) -> Result<()> {
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

    pub(super) async fn list_bundles(&self) -> Result<Vec<TrustBundle>> {
        let rows = sqlx::query("SELECT trust_domain, document FROM bundles ORDER BY trust_domain")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get("trust_domain")?;
                let trust_domain =
                    parse_trust_domain("trust_domain", &name).map_err(|e| corrupt("bundle", e))?;
                let document: String = row.try_get("document")?;
                TrustBundle::from_spiffe_json(trust_domain, &document)
                    .map_err(|e| corrupt("bundle", e))
            })
            .collect()
    }

    pub(super) async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<bool> {
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

    pub(super) async fn put_federation(&self, relationship: &FederationRelationship) -> Result<()> {
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

    pub(super) async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            federation_columns!(),
            " FROM federation_relationships WHERE trust_domain = $1"
        ))
        .bind(trust_domain.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(federation_from_row).transpose()
    }

    pub(super) async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            federation_columns!(),
            " FROM federation_relationships ORDER BY trust_domain"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(federation_from_row).collect()
    }

    pub(super) async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            federation_columns!(),
            " FROM federation_relationships WHERE trust_domain = $1"
        ))
        .bind(trust_domain.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let relationship = federation_from_row(&row)?;
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
