//! A private nginx (Debian's) on 127.0.0.1 whose listener takes the PROXY protocol
//! (`listen ... proxy_protocol`), answering every request 200 and logging, per request, the
//! address and port the PROXY header gave, and the request line.

use crate::ports::free_port;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// nginx on `PATH` or in /usr/sbin (where Debian puts it), if installed.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// The running nginx; stopped on drop.
pub struct ProxyNginx {
    _child: tokio::process::Child,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl ProxyNginx {
    /// Starts `nginx` (from [`find`]) in a fresh directory of its own, as a foreground
    /// process without a master.
    pub async fn start(nginx: &std::path::Path) -> ProxyNginx {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("postern-nginx-pp-")
                .tempdir()
                .expect("tempdir");
            let d = dir.path();
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let p = d.display();
            let conf = format!(
                r#"daemon off;
master_process off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
  log_format pp 'pp=$proxy_protocol_addr:$proxy_protocol_port "$request" $status';
  access_log {p}/access.log pp;
  client_body_temp_path {p}/client_body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  server {{
    listen {addr} proxy_protocol;
    location / {{ return 200 "hello from nginx\n"; }}
  }}
}}
"#
            );
            std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
            let mut child = tokio::process::Command::new(nginx)
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
            // Listening once a connection is taken (nothing else to wait on).
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut up = false;
            while Instant::now() < deadline {
                if child.try_wait().expect("try_wait").is_some() {
                    break;
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let me = ProxyNginx {
                _child: child,
                dir,
                addr,
            };
            if up {
                return me;
            }
            last = me.error_log();
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start:\n{last}");
    }

    /// Its access log so far: `pp=ADDR:PORT "REQUEST" STATUS` per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Its error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}
