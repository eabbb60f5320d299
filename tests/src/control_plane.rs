//! One real control plane: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok, each a child process on free loopback ports.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

use crate::pki::{self, Authority};
use crate::process::Managed;
use crate::{FakeNode, HarnessError, Result};

/// The field manager the harness applies with.
pub const FIELD_MANAGER: &str = "tidepool-harness";

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// etcd syncs every write to disk, as in production (benchmarks want this);
    /// off makes tests faster.
    pub fsync: bool,
    /// Run kube-controller-manager (garbage collection, Deployments, service accounts).
    pub controller_manager: bool,
    /// Run kube-scheduler.
    pub scheduler: bool,
    /// Run kwok to manage fake nodes and their pods.
    pub kwok: bool,
    /// Install Tidepool's CRDs and wait until they are Established.
    pub crds: bool,
    /// Nodes to create once the control plane is up.
    pub nodes: Vec<FakeNode>,
    /// Keep the API server's audit log of writes and single reads ([`ControlPlane::audit_log`]).
    pub audit: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fsync: false,
            controller_manager: true,
            scheduler: true,
            kwok: true,
            crds: true,
            nodes: vec![FakeNode::new("kwok-node-0"), FakeNode::new("kwok-node-1")],
            audit: false,
        }
    }
}

impl Options {
    /// etcd and the API server alone: no controllers, no nodes, no CRDs.
    pub fn api_server_only() -> Self {
        Self { controller_manager: false, scheduler: false, kwok: false, crds: false, nodes: vec![], ..Self::default() }
    }
}

/// A running control plane. Dropping it stops everything and removes its directory.
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    server: String,
    pod_cidr: String,
    admin_kubeconfig: PathBuf,
    /// Signs client certificates for more users.
    ca: Option<Authority>,
    // Stopped in reverse start order (kwok first, etcd last) on drop.
    processes: Vec<Managed>,
    /// Each component's arguments, to start it again.
    args: Vec<(String, Vec<String>)>,
    keep_dir: bool,
}

impl ControlPlane {
    /// Starts a control plane with the default [`Options`].
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts a control plane, waits until it is ready, and applies `options`.
    ///
    /// Ports are picked free just before each component starts, so another
    /// process can take one in between; then the whole start is tried again.
    pub async fn start_with(options: Options) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(&options).await {
                Err(HarnessError::Exited { tail, .. }) if attempt < 3 && tail.contains("address already in use") => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(options: &Options) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = new_run_dir()?;
        let pod_cidr = pod_cidr_for(&dir);
        let mut plane = Self {
            dir,
            bin,
            server: String::new(),
            pod_cidr,
            admin_kubeconfig: PathBuf::new(),
            ca: None,
            processes: Vec::new(),
            args: Vec::new(),
            keep_dir: std::env::var_os("TIDEPOOL_KEEP_HARNESS").is_some(),
        };
        plane.boot(options).await?;
        Ok(plane)
    }

