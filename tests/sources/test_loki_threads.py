"""The Loki source's worker threads hand their exit to the consumer even behind a slow writer.

Regression: a worker's exit message was put with a 5 s timeout and dropped on a full queue; when the
writer spent longer than that storing one batch (a loaded machine, 1M lines), the consumer waited for
an exit that never came and ``ingest loki`` hung for good."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from meshlens.sources import loki


class _Pag:
    """Stands in for :class:`loki.Paginator`: one shard of ``pages`` pages, produced at once."""

    def __init__(self, pages: int) -> None:
        self.stop = threading.Event()
        self.want_work = None
        self.pages = pages

    def run_shard(self, sh: loki._Shard) -> Iterator[loki._Page]:
        for i in range(self.pages):
            yield loki._Page(shard_id=sh.id, entries=None, cursor=i, done=i == self.pages - 1)  # type: ignore[arg-type]


def test_exit_reaches_a_consumer_slower_than_the_old_timeout() -> None:
    pag = _Pag(pages=3)  # the consumer holds the 1st; the 2nd and 3rd fill the queue (2): the exit waits
    th = loki._Threaded(pag, [loki._Shard(id=1, start=0, end=10)], parallel=1)  # type: ignore[arg-type]
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        for msg in th.messages():
            if not got:
                time.sleep(6)  # one slow batch: the worker has long finished and its exit waits
            got.append(msg.cursor)
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert done.wait(30), "the consumer never saw the worker's exit"
    assert got == list(range(3))
