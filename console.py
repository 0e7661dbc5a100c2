"""What a run says: the progress line, the log, and bad input, a full disk or Ctrl-C as one `error:`
line that says what to do instead of a traceback. train.py, eval.py and the benchmark print through
these alone.
"""
import sys
import time
from contextlib import contextmanager


@contextmanager
def write_errors(path):
    """A full disk or a folder that cannot be written: a message, not a traceback."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"error: could not write {path}: {e.strerror or e}. The files written "
                         f"before are intact: make room (or fix the folder) and run the same "
                         f"command again to continue.") from None


@contextmanager
def interrupted():
    """Ctrl-C: one line instead of a traceback, and the shell's exit status for SIGINT (130)."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted; the run resumes from its last finished epoch with the same command",
              file=sys.stderr)
        raise SystemExit(130) from None


@contextmanager
def clear_errors():
    """Bad input (no data set where it should be, a damaged checkpoint, an unreadable image) ends
    the run with the message that says what to do, not with a traceback. Wraps only the calls that
    read input."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # from a DataLoader worker: the last line is the error
            message = message.splitlines()[-1]
        if len(message) > 1000:  # e.g. a 5,000-letter --ctx_init quoted back
            message = message[:600] + " [...] " + message[-300:]
        raise SystemExit(f"error: {message}") from None


class Progress:
    """Progress inside a loop over batches: step, images/s and ETA on stderr (not in log.txt).
    On a terminal one line rewrites itself (at most 5 times a second); otherwise a plain line
    every minute."""

    def __init__(self, what, steps, every=60.0):
        self.what, self.steps, self.images = what, steps, 0
        self.tty = sys.stderr.isatty()
        self.every = 0.2 if self.tty else every
        self.start = self.shown = time.time()

    def __call__(self, step, images, note=None):
        """After `step` of `steps` batches, the last one of `images` images. note: a function whose
        text ends the line, called only when a line is shown (train: the loss, read back then)."""
        self.images += images
        now = time.time()
        if now - self.shown < self.every and step < self.steps:
            return
        self.shown, seconds = now, max(now - self.start, 1e-9)
        eta = (self.steps - step) * seconds / step
        line = (f"{self.what}  step {step}/{self.steps}  {self.images / seconds:.1f} img/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" + (f"  {note()}" if note else ""))
        sys.stderr.write(f"\r{line}\033[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:  # the line goes; the loop logs its own summary
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


class Log:
    def __init__(self, path):
        self.path = path
        with write_errors(path):
            self.file = open(path, "a")

    def __call__(self, msg):
        sys.stdout.write(msg + "\n")  # one write: lines of torchrun's processes never interleave
        sys.stdout.flush()
        with write_errors(self.path):
            self.file.write(msg + "\n")
            self.file.flush()
