//! The token-response parser on the cases from issues 13 and 14 and on random bytes.

use std::time::{Duration, Instant};

use super::*;

const DEFAULT: Duration = Duration::from_secs(300);

fn parse(body: &str) -> Result<ParsedToken, TokenResponseError> {
    parse_token_response(body.as_bytes(), Instant::now(), DEFAULT)
}

fn lifetime(body: &str) -> (Duration, LifetimeSource) {
    let token = parse(body).unwrap_or_else(|e| panic!("{body}: {e}"));
    assert_eq!(token.access_token, "t");
    assert_eq!(token.expires_at.duration_since(token.refresh_at), {
        REFRESH_MARGIN.min(token.lifetime / 2)
    });
    (token.lifetime, token.lifetime_source)
}

#[test]
fn expires_in_as_number_or_numeric_string_is_the_lifetime() {
    use LifetimeSource::*;
    let s = Duration::from_secs;
    assert_eq!(
        lifetime(r#"{"access_token":"t","expires_in":3600}"#),
        (s(3600), ExpiresIn)
    );
    assert_eq!(
        lifetime(r#"{"access_token":"t","expires_in":"3599"}"#),
        (s(3599), ExpiresIn)
    );
    assert_eq!(
        lifetime(r#"{"access_token":"t","expires_in":" 42 "}"#),
        (s(42), ExpiresIn)
    );
    assert_eq!(
        lifetime(r#"{"access_token":"t","expires_in":1.5}"#),
        (Duration::from_millis(1500), ExpiresIn)
    );
    assert_eq!(
        lifetime(r#"{"access_token":"t","expires_in":86400}"#),
        (s(86400), ExpiresIn)
    );
}

#[test]
fn missing_null_zero_or_negative_expires_in_assumes_the_default() {
    for body in [
        r#"{"access_token":"t"}"#,
        r#"{"access_token":"t","expires_in":null}"#,
        r#"{"access_token":"t","expires_in":0}"#,
        r#"{"access_token":"t","expires_in":"0"}"#,
        r#"{"access_token":"t","expires_in":-5}"#,
        r#"{"access_token":"t","expires_in":-9223372036854775808}"#,
        r#"{"access_token":"t","expires_in":-1e300}"#,
        r#"{"access_token":"t","expires_in":1e-300}"#,
    ] {
        assert_eq!(lifetime(body), (DEFAULT, LifetimeSource::Assumed), "{body}");
    }
}

#[test]
fn never_expiring_answers_are_capped_at_a_day() {
    for body in [
        r#"{"access_token":"t","expires_in":9223372036854775807}"#,
        r#"{"access_token":"t","expires_in":18446744073709551615}"#,
        r#"{"access_token":"t","expires_in":1e300}"#,
        r#"{"access_token":"t","expires_in":"1e300"}"#,
        r#"{"access_token":"t","expires_in":"inf"}"#,
        r#"{"access_token":"t","expires_in":86401}"#,
        r#"{"access_token":"t","expires_in":123456789012345678901234567890}"#,
    ] {
        assert_eq!(
            lifetime(body),
            (MAX_TOKEN_LIFETIME, LifetimeSource::Capped),
            "{body}"
        );
    }
}

#[test]
fn short_tokens_are_refreshed_at_half_life() {
    let now = Instant::now();
    let token = parse_token_response(br#"{"access_token":"t","expires_in":30}"#, now, DEFAULT)
        .expect("valid");
    assert_eq!(token.refresh_at, now + Duration::from_secs(15));
    assert_eq!(token.expires_at, now + Duration::from_secs(30));
    let token = parse_token_response(br#"{"access_token":"t","expires_in":600}"#, now, DEFAULT)
        .expect("valid");
    assert_eq!(token.refresh_at, now + Duration::from_secs(540));
}

#[test]
fn bad_answers_are_errors_naming_the_fault() {
    let cases = [
        ("", "not a JSON"),
        ("<html>login</html>", "not a JSON"),
        ("[]", "not a JSON"),
        (r#"{"expires_in":60}"#, "access_token is missing"),
        (
            r#"{"access_token":"","expires_in":60}"#,
            "access_token is missing",
        ),
        (r#"{"access_token":7}"#, "not a JSON"),
        (
            r#"{"access_token":"t","expires_in":"soon"}"#,
            "expires_in is \"soon\"",
        ),
        (
            r#"{"access_token":"t","expires_in":"NaN"}"#,
            "expires_in is \"NaN\"",
        ),
        (
            r#"{"access_token":"t","expires_in":true}"#,
            "a JSON boolean",
        ),
        (r#"{"access_token":"t","expires_in":{}}"#, "a JSON object"),
    ];
    for (body, expected) in cases {
        let error = parse(body).expect_err(body).to_string();
        assert!(error.contains(expected), "{body}: {error}");
    }
    let big = format!(
        r#"{{"access_token":"t","pad":"{}"}}"#,
        "x".repeat(MAX_TOKEN_RESPONSE_BYTES)
    );
    assert!(matches!(
        parse(&big),
        Err(TokenResponseError::TooLarge {
            limit: MAX_TOKEN_RESPONSE_BYTES
        })
    ));
}

#[test]
fn a_zero_or_huge_default_lifetime_is_still_safe() {
    let body = br#"{"access_token":"t"}"#;
    let token = parse_token_response(body, Instant::now(), Duration::ZERO).expect("valid");
    assert_eq!(token.lifetime, crate::config::DEFAULT_TOKEN_LIFETIME);
    let token = parse_token_response(body, Instant::now(), Duration::MAX).expect("valid");
    assert_eq!(token.lifetime, MAX_TOKEN_LIFETIME);
}

/// Random and mutated answers: the parser returns, it never panics, and every accepted
/// lifetime is within (0, 24 h].
#[test]
fn random_answers_never_panic() {
    let seeds: [&[u8]; 4] = [
        br#"{"access_token":"t","expires_in":9223372036854775807}"#,
        br#"{"access_token":"t","expires_in":"3599"}"#,
        br#"{"access_token":"t","expires_in":1e300}"#,
        br#"{"access_token":"t"}"#,
    ];
    let mut rng = fastrand::Rng::with_seed(13_14);
    let alphabet = b"{}[]\":,-+.eE0123456789 aeinx_stcko\\";
    for round in 0..20_000 {
        let mut body: Vec<u8> = seeds[round % seeds.len()].to_vec();
        for _ in 0..rng.usize(1..6) {
            let pick = alphabet[rng.usize(..alphabet.len())];
            match rng.u8(..3) {
                0 if !body.is_empty() => {
                    let at = rng.usize(..body.len());
                    body[at] = pick;
                }
                1 => body.insert(rng.usize(..=body.len()), pick),
                _ if !body.is_empty() => {
                    body.remove(rng.usize(..body.len()));
                }
                _ => {}
            }
        }
        let now = Instant::now();
        if let Ok(token) = parse_token_response(&body, now, DEFAULT) {
            assert!(!token.lifetime.is_zero() && token.lifetime <= MAX_TOKEN_LIFETIME);
            assert!(token.refresh_at >= now && token.refresh_at <= token.expires_at);
        }
    }
}

#[test]
fn rfc_form_encoding_of_credentials() {
    assert_eq!(form_encode_credential("a+b/c:d%e f"), "a%2Bb%2Fc%3Ad%25e+f");
    assert_eq!(form_encode_credential("plain-id_1.x"), "plain-id_1.x");
}
