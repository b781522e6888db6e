//! The sc-balancer daemon: the shared member `main` around [`sc_balancer::Balancer`].

use sc_common::Role;

fn main() -> std::process::ExitCode {
    // The process-wide rustls provider (ring), for anything that does not name one; the
    // balancer's own TLS configuration names it explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    sc_common::cli::member_main(Role::Balancer, |config, events, shutdown| async move {
        sc_balancer::Balancer::bind(config).await?.serve(events, shutdown).await
    })
}
