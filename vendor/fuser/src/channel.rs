use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::FcntlArg;
use nix::fcntl::OFlag;
use nix::fcntl::fcntl;

use crate::dev_fuse::DevFuse;
use crate::passthrough::BackingId;

/// A raw communication channel to the FUSE kernel driver
#[derive(Debug, Clone)]
pub(crate) struct Channel(Arc<DevFuse>);

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Channel {
    /// Create a new communication channel to the kernel driver by mounting the
    /// given path. The kernel driver will delegate filesystem operations of
    /// the given path to the channel.
    pub(crate) fn new(device: Arc<DevFuse>) -> Self {
        Self(device)
    }

    /// Receives data up to the capacity of the given buffer (can block).
    fn receive(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        nix::unistd::read(&self.0, buffer)
    }

    /// Receives data up to the capacity of the given buffer (can block),
    /// retrying on errors that are safe to retry (ENOENT, EINTR, EAGAIN).
    ///
    /// - ENOENT: Operation interrupted. According to FUSE, this is safe to retry.
    /// - EINTR: Interrupted system call, retry.
    /// - EAGAIN: Explicitly instructed to try again.
    pub(crate) fn receive_retrying(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        loop {
            match self.receive(buffer) {
                Ok(size) => return Ok(size),
                Err(Errno::ENOENT | Errno::EINTR | Errno::EAGAIN) => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Like `receive_retrying`, but when no request is queued keep
    /// asking for `spin` before sleeping in a blocking read. A request that
    /// arrives meanwhile is taken without a wake-up, which costs tens of
    /// microseconds when the requester runs on another CPU and this one would
    /// have gone idle.
    ///
    /// Before spinning, the thread yields once: a reader that the last reply
    /// woke on this CPU runs first (without it, a reader sharing the CPU waits
    /// out the whole spin). A queued request is taken before that yield, so a
    /// busy thread never yields.
    ///
    /// The fd must be non-blocking (`set_nonblocking`), and is left so: it is
    /// made blocking only around the sleep, so a busy thread makes no extra
    /// system calls. The sleep is a blocking read because a request wakes one
    /// such reader, while it would wake every thread in poll. Each clone has
    /// its own fd, so the flag is this thread's alone.
    pub(crate) fn receive_spinning(&self, buffer: &mut [u8], spin: Duration) -> nix::Result<usize> {
        spin_then_sleep(
            buffer,
            spin,
            |buffer| self.receive_queued(buffer),
            // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
            || unsafe {
                libc::sched_yield();
            },
            |buffer| {
                self.set_nonblocking(false)?;
                let received = self.receive_retrying(buffer);
                self.set_nonblocking(true)?;
                received
            },
        )
    }

    /// A request already queued, or None: on a non-blocking fd only.
    fn receive_queued(&self, buffer: &mut [u8]) -> Option<nix::Result<usize>> {
        loop {
            match self.receive(buffer) {
                Err(Errno::ENOENT | Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return None,
                other => return Some(other),
            }
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> nix::Result<()> {
        let flags = OFlag::from_bits_retain(fcntl(&self.0, FcntlArg::F_GETFL)?);
        let flags = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        fcntl(&self.0, FcntlArg::F_SETFL(flags)).map(drop)
    }

    /// Returns a sender object for this channel. The sender object can be
    /// used to send to the channel. Multiple sender objects can be used
    /// and they can safely be sent to other threads.
    pub(crate) fn sender(&self) -> ChannelSender {
        // Since write/writev syscalls are threadsafe, we can simply create
        // a sender by using the same file and use it in other threads.
        ChannelSender(self.0.clone())
    }

    /// Clone the FUSE device fd using FUSE_DEV_IOC_CLONE ioctl.
    ///
    /// This creates a new fd that can read FUSE requests independently,
    /// enabling true parallel request processing. The kernel distributes
    /// requests across all cloned fds.
    ///
    /// Requires Linux 4.5+. Returns an error on older kernels or non-Linux.
    #[cfg(target_os = "linux")]
    pub(crate) fn clone_fd(&self) -> io::Result<Channel> {
        use std::os::fd::AsRawFd;

        let new_dev = DevFuse::open()?;

        let mut source_fd = self.0.as_raw_fd() as u32;
        // SAFETY: fuse_dev_ioc_clone is a valid ioctl for /dev/fuse
        unsafe {
            crate::ll::ioctl::fuse_dev_ioc_clone(new_dev.as_raw_fd(), &mut source_fd)?;
        }

        Ok(Channel::new(Arc::new(new_dev)))
    }
}

/// The spin's policy, apart from the fd: a request already queued is taken
/// at once (`take` returns it); otherwise the thread yields once and keeps
/// asking for `spin`, then sleeps until one comes (`sleep`).
fn spin_then_sleep<S: ?Sized, T>(
    state: &mut S,
    spin: Duration,
    mut take: impl FnMut(&mut S) -> Option<T>,
    yield_now: impl FnOnce(),
    sleep: impl FnOnce(&mut S) -> T,
) -> T {
    if let Some(taken) = take(state) {
        return taken;
    }
    yield_now();
    let start = Instant::now();
    while start.elapsed() < spin {
        std::hint::spin_loop();
        if let Some(taken) = take(state) {
            return taken;
        }
    }
    sleep(state)
}

#[derive(Clone, Debug)]
pub(crate) struct ChannelSender(Arc<DevFuse>);

impl ChannelSender {
    pub(crate) fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let rc = nix::sys::uio::writev(&self.0, bufs)?;
        // writev is atomic, so do not need to check how many bytes are written.
        // libfuse does not do it either
        // https://github.com/libfuse/libfuse/blob/6278995cca991978abd25ebb2c20ebd3fc9e8a13/lib/fuse_lowlevel.c#L267
        debug_assert_eq!(bufs.iter().map(|b| b.len()).sum::<usize>(), rc);
        Ok(())
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        BackingId::create(&self.0, fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { BackingId::wrap_raw(&self.0, id) }
    }
}

#[cfg(test)]
mod spin_tests {
    use std::cell::Cell;
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;
    use std::time::Instant;

    use nix::fcntl::FcntlArg;
    use nix::fcntl::OFlag;
    use nix::fcntl::fcntl;

    use super::Channel;
    use super::spin_then_sleep;
    use crate::dev_fuse::DevFuse;

    /// What a call did: how often it asked, whether it yielded and slept.
    #[derive(Debug, Default, PartialEq)]
    struct Calls {
        asks: usize,
        yields: usize,
        sleeps: usize,
    }

    /// `spin_then_sleep` where a request is queued at the `ready`-th ask
    /// (never if None).
    fn run(spin: Duration, ready: Option<usize>) -> (Calls, &'static str) {
        let mut calls = Calls::default();
        let yields = Cell::new(0);
        let got = spin_then_sleep(
            &mut calls,
            spin,
            |calls| {
                calls.asks += 1;
                (Some(calls.asks) == ready).then_some("taken")
            },
            || yields.set(yields.get() + 1),
            |calls| {
                calls.sleeps += 1;
                "slept"
            },
        );
        calls.yields = yields.get();
        (calls, got)
    }

    #[test]
    fn a_queued_request_is_taken_without_yielding_or_sleeping() {
        let (calls, got) = run(Duration::from_secs(10), Some(1));
        assert_eq!(got, "taken");
        assert_eq!(
            calls,
            Calls {
                asks: 1,
                yields: 0,
                sleeps: 0
            }
        );
    }

    #[test]
    fn a_request_that_comes_while_spinning_is_taken_without_sleeping() {
        let (calls, got) = run(Duration::from_secs(10), Some(5));
        assert_eq!(got, "taken");
        assert_eq!(
            calls,
            Calls {
                asks: 5,
                yields: 1,
                sleeps: 0
            }
        );
    }

    #[test]
    fn without_a_request_the_thread_spins_for_its_time_then_sleeps() {
        let spin = Duration::from_millis(20);
        let start = Instant::now();
        let (calls, got) = run(spin, None);
        assert!(start.elapsed() >= spin);
        assert_eq!(got, "slept");
        assert_eq!((calls.yields, calls.sleeps), (1, 1));
        assert!(calls.asks > 1, "asked only {} times", calls.asks);
    }

    #[test]
    fn no_spin_sleeps_after_one_ask() {
        let (calls, got) = run(Duration::ZERO, None);
        assert_eq!(got, "slept");
        assert_eq!(
            calls,
            Calls {
                asks: 1,
                yields: 1,
                sleeps: 1
            }
        );
    }

    /// A channel over the read end of a pipe (no FUSE needed: the spin
    /// only reads), and the write end.
    fn pipe_channel() -> (Channel, File) {
        let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let ch = Channel::new(Arc::new(DevFuse(File::from(read))));
        (ch, File::from(write))
    }

    fn nonblocking(ch: &Channel) -> bool {
        let flags = OFlag::from_bits_retain(fcntl(ch, FcntlArg::F_GETFL).unwrap());
        flags.contains(OFlag::O_NONBLOCK)
    }

    #[test]
    fn set_nonblocking_sets_and_clears_the_flag() {
        let (ch, _write) = pipe_channel();
        assert!(!nonblocking(&ch));
        ch.set_nonblocking(true).unwrap();
        assert!(nonblocking(&ch));
        ch.set_nonblocking(false).unwrap();
        assert!(!nonblocking(&ch));
    }

    #[test]
    fn receive_spinning_takes_what_comes_during_the_spin() {
        use std::io::Write;
        let (ch, mut write) = pipe_channel();
        ch.set_nonblocking(true).unwrap();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(5));
            write.write_all(b"request").unwrap();
            write
        });
        let mut buf = [0u8; 64];
        let n = ch
            .receive_spinning(&mut buf, Duration::from_secs(10))
            .unwrap();
        assert_eq!(&buf[..n], b"request");
        assert!(nonblocking(&ch));
        drop(writer.join().unwrap());
    }

    #[test]
    fn receive_spinning_sleeps_and_stays_nonblocking() {
        use std::io::Write;
        let (ch, mut write) = pipe_channel();
        ch.set_nonblocking(true).unwrap();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            write.write_all(b"late").unwrap();
            write
        });
        let mut buf = [0u8; 64];
        // A spin far shorter than the wait: the request is read in the sleep.
        let n = ch
            .receive_spinning(&mut buf, Duration::from_micros(100))
            .unwrap();
        assert_eq!(&buf[..n], b"late");
        assert!(
            nonblocking(&ch),
            "the fd is non-blocking again after the sleep"
        );
        drop(writer.join().unwrap());
        // With the writer gone and nothing queued, a read ends (EOF), which
        // `receive_queued` hands back rather than spinning on.
        assert_eq!(
            ch.receive_spinning(&mut buf, Duration::from_secs(10))
                .unwrap(),
            0
        );
    }
}
