//! A fake Kubernetes API server in the test process, at the HTTP level, so the real binaries (and
//! kube-rs inside them) talk to it as they would to a cluster: TokenReview, pods and nodes with
//! list and watch (and the `spec.nodeName` field selector), namespaces with list and watch, and
//! ConfigMaps.
//!
//! State changes (pods and namespaces added or deleted) become watch events for every open watch
//! of that kind; every ConfigMap write is signalled, so tests await it rather than poll.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::ServerProcess;
use crate::steps::ServerTrust;

/// A token the fake TokenReview knows.
#[derive(Debug, Clone)]
pub struct FakeToken {
    /// Audiences the token was issued for.
    pub audiences: Vec<String>,
    /// `namespace`, `service account`.
    pub service_account: (String, String),
    /// The pod the token is bound to.
    pub pod: (String, String),
    /// Expired tokens are refused.
    pub expired: bool,
}

#[derive(Debug, Default)]
struct Inner {
    resource_version: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    nodes: BTreeMap<String, Value>,
    configmaps: BTreeMap<(String, String), Value>,
    tokens: HashMap<String, FakeToken>,
    /// Every pod and namespace event, for watches that resume from a resource version.
    events: Vec<(u64, Value)>,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(u64, Value)>,
    /// Counts ConfigMap writes.
    configmap_writes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The fake API server; it runs until dropped.
pub struct FakeKubernetes {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeKubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubernetes")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeKubernetes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    shared
        .inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A [`FakeKubernetes`] with a scratch directory holding the kubeconfig that points at it: where
/// a test starts the server and agents that talk to the fake.
#[derive(Debug)]
pub struct FakeCluster {
    /// The fake API server.
    pub fake: FakeKubernetes,
    /// `<dir>/kubeconfig`, what the server's and agents' `kubeconfig` settings name.
    pub kubeconfig: PathBuf,
    /// The scratch directory.
    pub dir: tempfile::TempDir,
}

/// A `sigil-server` that reaches a [`FakeCluster`], and its bundle, also written as a file for
/// agents and openssl.
#[derive(Debug)]
pub struct KubernetesServer {
    /// The server, in `<dir>/server`.
    pub server: ServerProcess,
    /// How clients trust it.
    pub trust: ServerTrust,
    /// `<dir>/bundle.pem`, its bundle.
    pub bundle_path: PathBuf,
}

impl FakeCluster {
    /// Starts the fake, and writes the kubeconfig in a fresh scratch directory.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let fake = FakeKubernetes::start().await?;
        let kubeconfig = dir.path().join("kubeconfig");
        fake.write_kubeconfig(&kubeconfig)?;
        Ok(FakeCluster {
            fake,
            kubeconfig,
            dir,
        })
    }

