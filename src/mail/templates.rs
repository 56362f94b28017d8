//! The seed's invitation email, HTML and plain text, from `templates/`.
//! Every value is escaped in the HTML version (minijinja auto-escapes
//! `.html` templates).

use minijinja::{Environment, context};

const HTML: &str = include_str!("../../templates/migration_invite.html");
const TEXT: &str = include_str!("../../templates/migration_invite.txt");

/// The values an invitation shows.
#[derive(Debug, Clone)]
pub struct Invitation<'a> {
    pub product_name: &'a str,
    pub user_name: &'a str,
    pub migration_url: &'a str,
    pub expires_in: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: String,
}

fn environment() -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(minijinja::default_auto_escape_callback);
    env.add_template("migration_invite.html", HTML)?;
    env.add_template("migration_invite.txt", TEXT)?;
    Ok(env)
}

pub fn render_invitation(invitation: &Invitation<'_>) -> Result<RenderedEmail, minijinja::Error> {
    let env = environment()?;
    let values = context! {
        product_name => invitation.product_name,
        user_name => invitation.user_name,
        migration_url => invitation.migration_url,
        expires_in => invitation.expires_in,
    };
    Ok(RenderedEmail {
        // Header injection is impossible: the subject has no line breaks.
        subject: format!(
            "Upgrade Your {} Account",
            invitation.product_name.replace(['\r', '\n'], " ")
        ),
        text: env.get_template("migration_invite.txt")?.render(&values)?,
        html: env.get_template("migration_invite.html")?.render(&values)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_values_are_escaped_and_text_is_plain() {
        let email = render_invitation(&Invitation {
            product_name: "Leaf<Lock>",
            user_name: "<script>alert(1)</script>",
            migration_url: "https://app.example.com/migrate?token=abc&x=\"1\"",
            expires_in: "24 hours",
        })
        .unwrap();
        assert_eq!(email.subject, "Upgrade Your Leaf<Lock> Account");
        assert!(
            email.html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{}",
            email.html
        );
        assert!(!email.html.contains("<script>"));
        assert!(email.html.contains("token=abc&amp;x=&quot;1&quot;"));
        assert!(email.html.contains("Social login (Google, GitHub, etc.)"));
        assert!(email.text.contains("https://app.example.com/migrate?token=abc&x=\"1\""));
        assert!(email.text.contains("This link expires in 24 hours."));
        assert!(
            email.text.contains("Hi <script>alert(1)</script>,"),
            "plain text is not HTML"
        );
    }
}
