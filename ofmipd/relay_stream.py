"""--relay's DATA: the message goes down to the MTA while the client sends it.

Memory per message is its header section plus a chunk, whatever its size. The header
section is held until it ends (where fixups.header_end says), so that --check-header-from
can refuse it before any of it leaves and the RFC 6409 fix-ups can be added; then
ofmipd's Received header and the header go down, and each piece of the body follows as
it is read, at the downstream's pace (a slow MTA slows the client, it does not fill
memory). The rules of the message itself (end marker, dots, bare newlines, limits) are
data.py's, the same as for the other targets.

The policy services' END-OF-MESSAGE question and then the throttle script come once the
whole message is in, before the final dot. Whatever stops the message before its end
(too big, a refused header, a policy refusal, the throttle, a downstream failure, the
client gone) closes the downstream connection without the final dot, so the MTA throws
the partial message away. The rest of the client's message is still read, and the
client hears 250 only after the downstream's reply to the dot.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ofmipd.delivery import Submission, new_queue_id
from ofmipd.fixups import header_end
from ofmipd.relay import DOWNSTREAM_FAILED

if TYPE_CHECKING:
    from ofmipd.data import MessageReader
    from ofmipd.relay import Transaction
    from ofmipd.smtp import SubmissionProtocol

log = logging.getLogger("ofmipd.relay")


async def begin_message(server: SubmissionProtocol, transaction: Transaction) -> str | None:
    """DATA downstream, before the client's 354: None if the MTA will take the message,
    else its reply for the client, logged and counted as a delivery that failed."""
    refusal = await transaction.open_data()
    if refusal is not None:
        submission = _submission(server)
        log.info("%s: relay %s: %s", submission.queue_id, transaction.relay.describe(), refusal)
        server.event_handler.delivered(server, submission, 0, refusal)
    return refusal


def _submission(server: SubmissionProtocol) -> Submission:
    envelope = server.envelope
    assert envelope is not None
    return Submission(
        queue_id=new_queue_id(),
        sender=envelope.mail_from or "",
        recipients=tuple(envelope.rcpt_tos),
        content=b"",  # never held whole
        user=server.session_state.user,
        client=server.client,
    )


async def relay_message(
    server: SubmissionProtocol, transaction: Transaction, message: MessageReader
) -> str:
    """The client's reply once the whole message is read (the downstream's, or ofmipd's
    refusal); raises as MessageReader.read() does, the downstream then discarded."""
    try:
        return await _relay(server, transaction, message)
    except BaseException:
        transaction.discard()
        raise


async def _relay(
    server: SubmissionProtocol, transaction: Transaction, message: MessageReader
) -> str:
    handler = server.event_handler
    session = server.session_state
    submission = _submission(server)
    held: list[bytes] | None = []  # the header section while it is held, then None
    size = 0  # the message as read, for the log line
    refused: str | None = None  # --check-header-from's reply
    lost = False  # the message or the downstream failed: nothing more goes down
    while not message.done:
        piece = await message.read()
        size += len(piece)
        if lost:
            continue  # read to its end and thrown away
        if message.failed:  # read() raises the reason at the end
            transaction.discard()
            lost = True
            continue
        if held is not None:
            if not piece and not message.done:
                continue
            # Pieces are whole lines: each is scanned once, and joined once at the end.
            end = header_end(piece, continued=bool(held))
            held.append(piece)
            if end == len(piece) and not message.done:
                continue
            header, held = b"".join(held), None
            refused = handler.header_refusal(server, session, header)
            if refused is not None:
                transaction.discard()
                lost = True
                continue
            queue_id = submission.queue_id
            piece = (
                handler.prepended(server)
                + await handler.received(server, session, queue_id)
                + handler.fixed_up(server, session, header, queue_id)
            )
        if piece and not await transaction.send(piece):
            lost = True
    if refused is not None:
        return refused  # no message line, as for the other targets
    if not lost:  # --policy, before the final dot: a refusal leaves nothing downstream
        refused = await handler.end_of_message_refusal(server, submission.queue_id, size)
        if refused is not None:
            transaction.discard()
            return refused  # no message line, as for the other targets
    reply = DOWNSTREAM_FAILED if lost else await handler.app.delivery.throttle(submission)
    if reply is None:
        reply = await transaction.end_data()
    else:
        transaction.discard()
    log.info("%s: relay %s: %s", submission.queue_id, transaction.relay.describe(), reply)
    handler.delivered(server, submission, size, reply)
    return reply
