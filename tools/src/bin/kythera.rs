//! The kythera server binary.
//!
//! The io_uring engine that it will start is not built yet (issue 3): until then it says
//! so and exits with status 2 rather than pretending to serve.

fn main() {
    eprintln!(
        "kythera: the server is not built yet; this tree holds the protocol core and \
         handler-api only (see README.md, 'Status')."
    );
    std::process::exit(2);
}