    /// Starts a server in the scratch directory with `settings` (top-level TOML keys), then a
    /// `[kubernetes]` table naming the kubeconfig, with `kubernetes` (the table's other keys).
    pub fn start_server(
        &self,
        settings: &str,
        kubernetes: &str,
    ) -> anyhow::Result<KubernetesServer> {
        let config = format!(
            "{settings}[kubernetes]\nkubeconfig = \"{}\"\n{kubernetes}",
            self.kubeconfig.display()
        );
        let server = ServerProcess::start(&self.dir.path().join("server"), None, &config)?;
        let bundle_path = self.dir.path().join("bundle.pem");
        let trust = server.write_trust(&bundle_path)?;
        Ok(KubernetesServer {
            server,
            trust,
            bundle_path,
        })
    }
}

/// `metadata.labels` of an object, from `(key, value)` pairs.
fn label_map(labels: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

impl FakeKubernetes {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let (events, _) = broadcast::channel(65_536);
        let shared = Shared {
            inner: Arc::default(),
            events,
            configmap_writes: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let router = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .route("/api/v1/pods", get(pods))
            .route("/api/v1/namespaces", get(namespaces))
            .route("/api/v1/namespaces/{namespace}/pods/{name}", get(pod))
            .route("/api/v1/nodes/{name}", get(node))
            .route(
                "/api/v1/namespaces/{namespace}/configmaps/{name}",
                get(get_configmap).put(put_configmap).patch(put_configmap),
            )
            .route(
                "/api/v1/namespaces/{namespace}/configmaps",
                post(create_configmap),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeKubernetes { url, shared, task })
    }

    /// Writes a kubeconfig that points at the fake.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-admin-token\n",
                self.url
            ),
        )?;
        Ok(())
    }

    fn next_version(inner: &mut Inner) -> u64 {
        inner.resource_version += 1;
        inner.resource_version
    }

    /// Adds a node.
    pub fn add_node(&self, name: &str, uid: &str, labels: &[(&str, &str)]) {
        let mut inner = lock(&self.shared);
        let version = Self::next_version(&mut inner);
        let labels = label_map(labels);
        inner.nodes.insert(
            name.into(),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": uid, "labels": labels, "resourceVersion": version.to_string()}}),
        );
    }

    /// Adds a running pod; each container is `(name, image, container id)` and the runtime prefix
    /// (`containerd://`) is added here.
    // One argument per pod field keeps test fixtures readable as a table.
    #[allow(clippy::too_many_arguments)]
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        service_account: &str,
        labels: &[(&str, &str)],
        containers: &[(&str, &str, &str)],
    ) {
        let mut inner = lock(&self.shared);
        let version = Self::next_version(&mut inner);
        let labels = label_map(labels);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels, "resourceVersion": version.to_string()},
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "containers": containers.iter().map(|(name, image, _)| json!({"name": name, "image": image})).collect::<Vec<_>>(),
            },
            "status": {
                "phase": "Running",
                "containerStatuses": containers.iter().map(|(name, image, id)| json!({
                    "name": name, "image": image, "imageID": "", "ready": true, "restartCount": 0,
                    "containerID": format!("containerd://{id}"),
                })).collect::<Vec<_>>(),
            },
        });
        inner
            .pods
            .insert((namespace.into(), name.into()), pod.clone());
        self.publish(&mut inner, version, json!({"type": "ADDED", "object": pod}));
    }

    /// Records a watch event and sends it to the open watches.
    fn publish(&self, inner: &mut Inner, version: u64, event: Value) {
        inner.events.push((version, event.clone()));
        let _ = self.shared.events.send((version, event));
    }

    /// Adds a namespace.
    pub fn add_namespace(&self, name: &str) {
        let mut inner = lock(&self.shared);
        let version = Self::next_version(&mut inner);
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "resourceVersion": version.to_string()},
            "status": {"phase": "Active"},
        });
        inner.namespaces.insert(name.into(), namespace.clone());
        self.publish(
            &mut inner,
            version,
            json!({"type": "ADDED", "object": namespace}),
        );
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut inner = lock(&self.shared);
        let version = Self::next_version(&mut inner);
        if let Some(mut pod) = inner
            .pods
            .remove(&(namespace.to_string(), name.to_string()))
        {
            pod["metadata"]["resourceVersion"] = json!(version.to_string());
            self.publish(
                &mut inner,
                version,
                json!({"type": "DELETED", "object": pod}),
            );
        }
    }

    /// Makes `token` known to TokenReview.
    pub fn add_token(&self, token: &str, details: FakeToken) {
        lock(&self.shared).tokens.insert(token.into(), details);
    }

    /// A ConfigMap's `data`, if it exists.
    pub fn configmap_data(&self, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared)
            .configmaps
            .get(&(namespace.to_string(), name.to_string()))
            .map(|cm| cm["data"].clone())
    }

    /// Waits (up to 10 s) until the ConfigMap `namespace/name` exists with `data` for which
    /// `holds` is true, and returns that data.
    pub async fn wait_for_configmap(
        &self,
        namespace: &str,
        name: &str,
        holds: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let mut writes = self.shared.configmap_writes.subscribe();
        let wait = async {
            loop {
                writes.borrow_and_update();
                if let Some(data) = self.configmap_data(namespace, name).filter(|d| holds(d)) {
                    return Ok(data);
                }
                if writes.changed().await.is_err() {
                    anyhow::bail!("the fake API server stopped");
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the ConfigMap {namespace}/{name} did not reach the expected content: {:?}",
                    self.configmap_data(namespace, name)
                )
            })?
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "message": message, "code": code.as_u16()})),
    )
        .into_response()
}

async fn token_review(State(shared): State<Shared>, body: Bytes) -> Response {
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let known = lock(&shared).tokens.get(token).cloned();
    let result = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(t) if t.expired => json!({"authenticated": false, "error": "token has expired"}),
        Some(t) if !wanted.is_empty() && !wanted.iter().any(|a| t.audiences.contains(a)) => {
            json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
        }
        Some(t) => {
            let audiences: Vec<&String> = if wanted.is_empty() {
                t.audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| t.audiences.contains(a)).collect()
            };
            let pod_uid = lock(&shared)
                .pods
                .get(&t.pod)
                .map(|p| p["metadata"]["uid"].clone())
                .unwrap_or(json!("gone"));
            json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {
                    "username": format!("system:serviceaccount:{}:{}", t.service_account.0, t.service_account.1),
                    "uid": "sa-uid",
                    "groups": ["system:serviceaccounts"],
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [t.pod.1],
                        "authentication.kubernetes.io/pod-uid": [pod_uid],
                    },
                },
            })
        }
    };
    axum::Json(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": review["spec"],
        "status": result,
    }))
    .into_response()
}

