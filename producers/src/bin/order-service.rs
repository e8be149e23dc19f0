//! The order service binary; see [`producers::order`].

fn main() -> std::process::ExitCode {
    producers::service::main(producers::config::Service::Order, |b| {
        Box::pin(producers::order::build(b))
    })
}
