//! Following the deployment docs literally (issue 14 item 8): no placeholder secret ships and
//! none is accepted, nor an empty one outside supervise mode; the documented install copies
//! the four daemons only and installs what the units' `Documentation=` names; the runtime
//! image has the chat page and its browser client where the chat worker looks; the README's JavaScript runs as
//! written; each member's `--help` describes that member.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use sc_tests::{bin, eventually};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a daemon with `args` and `env` (and nothing else of ours); its exit code and stderr.
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = std::process::Command::new(bin(program));
    command.args(args).stdin(Stdio::null()).env("RUST_LOG", "error");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SC_") && k.contains("__")) {
        command.env_remove(key);
    }
    let mut child =
        command.envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // A daemon that does start is stopped after a while: the caller sees it did not refuse.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn nothing_shipped_carries_a_placeholder_secret() {
    let mut files = vec![repo().join("docker-compose.yml"), repo().join("Dockerfile")];
    for dir in ["deploy/hosts", "deploy/systemd"] {
        files.extend(std::fs::read_dir(repo().join(dir)).unwrap().map(|e| e.unwrap().path()));
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap().to_ascii_lowercase();
        assert!(
            !text.contains("change-me") && !text.contains("changeme"),
            "{} ships a placeholder",
            file.display()
        );
    }
}

#[test]
fn placeholder_and_empty_secrets_are_refused_naming_the_key() {
    let edge = repo().join("deploy/hosts/edge.toml");
    let edge = edge.to_str().unwrap();
    let control = repo().join("deploy/hosts/control.toml");
    let control = control.to_str().unwrap();
    // The host files as the docs install them, before /etc/sc/sc.env has the secrets.
    for (program, config) in [("sc-worker", edge), ("sc-balancer", edge), ("sc-master", control)] {
        let (code, err) = run(program, &["--config", config], &[]);
        assert_eq!(code, 64, "{program}: {err}");
        assert!(err.contains("cluster.secret") && err.contains("SC_CLUSTER__SECRET"), "{program}: {err}");
    }
    let secret = ("SC_CLUSTER__SECRET", "0123456789abcdef");
    let (code, err) = run("sc-worker", &["--config", edge], &[secret]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("worker.auth_key") && err.contains("openssl rand"), "{err}");
    // What the examples once shipped.
    for (key, value) in
        [("SC_WORKER__AUTH_KEY", "change-me-auth-key"), ("SC_CLUSTER__SECRET", "change-me-cluster-secret")]
    {
        let (code, err) = run("sc-worker", &["--config", edge], &[secret, (key, value)]);
        assert_eq!(code, 64, "{err}");
        assert!(err.contains("placeholder"), "{err}");
        // Supervise mode too: a placeholder is never a secret.
        let (code, err) = run("sc-master", &[], &[(key, value), ("SC_BALANCER__LISTEN", "127.0.0.1:0")]);
        assert_eq!(code, 64, "{err}");
        assert!(err.contains("placeholder"), "{err}");
    }
    // With real secrets the worker starts (and keeps retrying its master until stopped).
    let (code, err) = run(
        "sc-worker",
        &["--config", edge],
        &[secret, ("SC_WORKER__AUTH_KEY", "fedcba9876543210"), ("SC_WORKER__LISTEN", "127.0.0.1:0")],
    );
    assert_ne!(code, 64, "{err}");
    // `sc-master gen-secret` makes one.
    let output = std::process::Command::new(bin("sc-master")).arg("gen-secret").output().unwrap();
    let made = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success() && made.trim().len() == 64, "{made}");
}

/// The lines of the `sh` code blocks of a Markdown file, with `\` continuations joined.
fn shell_lines(markdown: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            inside = line == "```sh";
            continue;
        }
        if !inside {
            continue;
        }
        let line = line.split(" #").next().unwrap_or("").trim_end();
        match line.strip_suffix('\\') {
            Some(start) => pending.push_str(start),
            None => {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
    }
    lines
}

#[test]
fn the_documented_install_copies_the_daemons_only_and_what_the_units_document() {
    let lines = shell_lines(&read("docs/deploy.md"));
    let into_bin: Vec<&String> =
        lines.iter().filter(|l| l.starts_with("install ") && l.ends_with("/usr/local/bin/")).collect();
    assert_eq!(into_bin.len(), 1, "{into_bin:?}");
    let words: Vec<&str> = into_bin[0].split_whitespace().collect();
    let sources: Vec<&str> = words.iter().copied().filter(|w| w.starts_with("target/")).collect();
    assert_eq!(
        sources,
        [
            "target/release/sc-master",
            "target/release/sc-balancer",
            "target/release/sc-worker",
            "target/release/sc-broker"
        ],
        "{}",
        into_bin[0]
    );
    assert!(!into_bin[0].contains('*'), "no globs: {}", into_bin[0]);
    // Every unit's Documentation= is a file the install puts there, from a file that exists.
    let installed: Vec<(String, String)> = lines
        .iter()
        .filter(|l| l.starts_with("install -D"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            Some((words[words.len() - 2].to_owned(), words.last()?.to_string()))
        })
        .collect();
    for entry in std::fs::read_dir(repo().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        let unit = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("Documentation=")).collect();
        assert!(!docs.is_empty(), "{}", path.display());
        for doc in docs {
            let target = doc.strip_prefix("file://").unwrap_or_else(|| panic!("{doc}: not a file"));
            let (source, _) = installed.iter().find(|(_, to)| to == target).unwrap_or_else(|| {
                panic!("{}: {target} is never installed by docs/deploy.md", path.display())
            });
            assert!(repo().join(source).is_file(), "{source} does not exist");
        }
    }
}

