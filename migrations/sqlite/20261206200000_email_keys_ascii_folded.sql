-- Email keys fold ASCII letters only (`Email::normalized`), the one form both
-- backends can compare the application's own column in. Keys written when they
-- were folded with Unicode rules are written again (SQLite's own lower() folds
-- ASCII only). Folding less can only make keys more distinct, so the unique
-- indexes hold.
UPDATE identity_users SET email_key = lower(trim(email))
WHERE email IS NOT NULL AND email_key IS NOT lower(trim(email));
UPDATE identity_user_profiles SET email_key = lower(trim(email))
WHERE email IS NOT NULL AND email_key IS NOT lower(trim(email));
