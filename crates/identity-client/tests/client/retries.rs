//! Retries against a scripted IdentityService: transient codes on idempotent
//! calls are retried, RetryInfo is honoured, other codes are not retried.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use identity::pb::{
    self as server_pb,
    identity_service_server::{IdentityService, IdentityServiceServer},
};
use identity_client::{Error, IdentityClient, pb::get_user_request::Lookup};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Answers VerifyToken with RESOURCE_EXHAUSTED (RetryInfo: `retry_after`)
/// `failures` times, then accepts; GetUser is always UNAVAILABLE;
/// RevokeToken is always INVALID_ARGUMENT. Counts every call.
#[derive(Clone)]
struct Scripted {
    calls: Arc<AtomicUsize>,
    failures: usize,
    retry_after: Duration,
}

#[tonic::async_trait]
impl IdentityService for Scripted {
    async fn verify_token(
        &self,
        _: Request<server_pb::VerifyTokenRequest>,
    ) -> Result<Response<server_pb::VerifyTokenResponse>, Status> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                "slow down",
                ErrorDetails::with_retry_info(Some(self.retry_after)),
            ));
        }
        Ok(Response::new(server_pb::VerifyTokenResponse {
            result: Some(server_pb::verify_token_response::Result::Principal(
                server_pb::Principal {
                    user_id: "6f1c2b9e-8a43-4f0e-9d57-0c8f3b1a2d44".to_owned(),
                    ..Default::default()
                },
            )),
        }))
    }

    async fn revoke_token(
        &self,
        _: Request<server_pb::RevokeTokenRequest>,
    ) -> Result<Response<server_pb::RevokeTokenResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::invalid_argument("no"))
    }

    async fn get_user(
        &self,
        _: Request<server_pb::GetUserRequest>,
    ) -> Result<Response<server_pb::GetUserResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable("down"))
    }
}

async fn serve(service: Scripted) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn client(addr: SocketAddr, retries: usize) -> IdentityClient {
    IdentityClient::builder("idk_test")
        .endpoint(format!("http://{addr}"))
        .retries(retries)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .deadline(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn transient_errors_are_retried_honouring_retry_info() {
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = serve(Scripted {
        calls: calls.clone(),
        failures: 2,
        retry_after: Duration::from_millis(20),
    })
    .await;
    let client = client(addr, 2).await;

    client.verify_token("t").await.unwrap();
    assert_eq!(calls.swap(0, Ordering::SeqCst), 3, "two refusals, then the answer");

    let err = client.get_user(Lookup::Email("a@b.c".into())).await.unwrap_err();
    assert!(err.is_outage(), "{err:?}");
    assert_eq!(calls.swap(0, Ordering::SeqCst), 3, "one call and two retries");

    let err = client.revoke_token("t").await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "INVALID_ARGUMENT is not retried");

    let once = self::client(addr, 0).await;
    once.get_user(Lookup::Email("a@b.c".into())).await.unwrap_err();
    assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "retries off");
}

#[tokio::test]
async fn a_retry_delay_too_long_is_handed_to_the_caller() {
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = serve(Scripted {
        calls: calls.clone(),
        failures: 1,
        retry_after: Duration::from_secs(60),
    })
    .await;
    let err = client(addr, 2).await.verify_token("t").await.unwrap_err();
    match err {
        Error::Unavailable { code, retry_after, .. } => {
            assert_eq!(code, Code::ResourceExhausted);
            assert_eq!(retry_after, Some(Duration::from_secs(60)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "not retried: the service asked for a minute"
    );
}
