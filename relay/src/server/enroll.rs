//! Enrollment connections (ALPN [`postern_proto::ticket::ALPN_ENROLL`]): a node without a
//! certificate yet presents its ticket and CSR, this relay's authority signs or refuses, and
//! the connection ends. A relay without the authority closes them at once.

use super::shared::Shared;
use postern_net::control::exchange;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Serves one enrollment connection: one request, one answer.
pub(super) async fn serve_enrollment(
    shared: &Arc<Shared>,
    conn: quinn::Connection,
    timeout: Duration,
) {
    let fleet = shared.fleet();
    if !fleet.runs_authority() {
        postern_net::refusal!(
            warn,
            "enroll_no_authority",
            "enrollment attempts, but this relay does not run the authority"
        );
        conn.close(
            postern_proto::msg::code::NOT_ALLOWED.into(),
            postern_proto::ticket::CLOSE_NO_AUTHORITY,
        );
        return;
    }
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: postern_proto::ticket::EnrollRequest = exchange::read_message(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        let answer = fleet.enroll(req).await;
        match &answer {
            postern_proto::ticket::EnrollResponse::Enrolled { .. } => {
                shared.ctl.enrollments.fetch_add(1, Relaxed)
            }
            postern_proto::ticket::EnrollResponse::Refused { .. } => {
                shared.ctl.enrollments_refused.fetch_add(1, Relaxed)
            }
        };
        exchange::write_message(&mut send, &answer)
            .await
            .map_err(|e| e.to_string())?;
        // Let the answer reach the node before the connection goes away.
        let _ = tokio::time::timeout(timeout, conn.closed()).await;
        Ok::<_, String>(())
    };
    // The request must come within the handshake timeout; signing and the answer's delivery
    // get as long again.
    match tokio::time::timeout(timeout * 3, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            shared.ctl.bad_messages.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "enroll_failed", "enrollment exchanges failed", error = %e);
        }
        Err(_) => {
            conn.close(postern_proto::msg::code::NOT_ALLOWED.into(), b"too slow");
            postern_net::refusal!(warn, "enroll_timeout", "enrollment exchanges timed out");
        }
    }
}
