"""Progress: a live bar on a terminal, a line per interval in a log (no carriage returns)."""

import io
import os
import pty

from hfedit.progress import progress


def test_off_a_terminal_each_redraw_is_one_line_with_the_total():
    log = io.StringIO()
    with progress(total=5, desc="train smiling", unit="step", every=0, stream=log) as bar:
        for _ in range(5):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("train smiling") for line in lines)
    assert "5/5" in lines[-1] and "0/5" not in lines[-1]


def test_a_long_interval_keeps_a_log_short():
    log = io.StringIO()
    with progress(total=1000, desc="x", every=3600, stream=log) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(log.getvalue().splitlines()) <= 3  # start, maybe one, the end


def test_on_a_terminal_the_bar_redraws_in_place():
    leader, child = pty.openpty()
    stream = os.fdopen(child, "w")
    with progress(total=3, desc="edit", stream=stream) as bar:
        for _ in range(3):
            bar.update(1)
    stream.flush()
    text = os.read(leader, 65536).decode()
    stream.close()
    os.close(leader)
    assert "\r" in text and "edit" in text
