//! The delivery service binary; see [`producers::delivery`].

fn main() -> std::process::ExitCode {
    producers::service::main(producers::config::Service::Delivery, |b| {
        Box::pin(producers::delivery::build(b))
    })
}
