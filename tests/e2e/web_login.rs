//! Logging in over plain HTTP: the cookies' flags (`HttpOnly`,
//! `SameSite=Strict`, `Secure` behind TLS), the login form's CSRF cookie,
//! the login rate limit, and the API refusing session cookies while its
//! bearer tokens work as before.

use crate::web::{DEPLOY_TOKEN, Daemon, READ_TOKEN, start_daemon};

const FORM: &str = "application/x-www-form-urlencoded";

fn form(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

/// The `Set-Cookie` header for `name`.
fn set_cookie(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {:?}", response.headers()))
}

/// The login form's CSRF token and cookie.
async fn login_form(http: &reqwest::Client, d: &Daemon) -> (String, String) {
    let response = http.get(format!("{}/login", d.url)).send().await.unwrap();
    let cookie = set_cookie(&response, "nix_deploy_login");
    let page = response.text().await.unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    (csrf, cookie.split(';').next().unwrap().to_string())
}

async fn log_in_with(
    http: &reqwest::Client,
    d: &Daemon,
    token: &str,
    csrf: &str,
    cookie: &str,
) -> reqwest::Response {
    http.post(format!("{}/login", d.url))
        .header(reqwest::header::COOKIE, cookie)
        .header(reqwest::header::CONTENT_TYPE, FORM)
        .body(form(&[
            ("token", token),
            ("csrf", csrf),
            ("next", "/deployments"),
        ]))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn logins_set_strict_http_only_cookies_and_are_rate_limited() {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Plain HTTP: HttpOnly and SameSite=Strict, not Secure; the session
    // works for pages, never for the API, whose bearer tokens are unchanged.
    let d = start_daemon(None, "");
    let (csrf, login_cookie) = login_form(&http, &d).await;
    let cookie = set_cookie(
        &http.get(format!("{}/login", d.url)).send().await.unwrap(),
        "nix_deploy_login",
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");
    // Without the login form's cookie, or with another token, refused.
    let forged = http
        .post(format!("{}/login", d.url))
        .header(reqwest::header::CONTENT_TYPE, FORM)
        .body(form(&[("token", DEPLOY_TOKEN), ("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let response = log_in_with(&http, &d, DEPLOY_TOKEN, &csrf, &login_cookie).await;
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/deployments");
    let session = set_cookie(&response, "nix_deploy_session");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(session.contains(attribute), "{attribute} in {session}");
    }
    assert!(!session.contains("Secure"), "{session}");
    let session = session.split(';').next().unwrap().to_string();
    let page = http
        .get(format!("{}/deployments", d.url))
        .header(reqwest::header::COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let api = |auth: Option<&str>| {
        let mut request = http.get(format!("{}/api/v1/deployments", d.url));
        request = request.header(reqwest::header::COOKIE, &session);
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(api(None).await.unwrap().status(), 401);
    assert_eq!(api(Some(READ_TOKEN)).await.unwrap().status(), 200);
    // Without a session, a page asks to log in and comes back after.
    let anonymous = http
        .get(format!("{}/hosts/web-1", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 303);
    assert_eq!(
        anonymous.headers()["location"],
        "/login?next=%2Fhosts%2Fweb-1"
    );
    drop(d);

    // Behind TLS (public-url https://…): Secure too; and at most three
    // attempts a minute from one address, the right token included.
    let d = start_daemon(
        None,
        "[web]\npublic-url = \"https://deploy.example.org\"\nlogin-attempts-per-minute = 3",
    );
    let (csrf, login_cookie) = login_form(&http, &d).await;
    let cookie = set_cookie(
        &http.get(format!("{}/login", d.url)).send().await.unwrap(),
        "nix_deploy_login",
    );
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    for _ in 0..3 {
        let response = log_in_with(&http, &d, "wrong-token", &csrf, &login_cookie).await;
        assert_eq!(response.status(), 401);
    }
    let limited = log_in_with(&http, &d, DEPLOY_TOKEN, &csrf, &login_cookie).await;
    assert_eq!(limited.status(), 429);
    assert!(
        limited
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .count()
            == 0
    );
}
