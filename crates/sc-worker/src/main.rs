//! The stock sc-worker daemon: the shared member `main` around [`sc_worker::Worker`].

use sc_common::Role;

fn main() -> std::process::ExitCode {
    sc_common::cli::member_main(Role::Worker, |config, events, shutdown| async move {
        sc_worker::Worker::bind(config).await?.serve(events, shutdown).await
    })
}
