//! The process's signals: stop (SIGINT, SIGTERM) and reload (SIGHUP).

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One message per `SIGHUP` (reload the config) until `stop`. Without a SIGHUP handler (not
/// Unix, or it could not be installed) the channel just closes at `stop`, and SIGHUP keeps its
/// default action.
pub fn hangups(stop: tokio_util::sync::CancellationToken) -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            got = hup.recv() => {
                                if got.is_none() {
                                    return;
                                }
                                // A reload already waiting covers this one too.
                                let _ = tx.try_send(());
                            }
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP: reload by signal is off"),
        }
    }
    #[cfg(not(unix))]
    drop((tx, stop));
    rx
}
