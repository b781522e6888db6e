//! A child's standard error, passed through to the master's, line by line, each line once and
//! marked with the child's id (`worker-0 | ...`, or a `"member"` field in a JSON line), keeping
//! the last line: the error a daemon prints when it cannot start (`sc-worker:
//! worker.static_dir: ...`, or its last log line), which the master repeats when a child fails
//! its first start. Error lines (ERROR log lines, and lines that are not log lines at all, what
//! a daemon prints before its logging starts) also go to `on_error` as they come: the status
//! API shows each child's last one.
//!
//! The child's warnings, errors and notices also reach the master as central log events over
//! gRPC; the master does not print those again (see `CentralLog::relaying`), so that every line
//! appears once on its output.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStderr;
use tokio::task::JoinHandle;

/// The longest last line kept; a longer one is cut (a panic message with a huge payload, say).
const LAST_LINE_MAX: usize = 4096;

/// Copies `stderr` to this process's standard error, each line marked with `id`, until the
/// child closes it (it exited); error lines go to `on_error` (their message, see [`error`]).
/// The task's result is the last non-empty line, without terminal colour codes.
pub(super) fn relay(
    stderr: ChildStderr,
    id: String,
    on_error: impl Fn(String) + Send + 'static,
) -> JoinHandle<Option<String>> {
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
            let _ = std::io::stderr().lock().write_all(&marked(&line, &id));
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                let kept = &line[..line.len().min(LAST_LINE_MAX)];
                if let Some(message) = error(&plain(&String::from_utf8_lossy(kept))) {
                    on_error(message);
                }
                last = Some(kept.to_vec());
            }
        }
        last.map(|bytes| message(&plain(&String::from_utf8_lossy(&bytes))))
    })
}

/// `line` marked with the child's `id`: a JSON object gets a `"member"` field first, any other
/// line an `<id> | ` prefix.
fn marked(line: &[u8], id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + id.len() + 16);
    match line.strip_prefix(b"{") {
        Some(rest) => {
            out.extend_from_slice(b"{\"member\":");
            out.extend_from_slice(serde_json::Value::from(id).to_string().as_bytes());
            if !rest.trim_ascii_start().starts_with(b"}") {
                out.push(b',');
            }
            out.extend_from_slice(rest);
        }
        None => {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b" | ");
            out.extend_from_slice(line);
        }
    }
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

/// The message of an error line: an ERROR log line (plain or JSON) or a line that is not a log
/// line at all (what a daemon prints before its logging starts, `sc-worker: config: ...`);
/// `None` for other log lines (warnings, notices, debug).
fn error(line: &str) -> Option<String> {
    if line.is_empty() {
        return None;
    }
    if line.starts_with('{') {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { return Some(line.to_owned()) };
        if value["level"] != "ERROR" {
            return None;
        }
        return Some(value["fields"]["message"].as_str().unwrap_or(line).to_owned());
    }
    match log_line(line) {
        Some(("ERROR", message)) => Some(message.to_owned()),
        Some(_) => None,
        None => Some(line.to_owned()),
    }
}

/// The message of a plain log line (`<time> ERROR <target>: <message>`, what the daemons'
/// tracing writes); any other line as it is.
fn message(line: &str) -> String {
    log_line(line).map_or_else(|| line.to_owned(), |(_, message)| message.to_owned())
}

/// The level and message of a plain log line; `None` for any other line.
fn log_line(line: &str) -> Option<(&str, &str)> {
    let (time, rest) = line.split_once(' ')?;
    let rest = rest.trim_start();
    let (level, rest) = rest.split_once(' ')?;
    let (target, message) = rest.split_once(' ')?;
    let is_log = time.ends_with('Z')
        && time.starts_with(|c: char| c.is_ascii_digit())
        && ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level)
        && target.ends_with(':');
    is_log.then_some((level, message))
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
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = errors.clone();
        let last =
            relay(child.stderr.take().unwrap(), "worker-0".into(), move |e| seen.lock().unwrap().push(e));
        child.wait().await.unwrap();
        assert_eq!(last.await.unwrap().as_deref(), Some("the error"));
        assert_eq!(
            *errors.lock().unwrap(),
            ["first", "the error"],
            "lines that are not log lines are errors"
        );
    }

    #[test]
    fn error_lines_are_told_apart_from_other_log_lines() {
        let at = "2026-12-01T01:41:38.709085Z";
        assert_eq!(error(&format!("{at} ERROR sc_worker: boom")).as_deref(), Some("boom"));
        assert_eq!(error(&format!("{at}  WARN sc_worker: slow")), None);
        assert_eq!(error(&format!("{at}  INFO sc_worker: worker listening id=w")), None);
        assert_eq!(error("sc-worker: config: bad").as_deref(), Some("sc-worker: config: bad"));
        let json = r#"{"timestamp":"x","level":"ERROR","fields":{"message":"boom"},"target":"sc_worker"}"#;
        assert_eq!(error(json).as_deref(), Some("boom"));
        assert_eq!(error(&json.replace("ERROR", "INFO")), None);
    }

    #[test]
    fn lines_are_marked_with_the_member() {
        assert_eq!(marked(b"2026 INFO x: y\n", "worker-0"), b"worker-0 | 2026 INFO x: y\n");
        let json = marked(b"{\"level\":\"INFO\"}\n", "worker-0");
        assert_eq!(json, b"{\"member\":\"worker-0\",\"level\":\"INFO\"}\n");
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["member"], "worker-0");
        assert_eq!(marked(b"no newline", "b"), b"b | no newline\n");
    }
}
