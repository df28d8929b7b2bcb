//! The forking thread: the one thread that forks corral's workers and that makes an
//! in-place upgrade's `execve`. Linux sends a child its parent-death signal when the
//! *thread* that forked it ends, not the process: a worker forked by a runtime
//! thread would die with that thread, and `execve` ends every thread but its caller
//! (docs/upgrade.md). Forked and exec'd from this one thread, which lives as long as
//! corral, the workers outlive both. The `corral` command makes it the process's
//! main thread ([`on_main_thread`]): the thread that calls `execve` is the main
//! thread of the new image, so the workers it carried and those the new image
//! forks have the same parent thread, and a second upgrade keeps both.
//!
//! It owns that thread and the signal mask across the exec; what is forked and what
//! is carried into the new image are its callers'.

use std::ffi::CString;
use std::sync::mpsc;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// What the forking thread is asked to do.
enum Job {
    Fork {
        cmd: Command,
        /// The runtime the child is watched from.
        runtime: tokio::runtime::Handle,
        reply: oneshot::Sender<std::io::Result<Child>>,
    },
    Exec {
        program: CString,
        argv: Vec<CString>,
        envp: Vec<CString>,
        /// Only an exec that failed answers.
        reply: oneshot::Sender<std::io::Error>,
    },
    /// The work of [`on_main_thread`] is done.
    Done,
}

static FORKER: std::sync::OnceLock<std::io::Result<mpsc::Sender<Job>>> = std::sync::OnceLock::new();

/// Runs `work` on a thread of its own while this thread (the process's main
/// thread) serves as the forking thread, until `work` returns its result.
pub fn on_main_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = mpsc::channel::<Job>();
    let done = tx.clone();
    if FORKER.set(Ok(tx)).is_err() {
        return Err(std::io::Error::other(
            "the forking thread is already chosen",
        ));
    }
    let worker = std::thread::Builder::new()
        .name("corral-main".into())
        .spawn(move || {
            let out = work();
            let _ = done.send(Job::Done);
            out
        })?;
    for job in rx {
        if let Job::Done = job {
            break;
        }
        run(job);
    }
    worker
        .join()
        .map_err(|_| std::io::Error::other("corral's main work panicked"))
}

/// The forking thread's queue: the main thread's where [`on_main_thread`] made it
/// so, else a thread of its own, started at the first use (tests, the library).
fn thread() -> std::io::Result<&'static mpsc::Sender<Job>> {
    let forker = FORKER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("corral-fork".into())
            .spawn(move || {
                for job in rx {
                    run(job);
                }
            })
            .map(|_| tx)
    });
    forker
        .as_ref()
        .map_err(|e| std::io::Error::new(e.kind(), format!("no forking thread: {e}")))
}

fn run(job: Job) {
    match job {
        Job::Fork {
            mut cmd,
            runtime,
            reply,
        } => {
            let _entered = runtime.enter();
            // A caller gone meanwhile drops the child, which kills it.
            let _ = reply.send(cmd.spawn());
        }
        Job::Exec {
            program,
            argv,
            envp,
            reply,
        } => {
            let _ = reply.send(exec_here(&program, &argv, &envp));
        }
        Job::Done => {}
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("corral's forking thread is gone")
}

/// Starts `cmd` on the forking thread.
pub async fn fork(cmd: Command) -> std::io::Result<Child> {
    let (reply, answer) = oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    thread()?
        .send(Job::Fork {
            cmd,
            runtime,
            reply,
        })
        .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// Replaces the process with `program` (argv and environment as given), from the
/// forking thread. Returns only if the exec failed, with why.
pub async fn exec(program: CString, argv: Vec<CString>, envp: Vec<CString>) -> std::io::Error {
    let (reply, answer) = oneshot::channel();
    let job = Job::Exec {
        program,
        argv,
        envp,
        reply,
    };
    if thread()
        .and_then(|t| t.send(job).map_err(|_| gone()))
        .is_err()
    {
        return gone();
    }
    answer.await.unwrap_or_else(|_| gone())
}

/// The exec itself. Every signal is blocked first: the mask is kept across
/// `execve` and a signal that comes meanwhile stays pending, where with the new
/// image's default actions (its handlers not yet installed) a SIGHUP or SIGTERM
/// would end corral and, by their death signal, its workers. The new image
/// unblocks them once it handles them ([`unblock_signals`]).
fn exec_here(program: &CString, argv: &[CString], envp: &[CString]) -> std::io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: the sets are initialised by sigfillset before use; pthread_sigmask
    // and execve get valid pointers to NUL-terminated strings and NULL-terminated
    // arrays that outlive the calls. execve returns only on failure.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut was = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut was);
        libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
        let error = std::io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &was, std::ptr::null_mut());
        error
    }
}

/// Unblocks every signal on the calling thread: after an upgrade's exec the new
/// image starts with them blocked (see `exec_here`); called where corral's handlers
/// are in place, on the thread that is to take process signals. Otherwise a
/// no-op.
pub fn unblock_signals() {
    // SAFETY: the set is initialised by sigfillset; unblocking changes only this
    // thread's mask.
    unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &all, std::ptr::null_mut());
    }
}
