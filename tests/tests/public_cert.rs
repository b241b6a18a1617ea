//! The outlet's public hostname certificate from the authority, with the real binaries: an
//! outlet offering a service publicly without certificate files asks the relay (the authority)
//! for `<service>.<public-domain>` over its control connection, serves browsers with it, and
//! renews it; an outlet asking for a hostname it may not have is refused with the reason.
//!
//! Build the binaries first with `cargo build --bins` (scripts/test.sh does).

use postern_proto::msg::{Ctl, Refusal};
use postern_proto::pki;
use postern_tests::kit::*;
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::{cli, Proc};
use postern_tests::wait::eventually;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const DOMAIN: &str = "pub.localhost";
const HOST: &str = "web.pub.localhost";

/// A real relay holding the authority, with its public ingress on `DOMAIN`; only `outlet-1`
/// may register (and so offer publicly) `web`.
struct Setup {
    dir: tempfile::TempDir,
    relay: Proc,
    relay_addr: String,
    public: SocketAddr,
}

impl Setup {
    async fn start(validity: &str) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("relay-state").display().to_string();
        let certs = dir.path().join("certs").display().to_string();
        cli("postern-relay", &["ca", "init", "--state-dir", &state]).await;
        for name in ["outlet-1", "outlet-2"] {
            let args = [
                "ca",
                "issue",
                name,
                "--state-dir",
                &state,
                "--out-dir",
                &certs,
            ];
            cli("postern-relay", &args).await;
        }
        let relay_addr = free_udp_addr().to_string();
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let ops = format!("127.0.0.1:{}", free_port());
        let mut relay = Proc::spawn(
            dir.path(),
            "relay",
            "postern-relay",
            &[
                "run",
                "--state-dir",
                &state,
                "--listen",
                &relay_addr,
                "--allow-register",
                "web=name = \"outlet-1\"",
                "--public-addr",
                &public.to_string(),
                "--public-domain",
                DOMAIN,
                "--public-cert-validity",
                validity,
                "--metrics-addr",
                &ops,
            ],
        );
        relay.wait_ready(ops.parse().expect("addr")).await;
        Self {
            dir,
            relay,
            relay_addr,
            public,
        }
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }

    /// A real outlet named `name` offering `web` (served by `web`) publicly under `domain`,
    /// with no certificate files for it.
    async fn outlet(&self, name: &str, domain: &str, web: SocketAddr) -> (Proc, String) {
        let certs = self.path("certs");
        let state = self.path(&format!("{name}-state"));
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"relay = "{relay}"
cert = "{certs}/{name}.pem"
key = "{certs}/{name}.key"
ca = "{certs}/ca.pem"
state-dir = "{state}"
public-domain = "{domain}"
public-port = {port}
[[service]]
name = "web"
to = "{web}"
public = true
"#,
                relay = self.relay_addr,
                port = self.public.port(),
            ),
        )
        .expect("write outlet config");
        let ops = format!("127.0.0.1:{}", free_port());
        let mut outlet = Proc::spawn(
            self.dir.path(),
            name,
            "postern-outlet",
            &[
                "run",
                "--config",
                &config.display().to_string(),
                "--metrics-addr",
                &ops,
            ],
        );
        outlet.wait_ready(ops.parse().expect("addr")).await;
        (outlet, state)
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("certs/ca.pem")).expect("ca.pem")
    }
}

/// The certificate the public port serves for `HOST`, checked as a browser checks it (the
/// project CA as the only root, the name must match); `None` while no valid one is served.
async fn served_cert(public: SocketAddr, ca_pem: &str) -> Option<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::certs_from_pem(ca_pem).expect("ca") {
        roots.add(c).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(public).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from(HOST.to_owned()).expect("name");
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    tls.get_ref()
        .1
        .peer_certificates()?
        .first()
        .map(|c| c.to_vec())
}

