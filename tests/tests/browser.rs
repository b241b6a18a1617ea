//! A real browser (Debian's headless Chromium) opens the InfluxDB UI by hostname through the
//! inlet's TLS listener: `https://influxdb.test.localhost:<port>/` (names under `.localhost`
//! resolve to loopback in Chromium, so no DNS is needed).
//!
//! The InfluxDB 2 UI cannot be installed here, so the UI is a real web front on the outlet side:
//! nginx (Debian's) serves a static page and proxies `/query` and `/write` to a real influxd 1.x
//! with authentication on. The page's JavaScript writes points and reads them back with
//! `fetch()`, without any credential: the inlet puts the leased one into every request.
//!
//! The browser trusts the listener's certificate (issued by the project CA for the hostname)
//! because the CA, as printed by `postern-inlet ca export`, is imported into the NSS database
//! of the browser's `$HOME` with `certutil` — never by ignoring certificate errors. A second
//! browser without the CA imported must fail to load the page, which shows that the first one
//! really verified the certificate.
//!
//! A second test opens the same page at the relay's public hostname
//! (`https://influxdb.relay.localhost:<port>/`): without an access link the browser sees the
//! outlet's 403 page; the link from `access create` lets it in, the outlet putting the grant's
//! own leased credential into every request; once the grant expires it is refused again.
//!
//! Needs `chromium`, `certutil` (libnss3-tools), `nginx` and `influxd` (scripts/test.sh installs
//! them when absent).

use postern_inlet::{Inlet, InletOptions, InletService, ServiceKind};
use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::*;
use postern_tests::leases::{leased_outlet, leased_services};
use postern_tests::ports::free_port;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The hostname the browser opens.
const HOST: &str = "influxdb.test.localhost";
/// How long one Chromium run may take (start-up is slow on small machines).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

const INDEX_HTML: &str = r#"<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>InfluxDB through postern</title>
<style>
  body { font-family: sans-serif; margin: 40px; color: #222; }
  table { border-collapse: collapse; margin-top: 16px; }
  th, td { border: 1px solid #999; padding: 6px 16px; text-align: left; }
  th { background: #eef; }
  #status[data-state="ok"] { color: #070; }
  #status[data-state="error"] { color: #a00; }
</style>
</head>
<body>
<h1>InfluxDB through postern</h1>
<p>Page origin: <code id="origin"></code> &mdash; the browser sends no credential; postern
puts a leased one into every request.</p>
<p id="status" data-state="loading">loading&hellip;</p>
<table id="points">
<thead><tr><th>time (s)</th><th>room</th><th>value</th></tr></thead>
<tbody></tbody>
</table>
<script src="/app.js"></script>
</body>
</html>
"#;

const APP_JS: &str = r#"(async () => {
  const status = document.getElementById('status');
  document.getElementById('origin').textContent = location.origin;
  try {
    const lines = [
      'temp,room=kitchen value=21.5 1700000001',
      'temp,room=hall value=18.25 1700000002',
      'temp,room=attic value=30 1700000003',
    ].join('\n');
    let r = await fetch('/write?db=leased&precision=s', { method: 'POST', body: lines });
    if (r.status !== 204) throw new Error('write: HTTP ' + r.status + ' ' + await r.text());
    const q = 'SELECT "value", "room" FROM "temp" ORDER BY time';
    r = await fetch('/query?db=leased&epoch=s&q=' + encodeURIComponent(q));
    if (r.status !== 200) throw new Error('query: HTTP ' + r.status + ' ' + await r.text());
    const rows = (await r.json()).results[0].series[0].values;
    const body = document.querySelector('#points tbody');
    for (const [time, value, room] of rows) {
      const tr = document.createElement('tr');
      for (const cell of [time, room, value]) {
        const td = document.createElement('td');
        td.textContent = String(cell);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    status.textContent = 'read back ' + rows.length + ' points: ' +
      rows.map(([, value, room]) => room + '=' + value).join(', ');
    status.dataset.state = 'ok';
  } catch (e) {
    status.textContent = 'error: ' + e.message;
    status.dataset.state = 'error';
  }
})();
"#;

/// What the page shows once it has written and read back the points.
const EXPECTED: &str = "read back 3 points: kitchen=21.5, hall=18.25, attic=30";

/// `tool` on `PATH` (or in /usr/sbin, where Debian puts nginx).
fn require(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{tool} not found: run scripts/test.sh (it installs chromium, libnss3-tools and \
                 nginx) or `apt-get install chromium libnss3-tools nginx`"
            )
        })
}

