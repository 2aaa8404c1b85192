//! Checks of the `peers:` section.

#[allow(unused_imports)]
use super::*;

/// The default port peers listen on.
pub const DEFAULT_PEER_PORT: u16 = 7450;

/// This machine's host name (empty when unknown).
fn host_name() -> String {
    crate::util::host_name().unwrap_or_default()
}

/// Cluster names and peer ids go into MQTT topics and client ids.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(super) fn check_peers(
    c: &mut Checker,
    p: &PeersConfig,
    node: &Node,
    source_is_mqtt: bool,
    has_state: bool,
) -> Option<PeersSpec> {
    let mut ok = true;
    if !valid_name(&p.cluster) {
        c.sp(
            &p.cluster,
            "peers.cluster",
            "use letters, digits, `-`, `_` and `.` (at most 64)",
        );
        ok = false;
    }
    let id = match &p.id {
        Some(id) => {
            if !valid_name(id) {
                c.sp(
                    id,
                    "peers.id",
                    "use letters, digits, `-`, `_` and `.` (at most 64)",
                );
                ok = false;
            }
            id.value.clone()
        }
        None => {
            let h = host_name();
            if !valid_name(&h) {
                c.node(
                    node,
                    "peers.id",
                    "no usable host name to default to: set `peers.id`",
                );
                ok = false;
            }
            h
        }
    };
    let listen = match &p.listen {
        Some(l) => match l.parse::<std::net::SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.sp(
                    l,
                    "peers.listen",
                    format!("`{}` is not an address like `0.0.0.0:7450`", l.value),
                );
                None
            }
        },
        None => Some(std::net::SocketAddr::from((
            [0, 0, 0, 0],
            DEFAULT_PEER_PORT,
        ))),
    };
    let advertise = match (&p.advertise, listen) {
        (Some(a), _) => {
            let port_ok = a
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                c.sp(a, "peers.advertise", "expected `host:port`");
                ok = false;
            }
            a.value.clone()
        }
        (None, Some(l)) if l.ip().is_unspecified() => format!("{}:{}", host_name(), l.port()),
        (None, Some(l)) => l.to_string(),
        (None, None) => String::new(),
    };
    let keep_alive_ms = match &p.keep_alive {
        Some(d) => match c.duration(d, "peers.keep_alive") {
            Some(ms) if ms >= 1000 => ms,
            Some(_) => {
                c.sp(d, "peers.keep_alive", "must be at least 1s");
                ok = false;
                0
            }
            None => {
                ok = false;
                0
            }
        },
        None => 5000,
    };
    let failure_timeout_ms = match &p.failure_timeout {
        Some(d) => c.duration(d, "peers.failure_timeout").unwrap_or_else(|| {
            ok = false;
            0
        }),
        None => 30_000,
    };
    if !source_is_mqtt {
        c.node(
            node,
            "peers",
            "peer mode needs an `mqtt` source: membership and the shared input go through its broker",
        );
        ok = false;
    }
    if !has_state {
        c.node(
            node,
            "peers",
            "peer mode needs a `state:` section: peers checkpoint and hand key groups over",
        );
        ok = false;
    }
    let tls = p.tls.as_ref().map(|t| {
        (
            t.ca_file.value.clone(),
            t.cert_file.value.clone(),
            t.key_file.value.clone(),
        )
    });
    let listen = listen?;
    let advertise_derived = p.advertise.is_none();
    ok.then(|| PeersSpec {
        cluster: p.cluster.value.clone(),
        id,
        listen,
        advertise,
        advertise_derived,
        keep_alive_ms,
        failure_timeout_ms,
        tls,
    })
}
