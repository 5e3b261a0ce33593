//! Registers a new account on a running server and prints the device's bearer token on
//! stdout, for tools that drive the HTTP API directly (`scripts/schemathesis.sh`).
//!
//! ```text
//! cargo run -p sealpost-core --example api_token -- SERVER_URL HOME USERNAME
//! ```
//!
//! `HOME` must be a new directory: it receives the client's database with the account
//! key. The account is registered like any client does it (Ed25519-signed certificate,
//! challenge-response login, 20 KeyPackages), so the token is an ordinary one.

use std::path::PathBuf;
use std::process::ExitCode;

use sealpost_core::Client;

/// KeyPackages uploaded at registration, so that claims succeed for a while.
const KEY_PACKAGES: usize = 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, home, username] = args.as_slice() else {
        eprintln!("usage: api_token SERVER_URL HOME USERNAME");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("api_token: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let home = PathBuf::from(home);
    let registered = runtime.block_on(Client::register(&home, username, server, KEY_PACKAGES));
    match registered.map(|client| client.bearer_token()) {
        Ok(Some(token)) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("api_token: registered, but the client holds no token");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("api_token: {err}");
            ExitCode::FAILURE
        }
    }
}
