//! The service's HTTP listener (`IDENTITY_METRICS_ADDR`): plain HTTP/1.1
//! beside the gRPC port, for what is not gRPC (the Prometheus exposition,
//! the gateways' `/forward-auth`).
//! Each feature contributes an `axum::Router`; `server` merges them.

use std::net::SocketAddr;

use tokio::sync::watch;

/// Serves `app` on `addr` until `stop` flips; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        // The client's address is known to handlers (the dashboard bounds streams per address).
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %err, "HTTP listener stopped");
        }
    });
    Ok(bound)
}
