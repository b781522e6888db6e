//! Listeners handed over by whoever started this process, by the convention of systemd's
//! socket activation: `LISTEN_FDS` descriptors from 3 on, meant for the process `LISTEN_PID`
//! (a grandchild that inherits the variables ignores them), named by `LISTEN_FDNAMES`
//! (colon-separated).
//!
//! Two starters use it: the master in supervise mode, which binds the public port once and
//! passes the same listening socket to every balancer it runs (so that one cluster owns the port
//! and a balancer restart refuses no connection: the socket stays open in the master), and
//! systemd with deploy/systemd/sc-balancer.socket.
//!
//! Entry point: [`take`], once, early in a daemon's `bind`.

use std::net::TcpListener;

use crate::Error;

/// The name of the balancers' public listener in `LISTEN_FDNAMES`.
pub const PUBLIC: &str = "public";

/// The first descriptor of the convention.
pub const FIRST_FD: usize = 3;

/// Takes the TCP listener named `name` that was passed to this process, if any: `None` when no
/// descriptors were passed to this very process (no `LISTEN_FDS`, or a `LISTEN_PID` other than
/// ours). Descriptors passed without names (`LISTEN_FDNAMES` unset) are taken when there is
/// exactly one. An error when descriptors were passed but none fits, or the one named is not a
/// TCP listener: a starter that passes sockets means them to be used.
pub fn take(name: &str) -> Result<Option<TcpListener>, Error> {
    let var = |key: &str| std::env::var(key).ok();
    let Some(index) = pick(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
        name,
    )
    .map_err(Error::Config)?
    else {
        return Ok(None);
    };
    // listenfd checks the descriptor is a TCP socket, sets FD_CLOEXEC on it (so that nothing
    // this process starts inherits it) and clears LISTEN_FDS and LISTEN_PID.
    let mut passed = listenfd::ListenFd::from_env();
    let listener = passed
        .take_tcp_listener(index)
        .map_err(|e| Error::Config(format!("LISTEN_FDS: descriptor {}: {e}", FIRST_FD + index)))?
        .ok_or_else(|| Error::Config(format!("LISTEN_FDS: descriptor {} is gone", FIRST_FD + index)))?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// Which passed descriptor (0 for fd 3) is `name`, from the variables' values; `Ok(None)` when
/// nothing was passed to process `me`.
fn pick(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    me: u32,
    name: &str,
) -> Result<Option<usize>, String> {
    let Some(fds) = fds else { return Ok(None) };
    // Strict as sd_listen_fds(3): no LISTEN_PID, or another's, means the descriptors are not ours.
    if pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(me) {
        return Ok(None);
    }
    let count: usize = fds.trim().parse().map_err(|_| format!("LISTEN_FDS: {fds:?} is not a number"))?;
    if count == 0 {
        return Ok(None);
    }
    match names {
        Some(names) if !names.is_empty() => {
            let names: Vec<&str> = names.split(':').collect();
            names.iter().take(count).position(|n| *n == name).map(Some).ok_or_else(|| {
                format!(
                    "LISTEN_FDNAMES: {count} listener(s) passed ({}), none named {name:?}",
                    names.join(", ")
                )
            })
        }
        _ if count == 1 => Ok(Some(0)),
        _ => Err(format!("LISTEN_FDS: {count} listeners passed without LISTEN_FDNAMES; name one {name:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_descriptors_passed_to_this_process_count() {
        assert_eq!(pick(None, None, None, 7, PUBLIC), Ok(None));
        assert_eq!(pick(Some("7"), None, None, 7, PUBLIC), Ok(None));
        assert_eq!(pick(None, Some("1"), None, 7, PUBLIC), Ok(None), "no LISTEN_PID: not ours");
        assert_eq!(pick(Some("8"), Some("1"), None, 7, PUBLIC), Ok(None), "another process's");
        assert_eq!(pick(Some("7"), Some("0"), None, 7, PUBLIC), Ok(None));
        assert_eq!(pick(Some("7"), Some("1"), None, 7, PUBLIC), Ok(Some(0)));
    }

    #[test]
    fn names_pick_the_descriptor() {
        assert_eq!(pick(Some("7"), Some("2"), Some("admin:public"), 7, PUBLIC), Ok(Some(1)));
        assert_eq!(pick(Some("7"), Some("1"), Some("public"), 7, PUBLIC), Ok(Some(0)));
        let none = pick(Some("7"), Some("1"), Some("sc-balancer.socket"), 7, PUBLIC).unwrap_err();
        assert!(none.contains("none named \"public\""), "{none}");
        let unnamed = pick(Some("7"), Some("2"), None, 7, PUBLIC).unwrap_err();
        assert!(unnamed.contains("without LISTEN_FDNAMES"), "{unnamed}");
        assert!(pick(Some("7"), Some("x"), None, 7, PUBLIC).is_err());
    }
}
