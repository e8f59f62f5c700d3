//! `guest-image`: the command line of the library (see src/lib.rs).

use std::path::Path;
use std::process::ExitCode;

use ktf_guest_image::{initramfs, vmlinux};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["initramfs", root, agent, out] => initramfs(
            Path::new(root),
            &[("kata-agent-emitter", Path::new(agent))],
            Path::new(out),
        ),
        ["vmlinux", bzimage, out] => vmlinux(Path::new(bzimage), Path::new(out)),
        _ => {
            eprintln!("usage: guest-image initramfs GUEST_ROOT AGENT OUT | vmlinux BZIMAGE OUT");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-image: {e}");
            ExitCode::FAILURE
        }
    }
}
