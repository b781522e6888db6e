//! `sc-test-certs DIR [NAME]`: writes a fresh test CA (`ca.pem`) and a server certificate it
//! signed for localhost and 127.0.0.1 (`cert.pem`, `key.pem`) into DIR, for the node tests
//! of wss:// (tests/compat/tls.test.js). Made with rcgen at test time; never use them for
//! anything else.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let dir: PathBuf =
        args.next().map(Into::into).ok_or_else(|| anyhow::anyhow!("usage: sc-test-certs DIR [NAME]"))?;
    let name = args.next().and_then(|n| n.into_string().ok()).unwrap_or_else(|| "sc-rs test".to_owned());
    std::fs::create_dir_all(&dir)?;
    let (ca, cert, key) = sc_tests::make_certificates(&name)?;
    std::fs::write(dir.join("ca.pem"), ca)?;
    std::fs::write(dir.join("cert.pem"), cert)?;
    std::fs::write(dir.join("key.pem"), key)?;
    Ok(())
}