/// Waits until the public port serves a valid certificate for `HOST` that `ok` accepts.
async fn served_when(
    s: &Setup,
    within: Duration,
    what: &str,
    ok: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let (ca, deadline) = (s.ca_pem(), Instant::now() + within);
    loop {
        if let Some(der) = served_cert(s.public, &ca).await {
            if ok(&der) {
                return der;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} (waited {within:?})\n{}",
            s.relay.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn not_after(der: &[u8]) -> SystemTime {
    pki::cert_validity(der).expect("validity").1
}

/// A plain HTTP server answering every request with `body`.
async fn web_app(body: &'static str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// No certificate files: the outlet gets one from the authority, keeps its key (0600) in its
/// state directory, a browser-like client trusting only the project CA reaches the service by
/// name through the relay's public port, and the certificate is renewed before it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlet_fetches_serves_and_renews_its_public_hostname_certificate() {
    let s = Setup::start("6s").await;
    let web = web_app("ok from the web app").await;
    let (outlet, state) = s.outlet("outlet-1", DOMAIN, web).await;
    let ca = s.ca_pem();

    // The certificate the outlet fetched is what browsers are served.
    let first = served_when(
        &s,
        Duration::from_secs(20),
        "a certificate for the hostname",
        |_| true,
    )
    .await;
    assert_eq!(pki::cert_name(&first).expect("name").as_str(), HOST);
    let (cert_file, key_file) = postern_outlet::public::cert::paths(Path::new(&state), HOST);
    let stored = std::fs::read_to_string(&cert_file).expect("stored certificate");
    let key = std::fs::read_to_string(&key_file).expect("stored key");
    assert!(key.contains("PRIVATE KEY"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
    }
    let served_pem = pki::certs_from_pem(&stored).expect("pem");
    assert!(
        served_pem.iter().any(|c| c.as_ref() == first.as_slice()),
        "the stored certificate is the one served"
    );
    // The private key never crossed the control connection: the relay's log and state hold
    // nothing of it.
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!s.relay.log().contains(&key_body[..40]));

    // A browser-like HTTPS client (the project CA as its only root) reaches the service by
    // name: the 403 page without a grant, the app with an access link.
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"))
        .resolve(HOST, s.public)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let root = format!("https://{HOST}:{}/", s.public.port());
    let r = client.get(&root).send().await.expect("no grant");
    assert_eq!(r.status().as_u16(), 403);
    let created = cli(
        "postern-outlet",
        &[
            "access",
            "create",
            "--service",
            "web",
            "--ttl",
            "10m",
            "--state-dir",
            &state,
        ],
    )
    .await;
    let link = created
        .lines()
        .find_map(|l| l.strip_prefix("link:"))
        .map(str::trim)
        .expect("link")
        .to_owned();
    let r = client.get(&link).send().await.expect("open link");
    assert_eq!(r.status().as_u16(), 302);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("cookie")
        .to_owned();
    let r = client
        .get(&root)
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("with cookie");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.expect("body"), "ok from the web app");

    // Renewed at two thirds of its 6 s: a new certificate, expiring later, is served and
    // stored, and browsers still get in.
    let renewed = served_when(
        &s,
        Duration::from_secs(30),
        "a renewed certificate served",
        |der| der != first.as_slice() && not_after(der) > not_after(&first),
    )
    .await;
    assert_eq!(pki::cert_name(&renewed).expect("name").as_str(), HOST);
    let stored = std::fs::read_to_string(&cert_file).expect("stored certificate");
    let stored = pki::first_cert(&stored).expect("pem");
    assert!(not_after(&stored) >= not_after(&renewed));
    let r = client
        .get(&root)
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("after renewal");
    assert_eq!(r.status().as_u16(), 200);
    drop(outlet);
}

/// The authority signs only what the outlet may have: a node the policy does not let register
/// the service is refused naming the rule, and an outlet whose public domain is not the relay's
/// is refused naming the hostname the relay would route, writes no certificate and serves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostnames_an_outlet_may_not_have_are_refused_with_the_reason() {
    let s = Setup::start("1h").await;

    // outlet-2 is a node of the project, but the policy lets only outlet-1 register `web`.
    let read = |p: &str| std::fs::read_to_string(s.dir.path().join(p)).expect("read");
    let identity = postern_proto::tls::Identity::from_pem(
        &read("certs/outlet-2.pem"),
        &read("certs/outlet-2.key"),
    )
    .expect("identity");
    let roots = postern_proto::tls::roots_from_pem(&s.ca_pem()).expect("roots");
    let client =
        postern_net::transport::endpoint::control_client(&identity, roots).expect("client");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = ep
        .connect_with(client, s.relay_addr.parse().expect("addr"), "relay")
        .expect("connect")
        .await
        .expect("control connection");
    let (csr_pem, _key) = pki::make_hostname_csr(HOST).expect("csr");
    let ask = Ctl::PublicCertRequest {
        service: svc("web"),
        hostname: HOST.into(),
        csr_pem,
    };
    let answer = postern_net::control::exchange::request(&conn, &ask, Duration::from_secs(10))
        .await
        .expect("answer");
    let Ctl::Refused { reason } = answer else {
        panic!("not refused: {answer:?}");
    };
    assert!(matches!(reason, Refusal::NotAllowed { .. }), "{reason:?}");
    let text = reason.to_string();
    assert!(
        text.contains("to get a public hostname certificate for web")
            && text.contains("default deny"),
        "{text}"
    );
    conn.close(0u32.into(), b"done");

    // outlet-1 may offer `web`, but only as web.pub.localhost: asking for web.other.localhost
    // (its public-domain is wrong) is refused with the name the relay routes.
    let web = web_app("never served").await;
    let (outlet, state) = s.outlet("outlet-1", "other.localhost", web).await;
    let expected = "no certificate for public hostname web.other.localhost: the relay's public \
                    ingress reaches web only as web.pub.localhost";
    eventually(
        Duration::from_secs(20),
        "the refusal in the outlet's log",
        || {
            let log = outlet.log();
            async move { log.contains(expected) }
        },
    )
    .await;
    let (cert_file, key_file) =
        postern_outlet::public::cert::paths(Path::new(&state), "web.other.localhost");
    assert!(!cert_file.exists() && !key_file.exists());
    assert!(
        s.relay
            .log()
            .contains("public hostname certificate refused"),
        "{}",
        s.relay.log()
    );
    // Nothing is served for the hostname the relay does route to it.
    assert!(served_cert(s.public, &s.ca_pem()).await.is_none());
}
