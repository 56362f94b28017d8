//! ListAuditEvents through a real gRPC client: filters and paging.

use identity::pb::{LinkUserRequest, ListAuditEventsRequest, UnlinkUserRequest};
use prost_types::Timestamp;

use crate::common::{TestApp, TestDb, assert_invalid};

async fn pages_cover_every_event_once_newest_first(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut admin = app.admin();
    let ann = app.legacy_user("ann@example.com").await;
    let bob = app.legacy_user("bob@example.com").await;
    // 12 link/unlink events for ann, 2 for bob.
    for n in 0..6 {
        admin
            .link_user(LinkUserRequest {
                user_id: ann.to_string(),
                clerk_user_id: format!("user_ann{n}"),
            })
            .await
            .unwrap();
        admin
            .unlink_user(UnlinkUserRequest {
                user_id: ann.to_string(),
            })
            .await
            .unwrap();
    }
    admin
        .link_user(LinkUserRequest {
            user_id: bob.to_string(),
            clerk_user_id: "user_bob".into(),
        })
        .await
        .unwrap();
    admin
        .unlink_user(UnlinkUserRequest {
            user_id: bob.to_string(),
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_audit_events(ListAuditEventsRequest {
                page_size: 5,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.events.len() <= 5);
        seen.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 14);
    assert!(seen.windows(2).all(|w| w[0].id > w[1].id), "newest first, no repeats");
    assert_eq!(seen[0].action, "user.unlink");
    assert_eq!(seen[0].user_id, bob.to_string());
    assert!(seen.iter().all(|e| e.caller == "admin" && e.occurred_at.is_some()));

    let for_bob = admin
        .list_audit_events(ListAuditEventsRequest {
            user_id: bob.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(for_bob.events.len(), 2);
    assert!(for_bob.next_page_token.is_empty());
    let links = admin
        .list_audit_events(ListAuditEventsRequest {
            action: "user.link".into(),
            user_id: ann.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(links.events.len(), 6);

    let now = seen[0].occurred_at.unwrap();
    let later = Timestamp {
        seconds: now.seconds + 3600,
        nanos: 0,
    };
    let none = admin
        .list_audit_events(ListAuditEventsRequest {
            since: Some(later),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty());
    let all = admin
        .list_audit_events(ListAuditEventsRequest {
            since: Some(Timestamp {
                seconds: now.seconds - 3600,
                nanos: 0,
            }),
            until: Some(later),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.events.len(), 14);
    app.shutdown().await;
}

async fn bad_paging_and_filters_are_invalid(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut admin = app.admin();
    let cases = [
        (
            ListAuditEventsRequest {
                page_token: "garbage!".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListAuditEventsRequest {
                page_token: "YXVkaXQ6djE6LTU".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListAuditEventsRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListAuditEventsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListAuditEventsRequest {
                user_id: "nope".into(),
                ..Default::default()
            },
            "user_id",
        ),
        (
            ListAuditEventsRequest {
                since: Some(Timestamp {
                    seconds: 2000,
                    nanos: 0,
                }),
                until: Some(Timestamp {
                    seconds: 1000,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "since",
        ),
        (
            ListAuditEventsRequest {
                since: Some(Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "since",
        ),
        (
            ListAuditEventsRequest {
                until: Some(Timestamp { seconds: 0, nanos: -5 }),
                ..Default::default()
            },
            "until",
        ),
    ];
    for (request, field) in cases {
        assert_invalid(&admin.list_audit_events(request).await.unwrap_err(), field);
    }
    app.shutdown().await;
}

crate::backend_tests!(
    pages_cover_every_event_once_newest_first,
    bad_paging_and_filters_are_invalid
);