    async fn boot(&mut self, options: &Options) -> Result<()> {
        let dir = self.dir.clone();
        let path = |name: &str| dir.join(name);
        let ca = Authority::new()?;
        let serving = ca.server(&[
            "localhost",
            "127.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "10.96.0.1",
        ])?;
        write(&path("ca.crt"), &ca.pem.cert)?;
        write(&path("ca.key"), &ca.pem.key)?;
        write(&path("apiserver.crt"), &serving.cert)?;
        write(&path("apiserver.key"), &serving.key)?;
        let signing = pki::signing_key()?;
        write(&path("service-account.key"), &signing.key)?;
        write(&path("service-account.pub"), &signing.cert)?;

        let etcd_port = free_port()?;
        let mut etcd_args = vec![
            "--name=harness".to_string(),
            format!("--data-dir={}", path("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{}", free_port()?),
            "--log-level=warn".to_string(),
        ];
        if !options.fsync {
            etcd_args.push("--unsafe-no-fsync=true".to_string());
        }
        self.spawn_component("etcd", &etcd_args)?;
        self.wait_for_port("etcd", etcd_port, Duration::from_secs(30)).await?;

        let api_port = free_port()?;
        self.server = format!("https://127.0.0.1:{api_port}");
        let api_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", path("apiserver-certs").display()),
            format!("--tls-cert-file={}", path("apiserver.crt").display()),
            format!("--tls-private-key-file={}", path("apiserver.key").display()),
            format!("--client-ca-file={}", path("ca.crt").display()),
            format!("--service-account-key-file={}", path("service-account.pub").display()),
            format!("--service-account-signing-key-file={}", path("service-account.key").display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            "--api-audiences=https://kubernetes.default.svc.cluster.local".to_string(),
            "--authorization-mode=RBAC".to_string(),
            "--service-cluster-ip-range=10.96.0.0/16".to_string(),
            // The "kubernetes" Service would point at loopback; nothing needs it.
            "--endpoint-reconciler-type=none".to_string(),
            "--allow-privileged=true".to_string(),
            if std::env::var_os("TIDEPOOL_HARNESS_PROFILING").is_some() {
                "--profiling=true"
            } else {
                "--profiling=false"
            }
            .to_string(),
        ];
        let mut api_args = api_args;
        if options.audit {
            write(&path("audit-policy.yaml"), AUDIT_POLICY)?;
            api_args.extend([
                format!("--audit-policy-file={}", path("audit-policy.yaml").display()),
                format!("--audit-log-path={}", path("audit.log").display()),
                "--audit-log-format=json".to_string(),
                "--audit-log-mode=blocking".to_string(),
            ]);
        }
        self.spawn_component("kube-apiserver", &api_args)?;

        let admin = ca.client("tidepool-admin", &["system:masters"])?;
        self.admin_kubeconfig = self.write_cert_kubeconfig("admin", &admin, &self.server.clone())?;
        self.wait_until_ready().await?;

        if options.controller_manager {
            let mut args = self.component_args(&ca, "system:kube-controller-manager", "controller-manager")?;
            args.extend([
                format!("--root-ca-file={}", path("ca.crt").display()),
                format!("--service-account-private-key-file={}", path("service-account.key").display()),
                format!("--cluster-signing-cert-file={}", path("ca.crt").display()),
                format!("--cluster-signing-key-file={}", path("ca.key").display()),
                "--use-service-account-credentials=true".to_string(),
                // Fake nodes come and go in tests; don't wait minutes to evict.
                "--node-monitor-grace-period=20s".to_string(),
            ]);
            self.spawn_component("kube-controller-manager", &args)?;
        }
        if options.scheduler {
            let mut args = self.component_args(&ca, "system:kube-scheduler", "scheduler")?;
            // The default client limit (50 requests/s) would cap pod binding
            // at 50 pods/s, below what the session benchmarks ask for.
            args.extend(["--kube-api-qps=1000".to_string(), "--kube-api-burst=2000".to_string()]);
            self.spawn_component("kube-scheduler", &args)?;
        }
        if options.kwok {
            write(&path("kwok.yaml"), include_str!("kwok-stages.yaml"))?;
            let args = vec![
                format!("--kubeconfig={}", self.admin_kubeconfig.display()),
                format!("--config={}", path("kwok.yaml").display()),
                "--manage-all-nodes=true".to_string(),
                format!("--cidr={}", self.pod_cidr),
                "--node-ip=127.0.0.1".to_string(),
                format!("--server-address=127.0.0.1:{}", free_port()?),
            ];
            self.spawn_component("kwok", &args)?;
        }

        let client = self.client().await?;
        if options.controller_manager {
            // Pods can only be created once the default ServiceAccount exists.
            self.wait_for_service_account(&client, "default", "default").await?;
        }
        if options.crds {
            self.install_crds().await?;
        }
        for node in &options.nodes {
            self.add_node(node).await?;
        }
        self.ca = Some(ca);
        Ok(())
    }

    /// Kills a component (`etcd`, `kube-apiserver`, ...) as a crash would,
    /// starts it again with the same arguments (ports, data), and waits
    /// until it serves again.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        self.kill(name)?;
        self.start_again(name).await
    }

