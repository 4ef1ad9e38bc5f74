//! A Workload API client over a Unix socket, used by `sigil-agent api ...`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use tonic::Streaming;
use tonic::codegen::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, HEADER, Result};

/// Adds the `workload.spiffe.io: true` header to every call.
#[derive(Debug, Clone, Copy)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(HEADER, tonic::metadata::MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// A connected Workload API client.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    inner: SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>,
}

fn refused(call: &'static str) -> impl Fn(tonic::Status) -> Error {
    move |status| Error::Refused { call, status }
}

/// The first message of the `call` stream of `what` updates, as `answer` opened it: what a
/// one-shot fetch answers.
async fn first_message<T>(
    answer: std::result::Result<tonic::Response<Streaming<T>>, tonic::Status>,
    call: &'static str,
    what: &str,
) -> Result<T> {
    let mut stream = answer.map_err(refused(call))?.into_inner();
    stream
        .message()
        .await
        .map_err(refused(call))?
        .ok_or_else(|| {
            Error::Malformed(format!("the {what} stream ended before its first message"))
        })
}

impl WorkloadClient {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self> {
        let socket: PathBuf = path.to_path_buf();
        // The URI is required by the API but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://workload.sock")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| Error::Connect {
                socket: path.display().to_string(),
                reason: format!("{e}; is the agent running, and is the socket path right?"),
            })?;
        Ok(WorkloadClient {
            inner: SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader),
        })
    }

    /// The stream of X509-SVID updates.
    pub async fn watch_x509(&mut self) -> Result<Streaming<X509svidResponse>> {
        Ok(self
            .inner
            .fetch_x509svid(X509svidRequest {})
            .await
            .map_err(refused("FetchX509SVID"))?
            .into_inner())
    }

    /// The current X509-SVIDs (the stream's first message).
    pub async fn fetch_x509(&mut self) -> Result<X509svidResponse> {
        let answer = self.inner.fetch_x509svid(X509svidRequest {}).await;
        first_message(answer, "FetchX509SVID", "X509-SVID").await
    }

    /// The current X.509 bundles.
    pub async fn fetch_x509_bundles(&mut self) -> Result<X509BundlesResponse> {
        let answer = self.inner.fetch_x509_bundles(X509BundlesRequest {}).await;
        first_message(answer, "FetchX509Bundles", "bundle").await
    }

    /// The current JWT bundles.
    pub async fn fetch_jwt_bundles(&mut self) -> Result<JwtBundlesResponse> {
        let answer = self.inner.fetch_jwt_bundles(JwtBundlesRequest {}).await;
        first_message(answer, "FetchJWTBundles", "JWT bundle").await
    }

    /// JWT-SVIDs for `audience` (all identities, or only `spiffe_id`).
    pub async fn fetch_jwt(
        &mut self,
        audience: Vec<String>,
        spiffe_id: Option<String>,
    ) -> Result<JwtsvidResponse> {
        Ok(self
            .inner
            .fetch_jwtsvid(JwtsvidRequest {
                audience,
                spiffe_id: spiffe_id.unwrap_or_default(),
            })
            .await
            .map_err(refused("FetchJWTSVID"))?
            .into_inner())
    }

    /// Validates a JWT-SVID for `audience`.
    pub async fn validate_jwt(
        &mut self,
        audience: String,
        token: String,
    ) -> Result<ValidateJwtsvidResponse> {
        Ok(self
            .inner
            .validate_jwtsvid(ValidateJwtsvidRequest {
                audience,
                svid: token,
            })
            .await
            .map_err(refused("ValidateJWTSVID"))?
            .into_inner())
    }
}
