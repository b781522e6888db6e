//! The {{name}} binary: the app's worker when a master runs it, and the whole cluster when
//! started plainly (`cargo run`): it then runs `sc-master` with itself as `[worker] command`
//! (see `sc_worker::launch`).

fn main() -> std::process::ExitCode {
    sc_worker::launch({{crate}}::app)
}
