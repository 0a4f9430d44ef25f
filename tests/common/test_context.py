"""Random ids: their shape, their uniqueness, and a forked child's own draw."""

from __future__ import annotations

import os
import re

from narthex.common.context import _IDS_PER_DRAW, accept_request_id, random_id


def test_random_ids_are_128_bits_of_hex_and_never_repeat_across_draws() -> None:
    ids = [random_id() for _ in range(3 * _IDS_PER_DRAW + 7)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_missing_or_malformed_request_id_is_replaced_by_a_random_one() -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", accept_request_id(None))
    assert re.fullmatch(r"[0-9a-f]{32}", accept_request_id("bad id\r\n"))
    assert accept_request_id("req-12345678") == "req-12345678"


def test_a_forked_child_draws_its_own_ids() -> None:
    random_id()  # the parent holds a draw the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, random_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [random_id() for _ in range(_IDS_PER_DRAW)]
    assert child not in parent
