//! `identity.v1.IdentityService` adapter.

use tonic::{Request, Response, Status};

use super::{caller, convert, to_status};
use crate::{
    domain::{DomainError, UserDirectory},
    pb::{self, identity_service_server::IdentityService},
    verification::{RevokeTarget, Verdict, Verifier},
};

#[derive(Debug, Clone)]
pub struct IdentityApi {
    users: UserDirectory,
    verifier: Verifier,
}

impl IdentityApi {
    pub fn new(users: UserDirectory, verifier: Verifier) -> Self {
        Self { users, verifier }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    // The RPC span (telemetry::RpcTracing) already names the call and records
    // its outcome; these handler spans are for debugging the hot path only.
    #[tracing::instrument(name = "IdentityService/VerifyToken", level = "debug", skip_all)]
    async fn verify_token(
        &self,
        mut request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let expected = (!body.expected_audience.is_empty()).then_some(body.expected_audience.as_str());
        let verdict = self
            .verifier
            .verify(&caller, &body.token, expected)
            .await
            .map_err(to_status)?;
        let (result, outcome) = match verdict {
            Verdict::Accepted(principal) => (
                pb::verify_token_response::Result::Principal(convert::principal(principal)),
                "accepted",
            ),
            Verdict::Rejected(rejection) => {
                let reason = rejection.reason.as_str();
                (
                    pb::verify_token_response::Result::Rejection(convert::rejection(rejection)),
                    reason,
                )
            }
        };
        let mut response = Response::new(pb::VerifyTokenResponse { result: Some(result) });
        // For the RPC span, when there is one (none in the default configuration).
        if !tracing::Span::current().is_none() {
            response.extensions_mut().insert(crate::telemetry::Outcome(outcome));
        }
        Ok(response)
    }

    #[tracing::instrument(name = "IdentityService/RevokeToken", level = "debug", skip_all)]
    async fn revoke_token(
        &self,
        mut request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = caller(&mut request)?;
        let body = request.into_inner();
        let target = match body.target {
            Some(pb::revoke_token_request::Target::Token(token)) => RevokeTarget::Token(token),
            Some(pb::revoke_token_request::Target::Jti(jti)) => RevokeTarget::Jti {
                jti,
                expires_at: body
                    .expires_at
                    .as_ref()
                    .map(|t| convert::from_timestamp("expires_at", t))
                    .transpose()
                    .map_err(to_status)?,
            },
            None => return Err(to_status(DomainError::invalid("target", "set token or jti"))),
        };
        let expires_at = self.verifier.revoke(&caller, target).await.map_err(to_status)?;
        Ok(Response::new(pb::RevokeTokenResponse {
            expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    #[tracing::instrument(name = "IdentityService/GetUser", level = "debug", skip_all)]
    async fn get_user(
        &self,
        mut request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = caller(&mut request)?;
        let key = convert::user_key(request.into_inner().lookup).map_err(to_status)?;
        let user = self.users.get_user(&caller, &key).await.map_err(to_status)?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(convert::user(user)),
        }))
    }
}
