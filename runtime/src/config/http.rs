//! Checks of the `http` section: where the endpoint listens and where its
//! credentials come from.

#[allow(unused_imports)]
use super::*;
use crate::observe::http::AuthSource;

pub(super) fn http_spec(
    c: &mut Checker,
    node: Option<&Node>,
) -> Result<Option<HttpSpec>, Vec<Problem>> {
    let Some(node) = node else {
        return Ok(None);
    };
    let Some(cfg) = c.section::<HttpConfig>(node, "http") else {
        return Err(std::mem::take(&mut c.problems));
    };
    let listen = cfg.listen.value.trim().to_string();
    if let Err(e) = crate::observe::http::check_listen(&listen) {
        c.sp(&cfg.listen, "http.listen", e);
    }
    let auth = match &cfg.auth {
        None => None,
        Some(a) => {
            let given = |v: &Option<Sp<String>>| v.as_ref().map(|s| s.value.trim().to_string());
            let token = (given(&a.token_env), given(&a.token_file));
            let basic = (
                given(&a.user),
                given(&a.password_env),
                given(&a.password_file),
            );
            let at = a
                .token_env
                .as_ref()
                .or(a.token_file.as_ref())
                .or(a.user.as_ref())
                .unwrap_or(&cfg.listen);
            match (token, basic) {
                ((Some(env), None), (None, None, None)) => Some(AuthSource::TokenEnv(env)),
                ((None, Some(file)), (None, None, None)) => Some(AuthSource::TokenFile(file)),
                ((None, None), (Some(user), Some(env), None)) => {
                    Some(AuthSource::BasicEnv(user, env))
                }
                ((None, None), (Some(user), None, Some(file))) => {
                    Some(AuthSource::BasicFile(user, file))
                }
                _ => {
                    c.sp(
                        at,
                        "http.auth",
                        "give either `token_env` or `token_file` (a bearer token), or `user` with `password_env` or `password_file` (basic auth)",
                    );
                    None
                }
            }
        }
    };
    let mut duration = |v: &Option<Sp<String>>, path: &str, default: i64| match v {
        None => default,
        Some(l) => match crate::time::parse_duration(l.value.trim()) {
            Ok(ms) => ms,
            Err(e) => {
                c.sp(l, path, e);
                default
            }
        },
    };
    let linger_ms = duration(&cfg.linger, "http.linger", 0);
    let stuck_after_ms = duration(
        &cfg.stuck_after,
        "http.stuck_after",
        crate::observe::STALL_AFTER.as_millis() as i64,
    );
    if !c.problems.is_empty() {
        return Err(std::mem::take(&mut c.problems));
    }
    Ok(Some(HttpSpec {
        listen,
        auth,
        linger_ms,
        stuck_after_ms,
    }))
}