    /// Kills a component, as a crash would; [`ControlPlane::start_again`] brings it back.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| HarnessError::Other(format!("no component {name}")))?;
        process.kill();
        Ok(())
    }

    /// Starts a killed component again with its arguments, and waits until it serves.
    pub async fn start_again(&mut self, name: &str) -> Result<()> {
        let args = self
            .args
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, args)| args.clone())
            .ok_or_else(|| HarnessError::Other(format!("no component {name}")))?;
        let process = Managed::spawn(name, &self.bin.join(name), &args, &self.dir)?;
        let slot = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| HarnessError::Other(format!("no component {name}")))?;
        *slot = process;
        match name {
            "kube-apiserver" => self.wait_until_ready().await,
            "etcd" => {
                let port = args
                    .iter()
                    .find_map(|a| a.strip_prefix("--listen-client-urls=http://127.0.0.1:"))
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| HarnessError::Other("etcd has no client port".into()))?;
                self.wait_for_port("etcd", port, Duration::from_secs(30)).await
            }
            _ => Ok(()),
        }
    }

    /// The API server's audit log (JSON lines, one per write or single
    /// read), with [`Options::audit`].
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// A kubeconfig for `user`, a member of `system:masters` with a client
    /// certificate of its own (so the audit log tells its requests apart),
    /// reaching the API server at `server` (a proxy's address, say).
    pub fn admin_kubeconfig_as(&self, user: &str, server: &str) -> Result<PathBuf> {
        let ca = self.ca.as_ref().ok_or_else(|| HarnessError::Other("the control plane has no CA".into()))?;
        let pem = ca.client(user, &["system:masters"])?;
        self.write_cert_kubeconfig(user, &pem, server)
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The admin kubeconfig (user in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The directory holding certificates, logs and etcd's data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The range kwok gives pod addresses from: a loopback /16 of its own, so
    /// a local process can listen on a pod's address.
    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// Where the control-plane binaries are.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// A client with the admin's rights.
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// A client with only the rights of ServiceAccount `namespace/name`,
    /// which is created (with its namespace) if missing.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let kubeconfig = self.service_account_kubeconfig(namespace, name).await?;
        client_from(&kubeconfig).await
    }

    /// A kubeconfig for ServiceAccount `namespace/name` holding a fresh
    /// one-hour token, for `kubectl` or our binaries.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let audience = "https://kubernetes.default.svc.cluster.local";
        let token = self.service_account_token(namespace, name, audience, None).await?;
        let file = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        let user = format!("    token: {token}\n");
        write(&file, &self.kubeconfig_text(&format!("{namespace}-{name}"), &user, &self.server))?;
        Ok(file)
    }

    /// A one-hour token of ServiceAccount `namespace/name` (created if
    /// missing) for `audience`. Bound to `pod` (its name and UID) when given,
    /// so the API server vouches for the pod's node in a TokenReview, as it
    /// does for a projected token inside that pod.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let admin = self.client().await?;
        self.ensure_namespace(&admin, namespace).await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
            ..Default::default()
        };
        accounts.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&account)).await?;
        let bound_object_ref = pod.map(|(pod, uid)| BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            uid: Some(uid.into()),
        });
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_string()],
                expiration_seconds: Some(3600),
                bound_object_ref,
            },
            ..Default::default()
        };
        let issued = accounts.create_token_request(name, &PostParams::default(), &request).await?;
        issued
            .status
            .map(|s| s.token)
            .ok_or_else(|| HarnessError::Other(format!("no token issued for {namespace}/{name}")))
    }

    /// `kubectl` pointed at this control plane as admin.
    pub fn kubectl(&self) -> std::process::Command {
        let mut command = std::process::Command::new(self.bin.join("kubectl"));
        command.arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()));
        command
    }

    /// Applies every Tidepool CRD and waits until each is Established.
    pub async fn install_crds(&self) -> Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for crd in tidepool_crds::generate::all() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &Patch::Apply(&crd)).await?;
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .map_err(|_| HarnessError::Timeout { what: format!("CRD {name} to be Established"), seconds: 30 })?
                .map_err(|e| HarnessError::Other(format!("watching CRD {name}: {e}")))?;
        }
        Ok(())
    }

    /// Creates a fake node and waits until kwok reports it Ready and the
    /// node lifecycle controller has taken off the taints it puts on a node
    /// not yet Ready (`node.kubernetes.io/not-ready`, `.../unreachable`):
    /// until then nothing may be placed there, and a test that places pods
    /// at once would find fewer nodes than it made.
    pub async fn add_node(&self, node: &FakeNode) -> Result<()> {
        let api: Api<Node> = Api::all(self.client().await?);
        let object = node.to_node();
        api.create(&PostParams::default(), &object).await?;
        // The status on create is dropped by the API server; set capacity through the status subresource.
        api.patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({
                "status": object.status
            })),
        )
        .await?;
        let ready = await_condition(api, &node.name, |n: Option<&Node>| {
            let ready = n
                .and_then(|n| n.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let lifecycle_taints = n
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| NOT_READY_TAINTS.contains(&t.key.as_str())));
            ready && !lifecycle_taints
        });
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .map_err(|_| HarnessError::Timeout { what: format!("node {} to be Ready", node.name), seconds: 30 })?
            .map_err(|e| HarnessError::Other(format!("watching node {}: {e}", node.name)))?;
        Ok(())
    }

    /// Starts one of our own programs as a local process against this control
    /// plane: `KUBECONFIG` points at the admin kubeconfig, and its log goes
    /// to `<run dir>/<name>.log`. It stops when the handle is dropped.
    pub fn spawn(&self, name: &str, program: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Managed> {
        let mut vars = vec![("KUBECONFIG".to_string(), self.admin_kubeconfig.display().to_string())];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Managed::spawn_with_env(name, program, args, &vars, &self.dir)
    }

    /// Fails with the end of its log if any control-plane process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.processes.iter_mut().try_for_each(Managed::check_running)
    }

    /// The process ids of the running components, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes.iter().map(|p| (p.name.clone(), p.pid())).collect()
    }

    /// The flags the controller-manager and the scheduler share: their own
    /// client certificate, serving on a free loopback port, no leader election.
    fn component_args(&self, ca: &Authority, user: &str, name: &str) -> Result<Vec<String>> {
        let kubeconfig = self.write_cert_kubeconfig(name, &ca.client(user, &[])?, &self.server)?;
        Ok(vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--authentication-kubeconfig={}", kubeconfig.display()),
            format!("--authorization-kubeconfig={}", kubeconfig.display()),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={}", free_port()?),
            "--leader-elect=false".to_string(),
        ])
    }

    fn spawn_component(&mut self, name: &str, args: &[String]) -> Result<()> {
        let process = Managed::spawn(name, &self.bin.join(name), args, &self.dir)?;
        self.processes.push(process);
        self.args.push((name.to_string(), args.to_vec()));
        Ok(())
    }

    async fn wait_for_port(&mut self, what: &str, port: u16, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(());
            }
            self.check_running()?;
            if start.elapsed() > limit {
                return Err(HarnessError::Timeout { what: what.to_string(), seconds: limit.as_secs() });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let limit = Duration::from_secs(90);
        let start = Instant::now();
        let mut last = String::new();
        loop {
            self.check_running()?;
            if let Ok(client) = self.client().await {
                let request =
                    http::Request::get("/readyz").body(Vec::new()).map_err(|e| HarnessError::Other(e.to_string()))?;
                match client.request_text(request).await {
                    Ok(body) if body.trim() == "ok" => return Ok(()),
                    Ok(body) => last = body,
                    Err(e) => last = e.to_string(),
                }
            }
            if start.elapsed() > limit {
                return Err(HarnessError::Timeout {
                    what: format!("kube-apiserver /readyz (last answer: {last})"),
                    seconds: limit.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_service_account(&mut self, client: &Client, namespace: &str, name: &str) -> Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let start = Instant::now();
        while api.get_opt(name).await?.is_none() {
            self.check_running()?;
            if start.elapsed() > Duration::from_secs(60) {
                return Err(HarnessError::Timeout { what: format!("ServiceAccount {namespace}/{name}"), seconds: 60 });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn ensure_namespace(&self, client: &Client, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
            ..Default::default()
        };
        api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&namespace)).await?;
        Ok(())
    }

    fn write_cert_kubeconfig(&self, user: &str, pem: &pki::Pem, server: &str) -> Result<PathBuf> {
        let cert = self.dir.join(format!("{user}.crt"));
        let key = self.dir.join(format!("{user}.key"));
        write(&cert, &pem.cert)?;
        write(&key, &pem.key)?;
        let auth = format!("    client-certificate: {}\n    client-key: {}\n", cert.display(), key.display());
        let file = self.dir.join(format!("{user}.kubeconfig"));
        write(&file, &self.kubeconfig_text(user, &auth, server))?;
        Ok(file)
    }

    fn kubeconfig_text(&self, user: &str, auth: &str, server: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: harness\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n{auth}contexts:\n- name: {user}\n  context:\n    cluster: harness\n    user: {user}\n    namespace: default\ncurrent-context: {user}\n",
            ca = self.dir.join("ca.crt").display(),
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(mut process) = self.processes.pop() {
            process.stop(Duration::from_secs(3));
        }
        if self.keep_dir {
            let _ = std::fs::write(self.dir.join(KEEP_MARKER), "");
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The taints the node lifecycle controller puts on a node that is not Ready.
const NOT_READY_TAINTS: [&str; 2] = ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"];

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The control-plane binaries: `$TIDEPOOL_CONTROL_PLANE_BIN`, or what the
/// build script reports (it builds on first use and answers from its cache after).
pub fn bin_dir() -> Result<PathBuf> {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(dir) = BIN.get() {
        return Ok(dir.clone());
    }
    let dir = find_bin_dir()?;
    Ok(BIN.get_or_init(|| dir).clone())
}

fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TIDEPOOL_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("control-plane/build.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(HarnessError::io(format!("running {}", script.display())))?;
    if !output.status.success() {
        return Err(HarnessError::Build(output.status.to_string()));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    if dir.is_empty() {
        return Err(HarnessError::Build("the build script printed no directory".into()));
    }
    Ok(PathBuf::from(dir))
}

/// A fresh directory under `$TIDEPOOL_HARNESS_DIR` (default: the system temp
/// dir), after removing those left by test processes that no longer exist.
fn new_run_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let root = std::env::var_os("TIDEPOOL_HARNESS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tidepool-harness"));
    std::fs::create_dir_all(&root).map_err(HarnessError::io(format!("creating {}", root.display())))?;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let owner = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let path = entry.path();
            let ours = path.join(RUN_MARKER).exists() && !path.join(KEEP_MARKER).exists();
            if let Some(pid) = owner
                && ours
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(HarnessError::io(format!("creating {}", dir.display())))?;
    write(&dir.join(RUN_MARKER), "a tidepool-harness run directory; removed when its process is gone\n")?;
    Ok(dir)
}

/// What the audit log keeps, at the Metadata level (who, what, when, and
/// the answer's code): every write, and reads of single objects (not lists
/// or watches, which caches make all the time).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [\"RequestReceived\"]
rules:
- level: Metadata
  verbs: [\"create\", \"update\", \"patch\", \"delete\", \"deletecollection\", \"get\"]
- level: None
";

/// Marks a directory as a harness run's, so cleanup never touches anything else.
const RUN_MARKER: &str = ".tidepool-harness-run";
/// Marks a run directory kept with `TIDEPOOL_KEEP_HARNESS` (for its logs).
const KEEP_MARKER: &str = ".tidepool-harness-keep";

/// A loopback /16 for this run's pods, distinct for concurrent runs.
fn pod_cidr_for(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let hash = name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    // 127.16.0.0 to 127.239.255.255: clear of 127.0.0.0/16, where servers bind.
    format!("127.{}.0.0/16", 16 + hash % 224)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(HarnessError::io("finding a free port"))?;
    listener.local_addr().map(|a| a.port()).map_err(HarnessError::io("reading a port"))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(HarnessError::io(format!("writing {}", path.display())))
}
