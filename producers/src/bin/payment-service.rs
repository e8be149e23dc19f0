//! The payment service binary; see [`producers::payment`].

fn main() -> std::process::ExitCode {
    producers::service::main(producers::config::Service::Payment, |b| {
        Box::pin(producers::payment::build(b))
    })
}
