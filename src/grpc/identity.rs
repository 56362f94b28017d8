//! `identity.v1.IdentityService` adapter.

use tonic::{Request, Response, Status};

use super::{caller, convert, to_status};
use crate::{
    domain::UserDirectory,
    pb::{self, identity_service_server::IdentityService},
};

#[derive(Debug, Clone)]
pub struct IdentityApi {
    users: UserDirectory,
}

impl IdentityApi {
    pub fn new(users: UserDirectory) -> Self {
        Self { users }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
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
