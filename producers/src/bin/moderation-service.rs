//! The moderation service binary; see [`producers::moderation`].

fn main() -> std::process::ExitCode {
    producers::service::main(producers::config::Service::Moderation, |b| {
        Box::pin(producers::moderation::build(b))
    })
}
