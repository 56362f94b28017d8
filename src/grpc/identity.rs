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
    #[tracing::instrument(name = "IdentityService/VerifyToken", skip_all, fields(outcome))]
    async fn verify_token(
        &self,
        request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let caller = caller(&request)?;
        let body = request.into_inner();
        let expected = (!body.expected_audience.is_empty()).then_some(body.expected_audience.as_str());
        let verdict = self
            .verifier
            .verify(&caller, &body.token, expected)
            .await
            .map_err(to_status)?;
        let result = match verdict {
            Verdict::Accepted(principal) => {
                tracing::Span::current().record("outcome", "accepted");
                pb::verify_token_response::Result::Principal(convert::principal(principal))
            }
            Verdict::Rejected(rejection) => {
                tracing::Span::current().record("outcome", rejection.reason.as_str());
                pb::verify_token_response::Result::Rejection(convert::rejection(rejection))
            }
        };
        Ok(Response::new(pb::VerifyTokenResponse { result: Some(result) }))
    }

    #[tracing::instrument(name = "IdentityService/RevokeToken", skip_all)]
    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = caller(&request)?;
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

    #[tracing::instrument(name = "IdentityService/GetUser", skip_all)]
    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = caller(&request)?;
        let key = convert::user_key(request.into_inner().lookup).map_err(to_status)?;
        let user = self.users.get_user(&caller, &key).await.map_err(to_status)?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(convert::user(user)),
        }))
    }
}