/// A private nginx on 127.0.0.1 serving `www` and proxying the InfluxDB API to `influxd`.
struct Nginx {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Nginx {
    async fn start(influxd: SocketAddr) -> Nginx {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("postern-nginx-")
                .tempdir()
                .expect("tempdir");
            let d = dir.path();
            std::fs::create_dir(d.join("www")).expect("mkdir www");
            std::fs::write(d.join("www/index.html"), INDEX_HTML).expect("write page");
            std::fs::write(d.join("www/app.js"), APP_JS).expect("write script");
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let p = d.display();
            let proxy = format!(
                "proxy_pass http://{influxd}; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\";"
            );
            let conf = format!(
                r#"daemon off;
master_process off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {p}/access.log;
  client_body_temp_path {p}/client_body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  types {{ text/html html; application/javascript js; }}
  default_type application/octet-stream;
  server {{
    listen {addr};
    root {p}/www;
    index index.html;
    location = /query {{ {proxy} }}
    location = /write {{ {proxy} }}
    location = /ping {{ {proxy} }}
  }}
}}
"#
            );
            std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
            let child = tokio::process::Command::new(require("nginx"))
                .arg("-p")
                .arg(d)
                .arg("-e")
                .arg(d.join("error.log"))
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn nginx");
            let mut me = Nginx { child, dir, addr };
            if me.wait_ready().await {
                return me;
            }
            last = me.error_log();
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start:\n{last}");
    }

    async fn wait_ready(&mut self) -> bool {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            let url = format!("http://{}/index.html", self.addr);
            if let Ok(r) = client.get(url).send().await {
                if r.status().is_success() {
                    return true;
                }
            }
            // Polling the process for readiness: there is no event to wait on.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// An inlet whose `influxdb` listener (HTTP filter on) serves TLS with `cert`/`key`.
async fn tls_inlet(pki: &Pki, relay: SocketAddr, cert: &Path, key: &Path) -> (SocketAddr, Running) {
    let mut inlet = Inlet::bind(InletOptions {
        relay: relay_target(relay),
        identity: pki.identity("inlet-1"),
        roots: pki.roots(),
        services: vec![InletService {
            name: svc("influxdb"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            kind: ServiceKind::Influxdb,
        }],
    })
    .await
    .expect("bind inlet");
    let acceptor = postern_inlet::tls::acceptor(cert, key).expect("TLS acceptor");
    assert!(inlet.set_tls(&svc("influxdb"), acceptor));
    let addr = inlet.listen_addr(&svc("influxdb")).expect("listener");
    let mut handle = inlet.handle();
    let running = Running::spawn(|s| inlet.run(s));
    assert!(
        handle.wait_connected(Duration::from_secs(10)).await,
        "inlet did not connect"
    );
    (addr, running)
}

/// A `$HOME` whose NSS database (the one Chromium reads on Linux) trusts `ca_pem` for TLS
/// servers, if given; an empty database otherwise.
async fn browser_home(ca_pem: Option<&Path>) -> tempfile::TempDir {
    let home = tempfile::Builder::new()
        .prefix("postern-browser-home-")
        .tempdir()
        .expect("tempdir");
    let db = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&db).expect("mkdir nssdb");
    let db_arg = format!("sql:{}", db.display());
    certutil(&["-d", &db_arg, "-N", "--empty-password"]).await;
    if let Some(ca) = ca_pem {
        let ca = ca.display().to_string();
        certutil(&[
            "-d",
            &db_arg,
            "-A",
            "-t",
            "C,,",
            "-n",
            "postern-ca",
            "-i",
            &ca,
        ])
        .await;
        let listed = certutil(&["-d", &db_arg, "-L"]).await;
        assert!(listed.contains("postern-ca"), "{listed}");
    }
    home
}

async fn certutil(args: &[&str]) -> String {
    let out = tokio::process::Command::new(require("certutil"))
        .args(args)
        .output()
        .await
        .expect("run certutil");
    assert!(
        out.status.success(),
        "certutil {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loads `url` in headless Chromium with `home` as `$HOME`; returns the DOM after the page's
/// scripts ran (up to 10 s of virtual time) and Chromium's stderr.
async fn chromium(home: &Path, url: &str, screenshot: Option<&Path>) -> (String, String) {
    let profile = home.join("chromium-profile");
    let mut cmd = tokio::process::Command::new(require("chromium"));
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-proxy-server",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=10000",
        "--window-size=1200,800",
        "--dump-dom",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    if let Some(path) = screenshot {
        cmd.arg(format!("--screenshot={}", path.display()));
    }
    cmd.arg(url)
        .env("HOME", home)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(BROWSER_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {BROWSER_TIMEOUT:?}"))
        .expect("run chromium");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "chromium ({url}) took {:?}, exit {}",
        started.elapsed(),
        out.status
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// Where test artifacts go: `$CARGO_TARGET_DIR/test-artifacts` or `target/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create test-artifacts");
    dir
}

/// The first request may race the first lease (the inlet answers 503 until it has one): polls
/// with a TLS client that trusts only the project CA until a query with the leased credential
/// succeeds.
async fn wait_for_lease(addr: SocketAddr, ca_pem: &str) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .resolve(HOST, addr)
        .https_only(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let url = format!("https://{HOST}:{}/query?q=SHOW%20DATABASES", addr.port());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = match client.get(&url).send().await {
            Ok(r) if r.status().as_u16() == 200 => return,
            Ok(r) => format!(
                "HTTP {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => format!("{e:?}"),
        };
        assert!(Instant::now() < deadline, "no lease in time: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_opens_the_influxdb_ui_by_hostname_through_the_tls_inlet() {
    init_logging();
    for tool in ["chromium", "certutil", "nginx"] {
        require(tool);
    }
    let started = Instant::now();
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE leased")
        .await
        .expect("create db");
    let nginx = Nginx::start(influxd.http_addr()).await;
    // The web front is real and needs a credential: without the inlet, a query is refused.
    let direct = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("http://{}/query?q=SHOW%20DATABASES", nginx.addr))
        .send()
        .await
        .expect("query nginx directly");
    assert_eq!(direct.status().as_u16(), 401, "influxd must require auth");

    let pki = Pki::new();
    let files = tempfile::tempdir().expect("tempdir");
    // The listener's certificate for the hostname, as `postern-relay ca issue HOST` makes it.
    let issued = pki
        .ca()
        .issue(&node(HOST), Duration::from_secs(3600))
        .expect("issue a certificate for the hostname");
    let (cert, key) = (
        files.path().join(format!("{HOST}.pem")),
        files.path().join(format!("{HOST}.key")),
    );
    std::fs::write(&cert, &issued.cert_pem).expect("write cert");
    std::fs::write(&key, &issued.key_pem).expect("write key");
    // The CA as `postern-inlet ca export` prints it from an enrolled inlet's state directory.
    let inlet_state = files.path().join("inlet-state");
    std::fs::create_dir(&inlet_state).expect("mkdir");
    std::fs::write(
        postern_net::control::enroll::NodeState::new(&inlet_state).ca(),
        pki.ca_pem(),
    )
    .expect("write state ca.pem");
    let ca_pem = postern_inlet::tls::export_ca(&inlet_state).expect("ca export");
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).expect("write ca.pem");

    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [12; 32], None);
    let lease_state = tempfile::tempdir().expect("tempdir");
    let lease_shutdown = CancellationToken::new();
    let (outlet, manager) = leased_outlet(
        &pki,
        relay.addr,
        &influxd,
        nginx.addr,
        lease_state.path(),
        3600,
        lease_shutdown.clone(),
    )
    .await;
    let (addr, inlet) = tls_inlet(&pki, relay.addr, &cert, &key).await;
    wait_for_lease(addr, &ca_pem).await;
    let url = format!("https://{HOST}:{}/", addr.port());
    eprintln!("set-up took {:?}; opening {url}", started.elapsed());

    // A browser that trusts the project CA loads the page, which writes and reads back points.
    let trusting = browser_home(Some(&ca_file)).await;
    let shot = artifacts_dir().join("ui-through-inlet.png");
    let _ = std::fs::remove_file(&shot);
    let (dom, stderr) = chromium(trusting.path(), &url, Some(&shot)).await;
    assert!(
        dom.contains(r#"data-state="ok""#) && dom.contains(EXPECTED),
        "the page did not show the points read back.\nDOM:\n{dom}\nchromium stderr:\n{stderr}\n\
         nginx access log:\n{}",
        nginx.access_log()
    );
    assert!(
        dom.contains(&format!("https://{HOST}:{}", addr.port())),
        "{dom}"
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
    eprintln!("screenshot: {}", shot.display());
    // Every request went through the web front, with the leased credential the inlet put in.
    let log = nginx.access_log();
    for req in [
        "GET / ",
        "GET /app.js ",
        "POST /write?db=leased",
        "GET /query?db=leased",
    ] {
        assert!(log.contains(req), "{req:?} not in the access log:\n{log}");
    }
    let v = influxd
        .query("SELECT count(\"value\") FROM leased.autogen.temp")
        .await
        .expect("query influxd directly");
    assert_eq!(
        v.pointer("/results/0/series/0/values/0/1"),
        Some(&serde_json::json!(3))
    );

    // Without the CA in its trust store, the browser refuses the certificate: nothing loads
    // and no request reaches the web front.
    let requests_before = nginx.access_log().lines().count();
    let untrusting = browser_home(None).await;
    let (dom, stderr) = chromium(untrusting.path(), &url, None).await;
    assert!(
        !dom.contains("read back") && !dom.contains("InfluxDB through"),
        "the page loaded without trusting the CA:\n{dom}"
    );
    assert!(
        stderr.contains("ERR_CERT_AUTHORITY_INVALID"),
        "expected a certificate authority error, chromium said:\n{stderr}"
    );
    assert_eq!(
        nginx.access_log().lines().count(),
        requests_before,
        "a request got through without a trusted certificate"
    );

    inlet.stop().await;
    outlet.running.stop().await;
    lease_shutdown.cancel();
    manager.closed().await;
    eprintln!("test took {:?}", started.elapsed());
}

/// The relay's public domain in the public-path test (`*.localhost` resolves to loopback in
/// Chromium).
const PUBLIC_DOMAIN: &str = "relay.localhost";
/// The public hostname of the InfluxDB UI.
const PUBLIC_HOST: &str = "influxdb.relay.localhost";

/// What a request with `cookie` gets through the public ingress at `addr` (status and body).
async fn public_get(addr: SocketAddr, ca_pem: &str, cookie: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .resolve(PUBLIC_HOST, addr)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let r = client
        .get(format!("https://{PUBLIC_HOST}:{}/", addr.port()))
        .header("Cookie", cookie)
        .send()
        .await
        .expect("request through the public ingress");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_opens_the_influxdb_ui_by_public_hostname_with_an_access_link() {
    init_logging();
    for tool in ["chromium", "certutil", "nginx"] {
        require(tool);
    }
    let started = Instant::now();
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE leased")
        .await
        .expect("create db");
    let nginx = Nginx::start(influxd.http_addr()).await;
    let pki = Pki::new();
    let files = tempfile::tempdir().expect("tempdir");
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, pki.ca_pem()).expect("write ca.pem");

    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [13; 32], None);
    let (ingress, _ingress) = start_public_ingress(&relay, PUBLIC_DOMAIN, None).await;
    let state = tempfile::tempdir().expect("tempdir");
    let lease_shutdown = CancellationToken::new();
    let (services, manager) = leased_services(
        &influxd,
        nginx.addr,
        state.path(),
        3600,
        lease_shutdown.clone(),
    )
    .await;
    // The outlet holds the certificate for the public hostname (`postern-relay ca issue
    // influxdb.relay.localhost`); the relay holds none.
    let public = std::sync::Arc::new(postern_outlet::public::Public {
        services: std::collections::HashMap::from([(
            svc("influxdb"),
            postern_outlet::public::PublicService {
                acceptor: host_acceptor(&pki, PUBLIC_HOST),
                host: PUBLIC_HOST.to_owned(),
            },
        )]),
        access: std::sync::Arc::new(
            postern_outlet::public::access::AccessStore::open(state.path()).expect("access store"),
        ),
        link_port: ingress.port(),
    });
    let outlet = start_outlet_public(&pki, "outlet-1", relay.addr, services, public.clone()).await;
    let home = browser_home(Some(&ca_file)).await;
    let root = format!("https://{PUBLIC_HOST}:{}/", ingress.port());

    // Without an access link: the 403 page, and nothing reaches the web front.
    let probes = nginx.access_log().lines().count();
    let (dom, stderr) = chromium(home.path(), &root, None).await;
    assert!(
        dom.contains("Access needed")
            && dom.contains("postern-outlet access create --service influxdb"),
        "expected the 403 page.\nDOM:\n{dom}\nchromium stderr:\n{stderr}"
    );
    assert_eq!(
        nginx.access_log().lines().count(),
        probes,
        "{}",
        nginx.access_log()
    );

    // With a short access link: the page loads, writes and reads back points through the
    // outlet, which puts the grant's own leased credential into every request.
    let ttl = Duration::from_secs(20);
    let grant = public
        .access
        .create(
            &svc("influxdb"),
            ttl,
            [("team".to_owned(), "ops".to_owned())].into(),
        )
        .expect("grant");
    let granted_at = Instant::now();
    let link = public
        .link(&svc("influxdb"), grant.secret.expose())
        .expect("link");
    let shot = artifacts_dir().join("ui-through-public-hostname.png");
    let _ = std::fs::remove_file(&shot);
    let (dom, stderr) = chromium(home.path(), &link, Some(&shot)).await;
    assert!(
        granted_at.elapsed() < ttl,
        "chromium took longer than the grant lives; raise the ttl"
    );
    assert!(
        dom.contains(r#"data-state="ok""#) && dom.contains(EXPECTED),
        "the page did not show the points read back.\nDOM:\n{dom}\nchromium stderr:\n{stderr}\n\
         nginx access log:\n{}",
        nginx.access_log()
    );
    assert!(
        dom.contains(&root.trim_end_matches('/').to_string()),
        "{dom}"
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
    eprintln!("screenshot: {}", shot.display());
    let log = nginx.access_log();
    for req in [
        "GET / ",
        "GET /app.js ",
        "POST /write?db=leased",
        "GET /query?db=leased",
    ] {
        assert!(log.contains(req), "{req:?} not in the access log:\n{log}");
    }
    assert!(
        !log.contains("/_postern/"),
        "the access link reached the web front:\n{log}"
    );
    let v = influxd
        .query("SELECT count(\"value\") FROM leased.autogen.temp")
        .await
        .expect("query influxd directly");
    assert_eq!(
        v.pointer("/results/0/series/0/values/0/1"),
        Some(&serde_json::json!(3))
    );
    let leases = manager.list().await.expect("leases");
    let client = format!("access-{}", grant.info.id);
    assert!(
        leases.iter().any(|l| l.client == client),
        "no lease for the grant: {leases:?}"
    );

    // Once the grant expires the outlet refuses it (polled with the cookie itself), and the
    // browser gets the 403 page again.
    let cookie = format!("postern_access={}", grant.secret.expose());
    let deadline = Instant::now() + ttl + Duration::from_secs(20);
    loop {
        let (status, body) = public_get(ingress, pki.ca_pem(), &cookie).await;
        if status == 403 {
            assert!(body.contains("expired"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "the grant never expired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let requests_before = nginx.access_log().lines().count();
    let (dom, _) = chromium(home.path(), &root, None).await;
    assert!(dom.contains("Access needed"), "after expiry:\n{dom}");
    assert_eq!(nginx.access_log().lines().count(), requests_before);

    outlet.running.stop().await;
    lease_shutdown.cancel();
    manager.closed().await;
    eprintln!("test took {:?}", started.elapsed());
}