/// A `COPY` line of the runtime stage.
struct Copy {
    sources: Vec<String>,
    dest: String,
    /// The stage it copies from (`--from=<stage>`); `None` for files of the repository.
    from: Option<String>,
}

/// `COPY` lines of the runtime stage, `--from=<stage>` ones included.
fn runtime_copies(dockerfile: &str) -> Vec<Copy> {
    let stages: Vec<&str> = dockerfile.split("\nFROM ").collect();
    let runtime = stages.last().unwrap();
    runtime
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .map(|rest| {
            let from = rest.split_whitespace().find_map(|w| w.strip_prefix("--from=")).map(str::to_owned);
            let words: Vec<String> =
                rest.split_whitespace().filter(|w| !w.starts_with("--")).map(str::to_owned).collect();
            let (dest, sources) = words.split_last().unwrap();
            Copy { sources: sources.to_vec(), dest: dest.clone(), from }
        })
        .collect()
}

/// GET `path` from a server at `addr` (HTTP/1.1, closed after); the whole response.
async fn get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_has_the_chat_page_where_the_chat_worker_looks() -> Result<()> {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("sc-chat-worker"), "the image has the chat worker");
    // The image's file system, from the runtime stage's COPY lines: the build stage's binaries
    // into their folder, files of the repository where they go.
    let root = tempfile::tempdir()?;
    let mut bin_dir = None;
    let mut client = None;
    for Copy { sources, dest, from } in runtime_copies(&dockerfile) {
        let dest = root.path().join(dest.trim_start_matches('/'));
        match from.as_deref() {
            Some("build") => {
                bin_dir = Some(dest);
                continue;
            }
            // The npm client, from the stage that runs `npm ci` on the example's package files.
            Some("chat-client") => {
                assert_eq!(sources, ["/chat/node_modules/socketcluster-client/socketcluster-client.min.js"]);
                assert!(
                    dockerfile.contains("COPY examples/chat/package.json examples/chat/package-lock.json ./")
                        && dockerfile.contains("RUN npm ci"),
                    "the chat-client stage installs the example's pinned packages"
                );
                client = Some(dest.join("socketcluster-client.min.js"));
                continue;
            }
            Some(other) => panic!("COPY --from={other}: unknown stage"),
            None => {}
        }
        for source in sources {
            std::fs::create_dir_all(dest.parent().context("parent")?)?;
            let copied =
                std::process::Command::new("cp").arg("-r").arg(repo().join(&source)).arg(&dest).status()?;
            assert!(copied.success(), "COPY {source}");
        }
    }
    let bin_dir = bin_dir.context("the runtime stage copies the binaries")?;
    std::fs::create_dir_all(&bin_dir)?;
    let chat = bin_dir.join("sc-chat-worker");
    std::fs::copy(bin("sc-chat-worker"), &chat)?;
    // Marked, so that the page served is shown to be the image's, not the source tree's.
    let page = root.path().join("usr/local/share/sc-rs/chat/public/index.html");
    let mut html =
        std::fs::read_to_string(&page).context("the image has no chat page where the worker looks")?;
    html.push_str("<!-- from the image -->\n");
    std::fs::write(&page, html)?;
    // What the chat-client stage puts there (the real file comes from npm), marked too.
    let client = client.context("the runtime stage copies the chat page's client")?;
    std::fs::create_dir_all(client.parent().context("parent")?)?;
    std::fs::write(&client, "/* the client from the image */\n")?;

    let mut worker = Command::new(&chat)
        .env("SC_WORKER__LISTEN", "127.0.0.1:0")
        .env("SC_WORKER__GRPC_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn,sc_worker=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(worker.stderr.take().context("stderr")?).lines();
    let addr: String = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("worker listening")
                && let Some(addr) = line.split("addr=").nth(1).and_then(|r| r.split_whitespace().next())
            {
                return Ok(addr.to_owned());
            }
        }
        anyhow::bail!("the chat worker exited")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let response = eventually(Duration::from_secs(10), "GET /", || get(&addr, "/")).await?;
    let script = get(&addr, "/socketcluster-client.min.js").await.context("GET the client")?;
    let _ = worker.start_kill();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("<!-- from the image -->"), "not the image's page");
    assert!(script.starts_with("HTTP/1.1 200"), "{script}");
    assert!(script.contains("/* the client from the image */"), "not the image's client: {script}");
    Ok(())
}

#[test]
fn the_readme_javascript_says_how_node_runs_it() {
    for file in ["README.md", "examples/chat/README.md"] {
        let text = read(file);
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```js\n") {
            let block = &rest[start + 6..];
            let end = block.find("```").unwrap();
            let code = &block[..end];
            if code.contains("import ") {
                assert!(
                    code.contains(".mjs") && code.contains("require("),
                    "{file}: an ES module snippet must say .mjs and show require: {code}"
                );
            }
            rest = &block[end..];
        }
    }
}

#[test]
fn each_member_help_describes_itself() {
    for (program, own, others) in [
        ("sc-broker", "pub/sub", ["balancer, worker and broker", "public listener"]),
        ("sc-worker", "SocketCluster protocol", ["balancer, worker and broker", "pub/sub between"]),
        ("sc-balancer", "public listener", ["balancer, worker and broker", "pub/sub between"]),
    ] {
        let output = std::process::Command::new(bin(program)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{program}");
        assert!(help.contains(own) && help.contains(&format!("Usage: {program}")), "{program}: {help}");
        for other in others {
            assert!(!help.contains(other), "{program} --help says {other:?}: {help}");
        }
    }
}
