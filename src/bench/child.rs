//! The study's children (guests' VMMs, peers, backends, fio) die with it:
//! a study killed midway must not leave a guest spinning on a CPU.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `command`'s process get SIGKILL when the thread that starts it
/// exits. Start it only from a thread that outlives it (the study's own).
pub fn dies_with_study(command: &mut Command) -> &mut Command {
    let study = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The study died before the line above: nobody would kill us.
            if libc::getppid() != study {
                return Err(std::io::Error::other("the study has ended"));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_killed_when_the_thread_that_started_it_ends() {
        let starter = std::thread::spawn(|| {
            let mut command = Command::new("sleep");
            dies_with_study(command.arg("60")).spawn().expect("sleep runs")
        });
        let mut child = starter.join().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "the child outlived its starter");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
