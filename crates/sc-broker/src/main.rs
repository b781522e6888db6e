//! The sc-broker daemon: the shared member `main` around [`sc_broker::Broker`].

use sc_common::Role;

fn main() -> std::process::ExitCode {
    sc_common::cli::member_main(Role::Broker, |config, events, shutdown| async move {
        sc_broker::Broker::bind(config).await?.serve(events, shutdown).await
    })
}
