//! A child's standard error, passed through to the master's, line by line, keeping the last
//! line: the error a daemon prints when it cannot start (`sc-worker: worker.static_dir: ...`,
//! or its last log line), which the master repeats when a child fails its first start.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStderr;
use tokio::task::JoinHandle;

/// The longest last line kept; a longer one is cut (a panic message with a huge payload, say).
const LAST_LINE_MAX: usize = 4096;

/// Copies `stderr` to this process's standard error until the child closes it (it exited);
/// the task's result is its last non-empty line, without terminal colour codes.
pub(super) fn relay(stderr: ChildStderr) -> JoinHandle<Option<String>> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // One write per line under the lock, so that children's lines never interleave
            // with each other or with the master's own log lines (which take the same lock).
            let _ = std::io::stderr().lock().write_all(&line);
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                last = Some(line[..line.len().min(LAST_LINE_MAX)].to_vec());
            }
        }
        last.map(|bytes| message(&plain(&String::from_utf8_lossy(&bytes))))
    })
}

/// The message of a plain log line (`<time> ERROR <target>: <message>`, what the daemons'
/// tracing writes); any other line as it is.
fn message(line: &str) -> String {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(level), Some(target), Some(rest)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return line.to_owned();
    };
    let is_log = time.ends_with('Z')
        && time.starts_with(|c: char| c.is_ascii_digit())
        && ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level)
        && target.ends_with(':');
    if is_log { rest.to_owned() } else { line.to_owned() }
}

/// `text` without ANSI escape sequences (tracing colours its levels) and surrounding space.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then a final byte in @..~.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_and_space_are_removed() {
        let line = "\u{1b}[2m2025-01-01T00:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m config: bad\n";
        assert_eq!(plain(line), "2025-01-01T00:00:00Z ERROR config: bad");
        assert_eq!(
            plain("sc-worker: worker.static_dir: /x: no such file\n"),
            "sc-worker: worker.static_dir: /x: no such file"
        );
    }

    #[test]
    fn a_log_line_gives_its_message() {
        let line = "2026-12-01T01:41:38.709085Z ERROR sc_common::cli: config: balancer.tls_key: bad";
        assert_eq!(message(line), "config: balancer.tls_key: bad");
        for other in ["sc-worker: worker.static_dir: /x: no such file", "{\"level\":\"ERROR\"}", "a b c d"] {
            assert_eq!(message(other), other);
        }
    }

    #[tokio::test]
    async fn the_last_non_empty_line_is_kept() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "echo first >&2; printf 'the error\\n\\n' >&2"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let last = relay(child.stderr.take().unwrap());
        child.wait().await.unwrap();
        assert_eq!(last.await.unwrap().as_deref(), Some("the error"));
    }
}