fn node_matches(pod: &Value, selector: Option<&str>) -> bool {
    match selector.and_then(|s| s.strip_prefix("spec.nodeName=")) {
        Some(node) => pod["spec"]["nodeName"] == node,
        None => true,
    }
}

/// `Some(resourceVersion)` (0 when absent) when the query asks for a watch.
fn watch_since(query: &HashMap<String, String>) -> Option<u64> {
    if !query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return None;
    }
    let since = query.get("resourceVersion").and_then(|v| v.parse().ok());
    Some(since.unwrap_or(0))
}

/// A list response of `kind` (`PodList`, ...) at `resource_version`.
fn list(kind: &str, resource_version: u64, items: Vec<Value>) -> Response {
    axum::Json(json!({
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": items,
    }))
    .into_response()
}

async fn pods(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let selector = query.get("fieldSelector").map(String::as_str);
    if let Some(since) = watch_since(&query) {
        return watch_events(&shared, "Pod", since, selector.map(str::to_string));
    }
    let inner = lock(&shared);
    let items: Vec<Value> = inner
        .pods
        .values()
        .filter(|p| node_matches(p, selector))
        .cloned()
        .collect();
    list("PodList", inner.resource_version, items)
}

async fn namespaces(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(since) = watch_since(&query) {
        return watch_events(&shared, "Namespace", since, None);
    }
    let inner = lock(&shared);
    let items: Vec<Value> = inner.namespaces.values().cloned().collect();
    list("NamespaceList", inner.resource_version, items)
}

/// A watch of one kind of object: the events after `since`, then live ones, one JSON event per
/// line, filtered by the field selector. Replay and subscription happen under one lock so nothing
/// falls between them.
fn watch_events(shared: &Shared, kind: &str, since: u64, selector: Option<String>) -> Response {
    let kind = kind.to_string();
    let (backlog, mut live) = {
        let inner = lock(shared);
        let backlog: Vec<(u64, Value)> = inner
            .events
            .iter()
            .filter(|(v, event)| *v > since && event["object"]["kind"] == kind.as_str())
            .cloned()
            .collect();
        (backlog, shared.events.subscribe())
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(1024);
    tokio::spawn(async move {
        let mut sent_up_to = since;
        for (version, event) in backlog {
            sent_up_to = version;
            if node_matches(&event["object"], selector.as_deref()) && tx.send(event).await.is_err()
            {
                return;
            }
        }
        loop {
            match live.recv().await {
                Ok((version, event))
                    if version > sent_up_to && event["object"]["kind"] == kind.as_str() =>
                {
                    if node_matches(&event["object"], selector.as_deref())
                        && tx.send(event).await.is_err()
                    {
                        return;
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|event| {
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(line))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "body"))
}

/// The object as JSON, or the API server's 404 for a `kind` object called `name`.
fn found_or_not_found(object: Option<&Value>, kind: &str, name: &str) -> Response {
    match object {
        Some(object) => axum::Json(object.clone()).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{kind} \"{name}\" not found"),
        ),
    }
}

async fn pod(
    State(shared): State<Shared>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    found_or_not_found(
        lock(&shared).pods.get(&(namespace.clone(), name.clone())),
        "pods",
        &name,
    )
}

async fn node(State(shared): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    found_or_not_found(lock(&shared).nodes.get(&name), "nodes", &name)
}

async fn get_configmap(
    State(shared): State<Shared>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    found_or_not_found(
        lock(&shared).configmaps.get(&(namespace, name.clone())),
        "configmaps",
        &name,
    )
}

async fn put_configmap(
    State(shared): State<Shared>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(mut configmap) = serde_json::from_slice::<Value>(&body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let mut inner = lock(&shared);
    let version = FakeKubernetes::next_version(&mut inner);
    configmap["metadata"]["name"] = json!(name);
    configmap["metadata"]["namespace"] = json!(namespace);
    configmap["metadata"]["resourceVersion"] = json!(version.to_string());
    configmap["apiVersion"] = json!("v1");
    configmap["kind"] = json!("ConfigMap");
    inner
        .configmaps
        .insert((namespace, name), configmap.clone());
    drop(inner);
    shared.configmap_writes.send_modify(|n| *n += 1);
    axum::Json(configmap).into_response()
}

async fn create_configmap(
    State(shared): State<Shared>,
    UrlPath(namespace): UrlPath<String>,
    body: Bytes,
) -> Response {
    let name = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|cm| cm["metadata"]["name"].as_str().map(str::to_string))
        .unwrap_or_default();
    put_configmap(State(shared), UrlPath((namespace, name)), body).await
}

use tokio_stream::StreamExt as _;
