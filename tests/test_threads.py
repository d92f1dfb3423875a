# SPDX-License-Identifier: Apache-2.0
"""vkv.threads: a Thread's first frame is the large one that sizes its first data-stack chunk, and run_in_thread
hands back the result or the exception."""

import sys
import threading

import pytest

from vkv.threads import ROOT_LOCALS, Thread, run_in_thread


def _first_frame_locals() -> int:
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
    return frame.f_code.co_nlocals


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 caches a chunk: Thread is threading.Thread there")
def test_a_threads_first_frame_reserves_the_room():
    seen = []
    thread = Thread(target=lambda: seen.append(_first_frame_locals()))
    thread.start()
    thread.join()
    assert seen and seen[0] >= ROOT_LOCALS
    plain = []
    other = threading.Thread(target=lambda: plain.append(_first_frame_locals()))
    other.start()
    other.join()
    assert plain and plain[0] < 100  # threading.Thread's own first frame, for contrast


def test_run_in_thread_returns_the_result_or_raises_the_error():
    assert run_in_thread(lambda: threading.current_thread().name, name="probe") == "probe"
    assert run_in_thread(lambda: threading.current_thread() is not threading.main_thread())

    def fail():
        raise KeyError("lost")

    with pytest.raises(KeyError, match="lost"):
        run_in_thread(fail)

    def interrupt():
        raise KeyboardInterrupt  # a BaseException is handed over too

    with pytest.raises(KeyboardInterrupt):
        run_in_thread(interrupt)
