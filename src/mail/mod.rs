//! Email: the invitation templates, the transports (SMTP, a folder, the
//! log) and the outbox worker that delivers what the database holds.

mod outbox;
mod templates;
mod transport;

pub use outbox::OutboxWorker;
pub use templates::{Invitation, RenderedEmail, render_invitation};
pub use transport::{MailError, Mailer};
