//! The sc-balancer daemon: the shared member `main` around [`sc_balancer::Balancer`].

use sc_common::Role;

fn main() -> std::process::ExitCode {
    sc_common::daemon::member_main(Role::Balancer, |config, events, shutdown| async move {
        sc_balancer::Balancer::bind(config).await?.serve(events, shutdown).await
    })
}
